"""Classifier-free guidance: the two conventions the recipes use, and the row
doubling that computes conditional and unconditional predictions in one batch.

- `cfg`  (Ho & Salimans): uncond + w (cond - uncond) = w cond - (w - 1) uncond.
  w = 1 is the conditional prediction. Transfusion (noise), JanusFlow
  (velocities), Janus-Pro (logits).
- `muse` (MUSE, Show-o): (1 + s) cond - s uncond. s = 0 is the conditional
  prediction; s equals w - 1 of the `cfg` convention.

Batched guidance puts B conditional rows first and their B unconditional rows
after them (prefixes, caches, inputs alike), so one model call serves both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CONVENTIONS = ("cfg", "muse")


def check(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown guidance convention {convention!r}; choose from {CONVENTIONS}")
    return convention


def guide(cond: jax.Array, uncond: jax.Array, scale: float, convention: str = "cfg") -> jax.Array:
    """Combine conditional and unconditional predictions at `scale`."""
    if check(convention) == "muse":
        return (1.0 + scale) * cond - scale * uncond
    return uncond + scale * (cond - uncond)


def is_conditional(scale: float, convention: str = "cfg") -> bool:
    """Whether `scale` returns the conditional prediction unchanged (no unconditional call needed)."""
    return scale == (0.0 if check(convention) == "muse" else 1.0)


def double(x: jax.Array) -> jax.Array:
    """The same inputs for the conditional and the unconditional rows: (B, ...) -> (2B, ...)."""
    return jnp.concatenate([x, x])


def combine(both: jax.Array, scale: float, convention: str = "cfg") -> jax.Array:
    """Guided prediction (B, ...) from a doubled batch (2B, ...): conditional rows first."""
    b = both.shape[0] // 2
    return guide(both[:b], both[b:], scale, convention)
