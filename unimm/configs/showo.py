"""Show-o configs: the paper's Phi-1.5-sized model and a tiny CPU variant."""

from __future__ import annotations

import ml_collections

from unimm.configs import image_tokenizer
from unimm.configs.common import base_config, model_section, nested_run, only_categories
from unimm.objectives import settings
from unimm.objectives.showo import Settings


def recipe_sections(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The Show-o sections with the reference's defaults (owned by objectives.showo.Settings)."""
    c.objective = "showo"
    c.model = model_section(qk_norm=True)
    c.image = ml_collections.ConfigDict(dict(resolution=32))
    c.image_tokenizer = nested_run(image_tokenizer.tiny_config())
    c.update(settings.sections(Settings))
    return c


def tiny_config() -> ml_collections.ConfigDict:
    """The CPU demo: 32 px scenes as 8x8 codes of the tiny tokenizer (trained
    first, in <workdir>/image_tokenizer; its encoder codes each 4x4 tile from
    that tile alone), a 4-layer decoder.

    Generation is the demo's focus, as in the Transfusion demo: one-object captions
    only (`data.weights`), and 75% of the rows t2i (`showo.t2i_ratio`; the paper's
    mix would be 0.6 / 0.2 / 0.2; the loss weights are the paper's 1 / 1 / 0.1).
    The 20% understanding rows mostly ask questions (`qa_prob` 0.8), most of them
    POPE existence probes answered yes and no alike (`probe_prob` 0.8): telling
    which objects are present takes about ten thousand probes to learn
    (docs/showo.md). Shapes keep improving with steps, so the steps fill the
    CPU budget; 32 unmasking steps (the paper: 16 at 256 px, 50 at 512 px) draw
    them better than 16, and MaskGIT's confidence noise 4.5 (the reference
    anneals 1.0) keeps the blank canvas from being revealed first."""
    c = recipe_sections(base_config())
    c.model.update(num_layers=4, d_model=256, num_heads=4, num_kv_heads=4, head_dim=64, mlp_dim=768)
    c.showo.update(max_text_len=20, t2i_ratio=0.75, mmu_ratio=0.2, lm_ratio=0.05, qa_prob=0.8, probe_prob=0.8)
    c.data.batch_size = 16
    c.data.weights = only_categories(c.data)
    c.optim.update(learning_rate=1e-3, warmup_steps=100, weight_decay=0.01)
    c.sampling.update(sample_steps=32, confidence_noise=4.5)
    c.train.update(steps=4000, log_every=100, checkpoint_every=1000)
    c.eval.update(images_per_category=32, num_understanding=64)
    return c


def paper_config() -> ml_collections.ConfigDict:
    """Show-o at 256 px: Phi-1.5's decoder (24 parallel blocks of d 2048, 32 heads,
    GELU MLP 8192 wide, LayerNorm, biases, RoPE on half of each head) with
    QK-norm, the Phi/CodeGen text vocabulary (50,295), 8192 LFQ codes at 16x down
    (256 tokens); the reference's MaskGIT sampler (16 steps, guidance 1.75,
    confidence noise 1.0 annealed to 0).

    Training needs --config.tokenizer.path (a SentencePiece model of that size)
    and the LFQ tokenizer run (--config.image_tokenizer.workdir; trained first if empty)."""
    c = recipe_sections(base_config())
    c.model.update(num_layers=24, d_model=2048, num_heads=32, num_kv_heads=32, head_dim=64, mlp_dim=8192,
                   block="phi", rotary_fraction=0.5, norm_eps=1e-5, dtype="bfloat16", remat="full")
    c.tokenizer.update(kind="sentencepiece", path="phi_tokenizer.model", vocab_size=50295)
    c.image.resolution = 256
    c.image_tokenizer = nested_run(image_tokenizer.showo_config())
    c.showo.update(max_text_len=128, t2i_ratio=0.6, mmu_ratio=0.2, lm_ratio=0.2)
    c.sampling.update(sample_steps=16, guidance_scale=1.75, sample_temperature=1.0, confidence_noise=1.0)
    c.data.batch_size = 512
    c.optim.update(learning_rate=1e-4, warmup_steps=5000, weight_decay=0.01, b2=0.999)
    c.train.update(steps=500_000, log_every=100, checkpoint_every=5000)
    c.mesh.shape.update(data=1, fsdp=-1, tensor=1)
    return c
