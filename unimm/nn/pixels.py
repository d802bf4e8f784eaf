"""Image range conversion: uint8 pixels <-> floats in [-1, 1], the range every
image model here reads and writes."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def to_signed(images) -> jax.Array:
    """uint8 pixels (any shape) -> float32 in [-1, 1]."""
    return jnp.asarray(images).astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x) -> jax.Array:
    """Floats in [-1, 1] (values outside are clipped) -> uint8 pixels, rounded."""
    return jnp.clip(jnp.round((jnp.asarray(x, jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
