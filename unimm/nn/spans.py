"""Image spans in a token sequence: where an image's N tokens sit, placing them
into the sequence and gathering the decoder's outputs back, and the metadata of
a span on its own (a denoising or unmasking step run against a cached prefix).

A row holds up to k images; image j starts at `start[:, j]`, and `valid[:, j]`
says whether it exists. Slots of missing images point past the sequence, so
placing drops them and gathering reads a harmless clamped position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unimm.nn.attention import Meta


def slots(start: jax.Array, valid: jax.Array, n: int, length: int) -> jax.Array:
    """Sequence positions (B, k * n) of the tokens of k images of n tokens each."""
    first = jnp.where(valid, start, length)
    return (first[:, :, None] + jnp.arange(n, dtype=jnp.int32)[None, None, :]).reshape(first.shape[0], -1)


def place(x: jax.Array, where: jax.Array, values: jax.Array) -> jax.Array:
    """x (B, L, ...) with values (B, k * n, ...) written at `where` (B, k * n); out-of-range slots are dropped."""
    rows = jnp.arange(x.shape[0])[:, None]
    return x.at[rows, where].set(values.astype(x.dtype), mode="drop")


def gather(h: jax.Array, where: jax.Array) -> jax.Array:
    """h (B, L, ...) at `where` (B, k * n) -> (B, k * n, ...)."""
    rows = jnp.arange(h.shape[0])[:, None]
    return h[rows, jnp.minimum(where, h.shape[1] - 1)]


def token_maps(where: jax.Array, n: int, length: int) -> tuple[jax.Array, jax.Array]:
    """Per sequence position (B, L): the index of the token inside its image
    (0..n-1) and the index of its image (0..k-1); -1 for text."""
    b, kn = where.shape
    inside = jnp.tile(jnp.arange(n, dtype=jnp.int32), kn // n)
    image = jnp.repeat(jnp.arange(kn // n, dtype=jnp.int32), n)
    empty = jnp.full((b, length), -1, jnp.int32)
    return place(empty, where, jnp.broadcast_to(inside, (b, kn))), place(empty, where, jnp.broadcast_to(image, (b, kn)))


def span_meta(start: jax.Array, n: int, active: jax.Array, span_id: int = 1) -> Meta:
    """Metadata of an image span of n tokens alone, starting at position `start` (B,):
    one bidirectional span; rows that are not `active` get segment 0 (they see
    and write nothing)."""
    b = start.shape[0]
    seg = jnp.broadcast_to(active.astype(jnp.int32)[:, None], (b, n))
    pos = start[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]
    return Meta(seg, seg * span_id, pos)
