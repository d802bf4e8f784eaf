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
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm.data.pipeline import EvalSet
from unimm.eval.reconstruction import psnr, save_grid, to_uint8
from unimm.nn import flops as flops_lib
from unimm.nn.autoencoder import KLAutoencoder
from unimm.objectives.base import ArraySpec, Objective, Stream


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


class KLVAE(Objective):
    name = "kl_vae"

    def __init__(self, config, shapes_only: bool = False):
        super().__init__(config, shapes_only)
        self.s = AutoencoderSettings.from_config(config)

    @property
    def resolution(self) -> int:
        return self.s.resolution

    def make_model(self, rngs: nnx.Rngs) -> KLAutoencoder:
        return self.s.make(rngs)

    def example_spec(self):
        r = self.s.resolution
        return {"images": ArraySpec((r, r, 3), np.uint8, ("batch", None, None, None))}

    def streams(self):
        return [Stream("images", 1.0, lambda exs, rng: {"images": exs[0]["image"]})]

    def synthetic_batch(self, batch_size: int, seed: int = 0):
        r = self.s.resolution
        return {"images": np.random.default_rng(seed).integers(0, 256, (batch_size, r, r, 3), dtype=np.uint8)}

    def loss(self, model, batch, rng):
        x = batch["images"].astype(jnp.float32) / 127.5 - 1.0
        z, _, kl = model.encode(x, rng)
        rec = model.decode(z)
        l1 = jnp.mean(jnp.abs(rec - x))
        loss = l1 + self.s.kl_weight * jnp.mean(kl)
        return loss, {"l1": l1, "kl": jnp.mean(kl), "psnr": jnp.mean(psnr(jnp.clip(rec, -1, 1), x))}

    def tokens_per_batch(self, batch) -> int:
        return int(np.prod(np.asarray(batch["images"]).shape[:3]))  # pixels

    @functools.cached_property
    def _forward_flops(self) -> float:
        graphdef, state = nnx.split(nnx.eval_shape(lambda: self.make_model(nnx.Rngs(0))))
        r = self.s.resolution

        def run(state, x):
            m = nnx.merge(graphdef, state)
            return m.decode(m.encode(x)[0])

        return flops_lib.xla_flops(run, state, jax.ShapeDtypeStruct((1, r, r, 3), jnp.float32))

    def flops_per_batch(self, batch) -> float:
        return flops_lib.TRAIN_MULTIPLIER * len(batch["images"]) * self._forward_flops

    def evaluate(self, model, step, rng, workdir=None) -> dict:
        e = self.config.eval
        exs = EvalSet.make(self.config.data, self.s.resolution, e.num_understanding).examples
        images = np.stack([x["image"] for x in exs])
        graphdef, params = nnx.split(model)
        rec, z, p = _reconstruct(graphdef, params, images)
        record = {"step": step, "psnr": float(jnp.mean(p)), "latent_std": float(jnp.std(z)),
                  "latent_scale": float(1.0 / jnp.maximum(jnp.std(z), 1e-6)), "n": len(exs)}
        if workdir is not None:
            from unimm.eval.harness import write_record

            workdir = pathlib.Path(workdir)
            write_record(workdir, step, record)
            save_grid(workdir / "samples" / f"step_{step:06d}.png", images, to_uint8(rec))
        return record

    def format_eval(self, record):
        return (f"reconstruction PSNR {record['psnr']:.2f} dB; latent std {record['latent_std']:.3f} "
                f"(latent_scale {record['latent_scale']:.3f}); n={record['n']}")

    def flatten_eval(self, record):
        return {k: record[k] for k in ("psnr", "latent_std")}


OBJECTIVE = KLVAE
