"""The discrete image tokenizer (VQ or LFQ), trained by its own config.

    python -m unimm.main --config=configs/vq_tiny.py

Loss = L1 reconstruction + the quantizer's loss (commitment; codebook loss for
gradient-trained VQ; entropy penalty for LFQ). No adversarial or perceptual
terms: both need pretrained networks we do not have offline. Evaluation reports
reconstruction PSNR and codebook usage (the fraction of codes the evaluation
images use, and the perplexity of their code distribution).
"""

from __future__ import annotations


import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm.eval.reconstruction import psnr
from unimm.nn import pixels
from unimm.objectives.images_only import ImagesOnlyObjective
from unimm.tokenizers.image import ImageTokenizer, ImageTokenizerSettings


def settings_from_config(config) -> ImageTokenizerSettings:
    return ImageTokenizerSettings.from_dict(dict(config.image_tokenizer), config.image.resolution)


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

    def reconstruct(self, model, x):
        return model(x)[:2]

    def loss(self, model, batch, rng):
        x = pixels.to_signed(batch["images"])
        rec, _, aux = model(x, train=True, rng=rng)
        l1 = jnp.mean(jnp.abs(rec - x))
        metrics = {"l1": l1, "psnr": jnp.mean(psnr(jnp.clip(rec, -1, 1), x))}
        metrics.update({f"quantizer/{k}": v for k, v in aux.items() if k != "loss"})
        return l1 + aux["loss"], metrics

    def latent_stats(self, codes):
        return {**codebook_usage(codes, self.s.codebook_size), "codebook_size": self.s.codebook_size}

    def format_eval(self, record):
        return (f"reconstruction PSNR {record['psnr']:.2f} dB; codebook usage {record['usage']:.1%} of "
                f"{record['codebook_size']} codes (perplexity {record['perplexity']:.1f}); n={record['n']}")

    def flatten_eval(self, record):
        return {k: record[k] for k in ("psnr", "usage", "perplexity")}


OBJECTIVE = ImageTokenizerObjective
