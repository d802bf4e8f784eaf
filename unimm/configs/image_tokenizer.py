"""Discrete image tokenizer configs (VQ or LFQ), trained on their own and loaded by recipes."""

from __future__ import annotations

import ml_collections

from unimm.configs.common import base_config


def tokenizer_section(**overrides) -> ml_collections.ConfigDict:
    s = dict(channels=(32, 64, 128), blocks=1, encoder="conv", quantizer="vq", codebook_size=256, code_dim=16,
             beta=0.25, ema_decay=0.99, restart_threshold=0.03, usage_decay=0.9, entropy_weight=0.1,
             diversity_weight=1.0, temperature=0.1)
    s.update(overrides)
    return ml_collections.ConfigDict(s)


def tiny_config() -> ml_collections.ConfigDict:
    """32 px scenes -> 8x8 codes (4x down) from a 256-entry codebook; a few minutes on a CPU.

    The encoder codes each 4x4 tile from its own pixels (encoder='patch'): the
    scenes are three-quarters blank canvas, which a conv encoder spreads over
    ~130-165 codes by context, and Show-o would have to guess among them."""
    c = base_config()
    c.objective = "image_tokenizer"
    c.image = ml_collections.ConfigDict(dict(resolution=32))
    c.image_tokenizer = tokenizer_section(encoder="patch")
    c.data.batch_size = 32
    c.optim.update(learning_rate=1e-3, warmup_steps=50, weight_decay=0.0, b2=0.99)
    c.train.update(steps=700, log_every=50, checkpoint_every=350)
    c.eval.update(num_understanding=64)
    return c


def showo_config() -> ml_collections.ConfigDict:
    """Show-o's MAGVIT-v2-style tokenizer: LFQ with 8192 codes, 16x down (256 px -> 16x16 tokens)."""
    c = tiny_config()
    c.image.resolution = 256
    c.image_tokenizer = tokenizer_section(channels=(128, 128, 256, 256, 512), blocks=2, quantizer="lfq",
                                          codebook_size=8192)
    c.data.batch_size = 256
    c.optim.update(learning_rate=1e-4, warmup_steps=1000)
    c.train.update(steps=200_000, log_every=100, checkpoint_every=5000)
    return c
