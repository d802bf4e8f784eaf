"""Reconstruction metrics and pictures for image autoencoders and tokenizers."""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np

from unimm.data.grid import make_grid


def psnr(x, y):
    """PSNR in dB of images in [-1, 1], per image."""
    mse = jnp.mean(((x - y) / 2.0) ** 2, axis=tuple(range(1, x.ndim)))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def save_grid(path: pathlib.Path, originals: np.ndarray, reconstructions: np.ndarray, n: int = 8) -> None:
    """Originals above their reconstructions (uint8 images), `n` of each."""
    n = min(n, len(originals))
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(list(originals[:n]) + list(reconstructions[:n]), ["original"] * n + ["reconstruction"] * n,
              cols=n).save(path)
