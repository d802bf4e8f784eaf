"""Show-o configs: the paper's Phi-1.5-sized model and a tiny CPU variant."""

from __future__ import annotations

import ml_collections

from unimm.configs import image_tokenizer
from unimm.configs.common import base_config, only_categories


def with_workdir(tokenizer_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A nested tokenizer run config; workdir '' means <this run's workdir>/image_tokenizer."""
    tokenizer_config.workdir = ""
    return tokenizer_config


def recipe_sections(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c.objective = "showo"
    c.model = ml_collections.ConfigDict(dict(
        num_layers=2, d_model=64, num_heads=4, num_kv_heads=4, head_dim=16, mlp_dim=192, qk_norm=True,
        rope_theta=10000.0, norm_eps=1e-6, dtype="float32", param_dtype="float32", attention="xla",
        remat="none"))
    c.image = ml_collections.ConfigDict(dict(resolution=32))
    c.image_tokenizer = with_workdir(image_tokenizer.tiny_config())
    c.showo = ml_collections.ConfigDict(dict(
        max_text_len=24, t2i_ratio=0.5, mmu_ratio=0.4, lm_ratio=0.1, t2i_loss_weight=1.0, mmu_loss_weight=1.0,
        lm_loss_weight=0.1, ntp_weight=1.0, cond_dropout=0.1, qa_prob=0.5, z_loss=0.0))
    c.sampling = ml_collections.ConfigDict(dict(
        sample_steps=16, guidance_scale=1.75, sample_temperature=1.0, confidence_noise=4.5, max_new_tokens=24, temperature=0.0))
    return c


def tiny_config() -> ml_collections.ConfigDict:
    """The CPU demo: 32 px scenes as 8x8 codes of the tiny tokenizer (trained
    first, in <workdir>/image_tokenizer; its encoder codes each 4x4 tile from
    that tile alone), a 4-layer decoder.

    Generation is the demo's focus, as in the Transfusion demo: one-object captions
    only (`data.weights`), and 90% of the rows t2i (`showo.t2i_ratio`; the paper's
    mix would be 0.6 / 0.2 / 0.2 with loss weights 1 / 1 / 0.1, still the loss
    weights here). Shapes keep improving with steps (docs/showo.md), so the steps
    fill the 20-minute CPU budget; 32 unmasking steps (the paper: 16 at 256 px,
    50 at 512 px) draw them better than 16."""
    c = recipe_sections(base_config())
    c.model.update(num_layers=4, d_model=256, num_heads=4, num_kv_heads=4, head_dim=64, mlp_dim=768)
    c.showo.update(max_text_len=20, t2i_ratio=0.9, mmu_ratio=0.05, lm_ratio=0.05)
    c.data.batch_size = 16
    c.data.weights = only_categories(c.data)
    c.optim.update(learning_rate=1e-3, warmup_steps=100, weight_decay=0.01)
    c.sampling.update(sample_steps=32)
    c.train.update(steps=4000, log_every=100, checkpoint_every=1000)
    c.eval.update(images_per_category=32, num_understanding=64)
    return c


def paper_config() -> ml_collections.ConfigDict:
    """Show-o at 256 px: a Phi-1.5-shaped decoder (24 layers, d 2048, 32 heads,
    QK-norm; SwiGLU 5504 wide, as many MLP weights as Phi's GELU 8192), the
    Phi/CodeGen text vocabulary (50,295), 8192 LFQ codes at 16x down (256 tokens).

    Training needs --config.tokenizer.path (a SentencePiece model of that size)
    and the LFQ tokenizer run (--config.image_tokenizer.workdir; trained first if empty)."""
    c = recipe_sections(base_config())
    c.model.update(num_layers=24, d_model=2048, num_heads=32, num_kv_heads=32, head_dim=64, mlp_dim=5504,
                   dtype="bfloat16", remat="full")
    c.tokenizer.update(kind="sentencepiece", path="phi_tokenizer.model", vocab_size=50295)
    c.image.resolution = 256
    c.image_tokenizer = with_workdir(image_tokenizer.showo_config())
    c.showo.update(max_text_len=128, t2i_ratio=0.6, mmu_ratio=0.2, lm_ratio=0.2)
    c.sampling.update(sample_steps=16, guidance_scale=1.75)
    c.data.batch_size = 512
    c.optim.update(learning_rate=1e-4, warmup_steps=5000, weight_decay=0.01, b2=0.999)
    c.train.update(steps=500_000, log_every=100, checkpoint_every=5000)
    c.mesh.shape.update(data=1, fsdp=-1, tensor=1)
    return c
