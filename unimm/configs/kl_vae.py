"""KL-VAE configs (the continuous image autoencoder latent-diffusion recipes use)."""

from __future__ import annotations

import ml_collections

from unimm.configs.common import base_config


def tiny_config() -> ml_collections.ConfigDict:
    """32 px scenes -> 8x8x4 latents (4x down); trains in a few minutes on a CPU."""
    c = base_config()
    c.objective = "kl_vae"
    c.image = ml_collections.ConfigDict(dict(resolution=32))
    c.autoencoder = ml_collections.ConfigDict(dict(channels=(32, 64, 128), latent_channels=4, blocks=1,
                                                   kl_weight=1e-6))
    c.data.batch_size = 32
    c.optim.update(learning_rate=1e-3, warmup_steps=50, weight_decay=0.0, b2=0.99)
    c.train.update(steps=1000, log_every=50, checkpoint_every=500)
    c.eval.update(num_understanding=64)
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
