"""Discrete image tokenizer configs (VQ or LFQ), trained on their own and loaded by recipes."""

from __future__ import annotations

import ml_collections

from unimm.configs.common import image_run_config
from unimm.objectives import settings
from unimm.tokenizers.image import ImageTokenizerSettings


def tokenizer_section(**overrides) -> ml_collections.ConfigDict:
    """config.image_tokenizer: defaults from ImageTokenizerSettings, then `overrides`."""
    section = settings.defaults(ImageTokenizerSettings, exclude=("resolution",))
    section.update(overrides)
    return section


def tiny_config() -> ml_collections.ConfigDict:
    """32 px scenes -> 8x8 codes (4x down) from a 256-entry codebook; a few minutes on a CPU.

    The encoder codes each 4x4 tile from its own pixels (encoder='patch'): the
    scenes are three-quarters blank canvas, which a conv encoder spreads over
    ~130-165 codes by context, and Show-o would have to guess among them."""
    c = image_run_config("image_tokenizer")
    c.image_tokenizer = tokenizer_section(encoder="patch")
    c.train.update(steps=700, log_every=50, checkpoint_every=350)
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
