"""KL-VAE configs (the continuous image autoencoder latent-diffusion recipes use)."""

from __future__ import annotations

import ml_collections

from unimm.configs.common import image_run_config
from unimm.objectives import settings
from unimm.objectives.kl_vae import AutoencoderSettings


def autoencoder_section(**overrides) -> ml_collections.ConfigDict:
    """config.autoencoder: defaults from AutoencoderSettings, then `overrides`."""
    section = settings.defaults(AutoencoderSettings, exclude=("resolution",))
    section.update(overrides)
    return section


def tiny_config() -> ml_collections.ConfigDict:
    """32 px scenes -> 8x8x4 latents (4x down); trains in a few minutes on a CPU."""
    c = image_run_config("kl_vae")
    c.autoencoder = autoencoder_section(channels=(32, 64, 128))
    c.train.update(steps=1000, log_every=50, checkpoint_every=500)
    return c


def sd_config() -> ml_collections.ConfigDict:
    """The 8x-down, 8-channel latent space of the paper-sized Transfusion (256 px -> 32x32x8)."""
    c = tiny_config()
    c.image.resolution = 256
    c.autoencoder.update(channels=(128, 256, 512, 512), latent_channels=8, blocks=2)
    c.data.batch_size = 64
    c.optim.learning_rate = 4.5e-6 * 64
    c.train.update(steps=200_000, log_every=100, checkpoint_every=5000)
    return c
