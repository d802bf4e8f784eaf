"""The discrete image tokenizer (VQ or LFQ), trained by its own config.

    python -m unimm.main --config=configs/vq_tiny.py

Loss = L1 reconstruction + the quantizer's loss (commitment; codebook loss for
gradient-trained VQ; entropy penalty for LFQ). No adversarial or perceptual
terms: both need pretrained networks we do not have offline. Evaluation reports
reconstruction PSNR and codebook usage (the fraction of codes the evaluation
images use, and the perplexity of their code distribution).
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm.data.pipeline import EvalSet
from unimm.eval.reconstruction import psnr, save_grid, to_uint8
from unimm.nn import flops as flops_lib
from unimm.objectives.base import ArraySpec, Objective, Stream
from unimm.tokenizers.image import ImageTokenizer, ImageTokenizerSettings


def settings_from_config(config) -> ImageTokenizerSettings:
    return ImageTokenizerSettings.from_dict(dict(config.image_tokenizer), config.image.resolution)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _reconstruct(graphdef, params, images):
    model = nnx.merge(graphdef, params)
    x = images.astype(jnp.float32) / 127.5 - 1.0
    codes = model.tokenize(images)
    rec = jnp.clip(model.detokenize(codes), -1.0, 1.0)
    return rec, codes, psnr(rec, x)


def codebook_usage(codes: np.ndarray, codebook_size: int) -> dict:
    """Fraction of the codebook that `codes` use, and the perplexity of their distribution."""
    counts = np.bincount(np.asarray(codes).reshape(-1), minlength=codebook_size).astype(np.float64)
    p = counts / counts.sum()
    nz = p[p > 0]
    return {"usage": float((counts > 0).mean()), "perplexity": float(np.exp(-(nz * np.log(nz)).sum()))}


class ImageTokenizerObjective(Objective):
    name = "image_tokenizer"

    def __init__(self, config, shapes_only: bool = False):
        super().__init__(config, shapes_only)
        self.s = settings_from_config(config)

    @property
    def resolution(self) -> int:
        return self.s.resolution

    def make_model(self, rngs: nnx.Rngs) -> ImageTokenizer:
        return ImageTokenizer(self.s, rngs=rngs)

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
        rec, _, aux = model(x, train=True, rng=rng)
        l1 = jnp.mean(jnp.abs(rec - x))
        metrics = {"l1": l1, "psnr": jnp.mean(psnr(jnp.clip(rec, -1, 1), x))}
        metrics.update({f"quantizer/{k}": v for k, v in aux.items() if k != "loss"})
        return l1 + aux["loss"], metrics

    def tokens_per_batch(self, batch) -> int:
        return int(np.prod(np.asarray(batch["images"]).shape[:3]))  # pixels

    @functools.cached_property
    def _forward_flops(self) -> float:
        graphdef, state = nnx.split(nnx.eval_shape(lambda: self.make_model(nnx.Rngs(0))))
        r = self.s.resolution

        def run(state, x):
            return nnx.merge(graphdef, state)(x)[0]

        return flops_lib.xla_flops(run, state, jax.ShapeDtypeStruct((1, r, r, 3), jnp.float32))

    def flops_per_batch(self, batch) -> float:
        return flops_lib.TRAIN_MULTIPLIER * len(batch["images"]) * self._forward_flops

    def evaluate(self, model, step, rng, workdir=None) -> dict:
        e = self.config.eval
        exs = EvalSet.make(self.config.data, self.s.resolution, e.num_understanding).examples
        images = np.stack([x["image"] for x in exs])
        graphdef, params = nnx.split(model)
        rec, codes, p = _reconstruct(graphdef, params, images)
        record = {"step": step, "psnr": float(jnp.mean(p)), **codebook_usage(np.asarray(codes), self.s.codebook_size),
                  "codebook_size": self.s.codebook_size, "n": len(exs)}
        if workdir is not None:
            from unimm.eval.harness import write_record

            workdir = pathlib.Path(workdir)
            write_record(workdir, step, record)
            save_grid(workdir / "samples" / f"step_{step:06d}.png", images, to_uint8(rec))
        return record

    def format_eval(self, record):
        return (f"reconstruction PSNR {record['psnr']:.2f} dB; codebook usage {record['usage']:.1%} of "
                f"{record['codebook_size']} codes (perplexity {record['perplexity']:.1f}); n={record['n']}")

    def flatten_eval(self, record):
        return {k: record[k] for k in ("psnr", "usage", "perplexity")}


OBJECTIVE = ImageTokenizerObjective
