"""KL-VAE, tiny: a continuous image autoencoder for 32 px scenes (4x down, 4 latent channels).

    python -m unimm.main --config=configs/vae_tiny.py --workdir=workdir/vae_tiny

A Transfusion run then diffuses in its latent space (8x8x4 latents, patch 2; the
latent scale and range come from this run's evaluation):

    python -m unimm.main --config=configs/transfusion_tiny.py --workdir=workdir/tf_latent \
        --config.image.latent=kl_vae --config.image.autoencoder.workdir=workdir/vae_tiny \
        --config.image.patch_size=2 --config.image.unet_channels=64,128
"""

from unimm.configs.kl_vae import tiny_config


def get_config():
    return tiny_config()
