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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm.eval.reconstruction import psnr
from unimm.objectives.images_only import ImagesOnlyObjective
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


class ImageTokenizerObjective(ImagesOnlyObjective):
    name = "image_tokenizer"

    def __init__(self, config, shapes_only: bool = False):
        super().__init__(config, shapes_only)
        self.s = settings_from_config(config)

    def make_model(self, rngs: nnx.Rngs) -> ImageTokenizer:
        return ImageTokenizer(self.s, rngs=rngs)

    def forward(self, model, x):
        return model(x)[0]

    def loss(self, model, batch, rng):
        x = batch["images"].astype(jnp.float32) / 127.5 - 1.0
        rec, _, aux = model(x, train=True, rng=rng)
        l1 = jnp.mean(jnp.abs(rec - x))
        metrics = {"l1": l1, "psnr": jnp.mean(psnr(jnp.clip(rec, -1, 1), x))}
        metrics.update({f"quantizer/{k}": v for k, v in aux.items() if k != "loss"})
        return l1 + aux["loss"], metrics

    def evaluate(self, model, step, rng, workdir=None) -> dict:
        images = self.eval_images()
        rec, codes, p = _reconstruct(*nnx.split(model), images)
        record = {"step": step, "psnr": float(jnp.mean(p)), **codebook_usage(np.asarray(codes), self.s.codebook_size),
                  "codebook_size": self.s.codebook_size, "n": len(images)}
        self.write_eval(workdir, step, record, images, rec)
        return record

    def format_eval(self, record):
        return (f"reconstruction PSNR {record['psnr']:.2f} dB; codebook usage {record['usage']:.1%} of "
                f"{record['codebook_size']} codes (perplexity {record['perplexity']:.1f}); n={record['n']}")

    def flatten_eval(self, record):
        return {k: record[k] for k in ("psnr", "usage", "perplexity")}


OBJECTIVE = ImageTokenizerObjective
