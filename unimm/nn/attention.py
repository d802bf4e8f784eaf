"""Attention: the one mask builder every recipe uses, two implementations, GQA, RoPE, KV cache.

Masks are built from per-token metadata rather than indices, so the same rule
serves training, prefill and cached decoding:

  segment   document id; 0 marks padding (attends to nothing, seen by nothing)
  span      image-span id; 0 for text. Tokens of one span see each other fully
  position  position within the document (also drives RoPE)
  rope      optional (B, T, A) RoPE positions over A axes (multimodal RoPE);
            None: RoPE by `position`. An image token may carry (start, start +
            row, start + col), so attention inside the image sees 2D offsets;
            text carries (p, p, p), which rotates exactly as 1D RoPE at p.

A query q may attend to key k iff they share a non-zero segment and either
k is not later than q (causal) or both lie in the same non-zero span
(bidirectional inside an image). Causal decoding, Transfusion's and Show-o's
image spans, and packing all follow from the metadata alone.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from unimm.nn import axes as ax
from unimm.nn.layers import LayerNorm, Linear, RMSNorm

IMPLEMENTATIONS = ("xla", "dot_product_attention")


def attention_mask(q_segment, q_span, q_position, kv_segment, kv_span, kv_position) -> jax.Array:
    """Boolean mask (B, 1, T, S): may query t attend to key s."""
    same_doc = (q_segment[:, :, None] == kv_segment[:, None, :]) & (q_segment[:, :, None] != 0)
    causal = kv_position[:, None, :] <= q_position[:, :, None]
    same_span = (q_span[:, :, None] == kv_span[:, None, :]) & (q_span[:, :, None] != 0)
    return (same_doc & (causal | same_span))[:, None]


def rope(x: jax.Array, positions: jax.Array, theta: float, rotary_dim: Optional[int] = None) -> jax.Array:
    """Rotary embedding on (B, T, H, D) by integer positions (B, T); half-split layout.

    `rotary_dim` < D rotates only the first rotary_dim channels and passes the rest
    through (Phi's partial rotary embedding).

    Positions (B, T, A) rotate frequency j by axis j % A: the axes interleave over
    the spectrum, so each gets high and low frequencies (a contiguous split, as in
    Qwen2-VL's M-RoPE, would leave the last axes only slow ones). Equal positions
    on every axis give exactly 1D RoPE."""
    if rotary_dim is not None and rotary_dim < x.shape[-1]:
        return jnp.concatenate([rope(x[..., :rotary_dim], positions, theta), x[..., rotary_dim:]], axis=-1)
    d = x.shape[-1]
    freqs = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
    if positions.ndim == 3:
        positions = positions[..., jnp.arange(d // 2) % positions.shape[-1]]  # (B, T, D/2)
        angles = positions.astype(jnp.float32) * freqs
    else:
        angles = positions[..., None].astype(jnp.float32) * freqs  # (B, T, D/2)
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _xla_attention(q, k, v, mask, scale):
    """Reference: explicit softmax(q k^T) v with grouped KV heads. q (B,T,N,D), k/v (B,S,K,D)."""
    b, t, n, d = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, n, d)


def dot_product_attention(q, k, v, mask, impl: str = "xla"):
    """Attention of q (B,T,N,D) over k, v (B,S,K,D) under a boolean mask (B,1,T,S)."""
    scale = q.shape[-1] ** -0.5
    if impl == "xla":
        return _xla_attention(q, k, v, mask, scale)
    if impl == "dot_product_attention":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    raise ValueError(f"unknown attention implementation {impl!r}; choose from {IMPLEMENTATIONS}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Meta:
    """Per-token metadata: segment, span, position, each (B, T) int32; optional
    RoPE positions (B, T, A) (see the module docstring)."""

    segment: jax.Array
    span: jax.Array
    position: jax.Array
    rope: Optional[jax.Array] = None

    def with_grid_rope(self, patch_index: jax.Array, width: int) -> "Meta":
        """2D RoPE positions for tokens that are patches of a `width`-wide grid.

        patch_index (B, T): the patch's raster index, or -1 for a text token.
        Patch i at sequence position p (its image starting at s = p - i) gets
        (s, s + row, s + col); text keeps (p, p, p)."""
        p = self.position
        i = jnp.maximum(patch_index, 0)
        s = p - i
        grid = jnp.stack([s, s + i // width, s + i % width], axis=-1)
        return dataclasses.replace(self, rope=jnp.where((patch_index >= 0)[..., None], grid, p[..., None]))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys/values of all layers plus the metadata of the cached tokens.

    k, v: (layers, B, S, K, D). segment/span/position: (B, S); empty slots have
    segment 0, so they are masked out. `end` (B,) is the next free slot per row;
    rows fill independently, so prompts of different lengths share one cache.
    """

    k: jax.Array
    v: jax.Array
    segment: jax.Array
    span: jax.Array
    position: jax.Array
    end: jax.Array

    @classmethod
    def empty(cls, num_layers: int, batch: int, length: int, kv_heads: int, head_dim: int, dtype=jnp.float32):
        z = jnp.zeros((num_layers, batch, length, kv_heads, head_dim), dtype)
        zi = jnp.zeros((batch, length), jnp.int32)
        return cls(z, z, zi, zi, zi, jnp.zeros((batch,), jnp.int32))

    @property
    def length(self) -> int:
        return self.segment.shape[1]

    @property
    def meta(self) -> Meta:
        return Meta(self.segment, self.span, self.position)

    def stack_rows(self, other: "KVCache") -> "KVCache":
        """This cache's rows, then `other`'s (e.g. conditional then unconditional prefixes for guidance)."""
        if self.length != other.length:
            raise ValueError(f"caches of {self.length} and {other.length} slots cannot share a batch")
        cat = lambda a, b, axis: jnp.concatenate([a, b], axis=axis)
        return KVCache(cat(self.k, other.k, 1), cat(self.v, other.v, 1), cat(self.segment, other.segment, 0),
                       cat(self.span, other.span, 0), cat(self.position, other.position, 0),
                       cat(self.end, other.end, 0))

    def append_meta(self, meta: Meta) -> tuple["KVCache", jax.Array]:
        """Record the metadata of T new tokens; returns (cache, their slots (B, T)).

        Rows are right-padded: a row's tokens of segment 0 are written but do
        not advance its `end`, so its next write overwrites them. Slots past
        the cache length are dropped; callers check lengths beforehand.
        """
        t = meta.segment.shape[1]
        slots = self.end[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        rows = jnp.arange(slots.shape[0])[:, None]
        put = lambda a, x: a.at[rows, slots].set(x, mode="drop")
        new = dataclasses.replace(
            self, segment=put(self.segment, meta.segment), span=put(self.span, meta.span),
            position=put(self.position, meta.position),
            end=self.end + (meta.segment != 0).sum(1).astype(jnp.int32))
        return new, slots


def write_kv(cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array, slots: jax.Array):
    """Write one layer's new keys/values (B, t, K, D) at `slots` (B, t)."""
    rows = jnp.arange(k.shape[0])[:, None]
    return (cache_k.at[rows, slots].set(k.astype(cache_k.dtype), mode="drop"),
            cache_v.at[rows, slots].set(v.astype(cache_v.dtype), mode="drop"))


class Attention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *, rngs: nnx.Rngs,
                 qk_norm: bool = False, rope_theta: float = 10000.0, impl: str = "xla",
                 dtype=jnp.float32, param_dtype=jnp.float32, norm_eps: float = 1e-6, out_init_scale: float = 1.0,
                 use_bias: bool = False, rotary_dim: Optional[int] = None, norm: str = "rms"):
        """`use_bias`: biases on the q/k/v/o projections (Phi); `rotary_dim`: channels of
        each head that RoPE rotates (None: all); `norm`: the QK-norm's kind, 'rms' or
        'layer' (LayerNorm with bias, Phi's qk_layernorm)."""
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"unknown attention implementation {impl!r}; choose from {IMPLEMENTATIONS}")
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias)
        self.q = Linear(dim, (num_heads, head_dim), ("embed", "heads", "head_dim"), **kw)
        self.kv = Linear(dim, (2, num_kv_heads, head_dim), ("embed", None, "kv_heads", "head_dim"), **kw)
        self.o = Linear((num_heads, head_dim), dim, ("heads", "head_dim", "embed"), init_scale=out_init_scale, **kw)
        norm_cls = {"rms": RMSNorm, "layer": LayerNorm}[norm]
        self.q_norm = norm_cls(head_dim, eps=norm_eps, param_dtype=param_dtype) if qk_norm else None
        self.k_norm = norm_cls(head_dim, eps=norm_eps, param_dtype=param_dtype) if qk_norm else None
        self.rope_theta, self.impl, self.rotary_dim = rope_theta, impl, rotary_dim

    def __call__(self, x: jax.Array, meta: Meta, kv: Optional[tuple] = None,
                 kv_meta: Optional[Meta] = None, slots: Optional[jax.Array] = None):
        """x (B, T, E), `meta` its tokens' metadata.

        - kv None: attend within x.
        - kv = this layer's cached (keys, values), `slots` given: write the new
          keys/values at `slots` (B, T) and attend over the whole cache, whose
          metadata `kv_meta` already includes the new tokens.
        - kv given, slots None: read-only; attend over cached + new tokens,
          `kv_meta` describing the cached ones. Nothing is written.

        Returns (y, updated (keys, values) or None).
        """
        q = ax.constrain(self.q(x), ("batch", "length", "act_heads", None))
        kvp = self.kv(x)
        k, v = kvp[:, :, 0], kvp[:, :, 1]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        rp = meta.position if meta.rope is None else meta.rope
        q, k = rope(q, rp, self.rope_theta, self.rotary_dim), rope(k, rp, self.rope_theta, self.rotary_dim)
        k = ax.constrain(k, ("batch", "length", "act_kv_heads", None))
        new_kv = None
        if kv is None:
            keys, values, kmeta = k, v, meta
        elif slots is not None:
            keys, values = write_kv(*kv, k, v, slots)
            new_kv, kmeta = (keys, values), kv_meta
        else:
            keys = jnp.concatenate([kv[0].astype(k.dtype), k], axis=1)
            values = jnp.concatenate([kv[1].astype(v.dtype), v], axis=1)
            kmeta = Meta(*(jnp.concatenate([a, b], axis=1) for a, b in
                           ((kv_meta.segment, meta.segment), (kv_meta.span, meta.span),
                            (kv_meta.position, meta.position))))
        mask = attention_mask(meta.segment, meta.span, meta.position, kmeta.segment, kmeta.span, kmeta.position)
        out = dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask, self.impl)
        out = ax.constrain(out, ("batch", "length", "act_heads", None))
        return self.o(out), new_kv
