"""The KL-regularised image autoencoder (latent diffusion's VAE), trained by its own config.

    python -m unimm.main --config=configs/vae_tiny.py

Loss = L1 reconstruction + kl_weight * KL(q(z|x) || N(0, I)) (no adversarial or
perceptual terms: both need pretrained networks we do not have offline).
Evaluation reports reconstruction PSNR and the latent standard deviation,
whose inverse is the `latent_scale` a diffusion recipe should use.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from unimm.eval.reconstruction import psnr
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


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _reconstruct(graphdef, params, images):
    model = nnx.merge(graphdef, params)
    x = images.astype(jnp.float32) / 127.5 - 1.0
    z, _, _ = model.encode(x)
    rec = jnp.clip(model.decode(z), -1.0, 1.0)
    return rec, z, psnr(rec, x)


class KLVAE(ImagesOnlyObjective):
    name = "kl_vae"

    def __init__(self, config, shapes_only: bool = False):
        super().__init__(config, shapes_only)
        self.s = AutoencoderSettings.from_config(config)

    def make_model(self, rngs: nnx.Rngs) -> KLAutoencoder:
        return self.s.make(rngs)

    def forward(self, model, x):
        return model.decode(model.encode(x)[0])

    def loss(self, model, batch, rng):
        x = batch["images"].astype(jnp.float32) / 127.5 - 1.0
        z, _, kl = model.encode(x, rng)
        rec = model.decode(z)
        l1 = jnp.mean(jnp.abs(rec - x))
        loss = l1 + self.s.kl_weight * jnp.mean(kl)
        return loss, {"l1": l1, "kl": jnp.mean(kl), "psnr": jnp.mean(psnr(jnp.clip(rec, -1, 1), x))}

    def evaluate(self, model, step, rng, workdir=None) -> dict:
        images = self.eval_images()
        rec, z, p = _reconstruct(*nnx.split(model), images)
        record = {"step": step, "psnr": float(jnp.mean(p)), "latent_std": float(jnp.std(z)),
                  "latent_scale": float(1.0 / jnp.maximum(jnp.std(z), 1e-6)), "n": len(images)}
        self.write_eval(workdir, step, record, images, rec)
        return record

    def format_eval(self, record):
        return (f"reconstruction PSNR {record['psnr']:.2f} dB; latent std {record['latent_std']:.3f} "
                f"(latent_scale {record['latent_scale']:.3f}); n={record['n']}")

    def flatten_eval(self, record):
        return {k: record[k] for k in ("psnr", "latent_std")}


OBJECTIVE = KLVAE
