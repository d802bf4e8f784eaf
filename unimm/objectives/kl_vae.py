"""The KL-regularised image autoencoder (latent diffusion's VAE), trained by its own config.

    python -m unimm.main --config=configs/vae_tiny.py

Loss = L1 reconstruction + kl_weight * KL(q(z|x) || N(0, I)) (no adversarial or
perceptual terms: both need pretrained networks we do not have offline).
Evaluation reports reconstruction PSNR, the latent standard deviation, whose
inverse is the `latent_scale` a diffusion recipe should use, and the largest
|latent| (`latent_max`), the range a sampler clips its clean-latent estimates to.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm.eval.reconstruction import psnr
from unimm.nn import pixels
from unimm.nn.autoencoder import KLAutoencoder
from unimm.objectives.images_only import ImagesOnlyObjective


@dataclasses.dataclass(frozen=True)
class AutoencoderSettings:
    resolution: int = 32
    image_channels: int = 3
    channels: tuple = (32, 64)
    latent_channels: int = 4
    blocks: int = 1
    kl_weight: float = 1e-6

    @classmethod
    def from_config(cls, config) -> "AutoencoderSettings":
        merged = dict(config.autoencoder)
        merged["resolution"] = config.image.resolution
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(f"unknown autoencoder settings {unknown}; known: {sorted(known)}")
        merged["channels"] = tuple(merged.get("channels", cls.channels))
        s = cls(**merged)
        f = 2 ** (len(s.channels) - 1)
        if s.resolution % f:
            raise ValueError(f"image.resolution={s.resolution} is not divisible by the autoencoder's "
                             f"downsampling factor {f}")
        return s

    def make(self, rngs: nnx.Rngs, dtype=jnp.float32) -> KLAutoencoder:
        return KLAutoencoder(self.channels, self.latent_channels, rngs=rngs, image_channels=self.image_channels,
                             blocks=self.blocks, dtype=dtype)


class KLVAE(ImagesOnlyObjective):
    name = "kl_vae"

    def __init__(self, config, shapes_only: bool = False):
        super().__init__(config, shapes_only)
        self.s = AutoencoderSettings.from_config(config)

    def make_model(self, rngs: nnx.Rngs) -> KLAutoencoder:
        return self.s.make(rngs)

    def reconstruct(self, model, x):
        z = model.encode(x)[0]
        return model.decode(z), z

    def loss(self, model, batch, rng):
        x = pixels.to_signed(batch["images"])
        z, _, kl = model.encode(x, rng)
        rec = model.decode(z)
        l1 = jnp.mean(jnp.abs(rec - x))
        loss = l1 + self.s.kl_weight * jnp.mean(kl)
        return loss, {"l1": l1, "kl": jnp.mean(kl), "psnr": jnp.mean(psnr(jnp.clip(rec, -1, 1), x))}

    def latent_stats(self, z):
        std = float(np.std(z))
        return {"latent_std": std, "latent_scale": 1.0 / max(std, 1e-6), "latent_max": float(np.abs(z).max())}

    def format_eval(self, record):
        return (f"reconstruction PSNR {record['psnr']:.2f} dB; latent std {record['latent_std']:.3f} "
                f"(latent_scale {record['latent_scale']:.3f}, max |z| {record.get('latent_max', float('nan')):.2f}); "
                f"n={record['n']}")

    def flatten_eval(self, record):
        return {k: record[k] for k in ("psnr", "latent_std")}


OBJECTIVE = KLVAE
