"""KL-VAE, tiny: a continuous image autoencoder for 32 px scenes (4x down, 4 latent channels).

    python -m unimm.main --config=configs/vae_tiny.py --workdir=workdir/vae_tiny

A Transfusion run then diffuses in its latent space with
--config.image.latent=kl_vae --config.image.autoencoder=workdir/vae_tiny
--config.image.autoencoder_channels=32,64,128 --config.image.latent_channels=4
--config.image.latent_scale=<latent_scale from the VAE's eval>.
"""

from unimm.configs.kl_vae import tiny_config


def get_config():
    return tiny_config()
