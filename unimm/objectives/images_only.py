"""Shared data, FLOP and evaluation plumbing of objectives that train on images alone
(autoencoders and image tokenizers): one stream of scene images, pixels counted as tokens,
FLOPs from XLA's count of one image's forward pass, a reconstruction grid per evaluation."""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm.data.pipeline import EvalSet
from unimm.eval.reconstruction import psnr, save_grid
from unimm.nn import pixels
from unimm.nn import flops as flops_lib
from unimm.objectives.base import ArraySpec, Objective, Stream


@functools.partial(jax.jit, static_argnames=("objective", "graphdef"))
def _reconstruct(params, images, *, objective, graphdef):
    x = pixels.to_signed(images)
    rec, latent = objective.reconstruct(nnx.merge(graphdef, params), x)
    rec = jnp.clip(rec, -1.0, 1.0)
    return rec, latent, psnr(rec, x)


class ImagesOnlyObjective(Objective):
    """Subclasses set `self.s` (with a `resolution`) and define `make_model`, `loss`,
    `reconstruct(model, x)` (images in [-1, 1] -> (their reconstruction, the latent
    or codes they pass through)), `latent_stats(latent)` (what an evaluation
    reports of those) and `format_eval`/`flatten_eval`."""

    @property
    def resolution(self) -> int:
        return self.s.resolution

    def reconstruct(self, model, x: jax.Array):
        raise NotImplementedError

    def latent_stats(self, latent: np.ndarray) -> dict:
        raise NotImplementedError

    def forward(self, model, x: jax.Array) -> jax.Array:
        return self.reconstruct(model, x)[0]

    def evaluate(self, model, step, rng, workdir=None) -> dict:
        """Reconstruction PSNR of the evaluation images and the latent statistics; a grid of reconstructions."""
        images = self.eval_images()
        graphdef, params = nnx.split(model)
        rec, latent, p = _reconstruct(params, images, objective=self, graphdef=graphdef)
        record = {"step": step, "psnr": float(jnp.mean(p)), **self.latent_stats(np.asarray(latent)),
                  "n": len(images)}
        self.write_eval(workdir, step, record, images, rec)
        return record

    def example_spec(self):
        r = self.resolution
        return {"images": ArraySpec((r, r, 3), np.uint8, ("batch", None, None, None))}

    def streams(self):
        return [Stream("images", 1.0, lambda exs, rng: {"images": exs[0]["image"]})]

    def synthetic_batch(self, batch_size: int, seed: int = 0):
        r = self.resolution
        return {"images": np.random.default_rng(seed).integers(0, 256, (batch_size, r, r, 3), dtype=np.uint8)}

    def tokens_per_batch(self, batch) -> int:
        return int(np.prod(np.asarray(batch["images"]).shape[:3]))  # pixels

    @functools.cached_property
    def _forward_flops(self) -> float:
        graphdef, state = nnx.split(nnx.eval_shape(lambda: self.make_model(nnx.Rngs(0))))
        r = self.resolution
        return flops_lib.xla_flops(lambda st, x: self.forward(nnx.merge(graphdef, st), x), state,
                                   jax.ShapeDtypeStruct((1, r, r, 3), jnp.float32))

    def flops_per_batch(self, batch) -> float:
        return flops_lib.TRAIN_MULTIPLIER * len(batch["images"]) * self._forward_flops

    def eval_images(self) -> np.ndarray:
        """The evaluation scenes (config.eval.num_understanding of them), uint8."""
        exs = EvalSet.make(self.config.data, self.resolution, self.config.eval.num_understanding).examples
        return np.stack([x["image"] for x in exs])

    def write_eval(self, workdir, step: int, record: dict, images: np.ndarray, reconstructions) -> None:
        """The record (eval.jsonl, eval/) and originals above reconstructions (samples/)."""
        if workdir is None:
            return
        from unimm.eval.harness import write_record

        workdir = pathlib.Path(workdir)
        write_record(workdir, step, record)
        save_grid(workdir / "samples" / f"step_{step:06d}.png", images, np.asarray(pixels.to_uint8(reconstructions)))
