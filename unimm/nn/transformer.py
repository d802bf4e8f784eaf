"""Llama-style decoder: pre-norm blocks (RMSNorm, GQA attention with RoPE and
optional QK-norm, SwiGLU), stacked along a leading `layers` axis and run with
`jax.lax.scan`, so compile time does not grow with depth. Rematerialisation of
each block is chosen by `remat` policy name.

The decoder maps embeddings to hidden states; embeddings and output heads
belong to the recipe that uses it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from unimm.nn import axes as ax
from unimm.nn.attention import IMPLEMENTATIONS, Attention, KVCache, Meta
from unimm.nn.layers import RMSNorm, SwiGLU

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

REMAT_POLICIES: dict[str, Optional[Callable]] = {
    "none": None,  # keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # keep weight matmuls only
}


def dtype_of(name: str):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    num_layers: int = 2
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 16
    mlp_dim: int = 192
    qk_norm: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    attention: str = "xla"  # one of attention.IMPLEMENTATIONS
    remat: str = "none"  # one of REMAT_POLICIES

    def __post_init__(self):
        for name in ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads={self.num_heads} must be a multiple of "
                             f"model.num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim} must be even for RoPE")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"model.attention={self.attention!r}; choose from {IMPLEMENTATIONS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r}; choose from {sorted(REMAT_POLICIES)}")
        dtype_of(self.dtype), dtype_of(self.param_dtype)

    @classmethod
    def from_config(cls, cfg) -> "DecoderConfig":
        """From a mapping (e.g. an ml_collections ConfigDict), naming unknown keys."""
        d = dict(cfg)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown decoder settings {unknown}; known: {sorted(known)}")
        return cls(**d)

    @property
    def compute_dtype(self):
        return dtype_of(self.dtype)

    def num_params(self) -> int:
        """Parameters of the decoder stack (no embeddings or heads)."""
        d, h, kh, hd, f = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim
        attn = d * h * hd + 2 * d * kh * hd + h * hd * d + (2 * hd if self.qk_norm else 0)
        return self.num_layers * (attn + 3 * d * f + 2 * d) + d


class Block(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=cfg.compute_dtype, param_dtype=dtype_of(cfg.param_dtype))
        # Residual-branch outputs start small (GPT-2/Llama practice) for stable deep stacks.
        out_scale = 1.0 / (2 * cfg.num_layers)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, qk_norm=cfg.qk_norm,
                              rope_theta=cfg.rope_theta, impl=cfg.attention, norm_eps=cfg.norm_eps,
                              out_init_scale=out_scale, **kw)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_dim, out_init_scale=out_scale, **kw)

    def __call__(self, x, meta: Meta, kv=None, kv_meta=None, slots=None):
        h, new_kv = self.attn(self.attn_norm(x), meta, kv, kv_meta, slots)
        x = ax.constrain(x + h, ("batch", "length", "act_embed"))
        x = x + self.mlp(self.mlp_norm(x))
        return ax.constrain(x, ("batch", "length", "act_embed")), new_kv


def stacked(ctor: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """`n` independently initialised copies of a module, as one module whose
    variables have a leading `layers` axis (for scanning)."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: ctor(nnx.Rngs(0))))
    keys = jax.random.split(rngs.params(), n)
    state = jax.vmap(lambda k: nnx.state(ctor(nnx.Rngs(params=k))))(keys)
    module = nnx.merge(graphdef, state)
    ax.prepend_axis(module, "layers")
    return module


class Decoder(nnx.Module):
    """The transformer stack: x (B, T, E) embeddings -> normalised hidden states."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.blocks = stacked(lambda r: Block(cfg, rngs=r), cfg.num_layers, rngs)
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)

    def init_cache(self, batch: int, length: int, dtype=None) -> KVCache:
        c = self.cfg
        return KVCache.empty(c.num_layers, batch, length, c.num_kv_heads, c.head_dim, dtype or c.compute_dtype)

    def __call__(self, x: jax.Array, meta: Meta, cache: Optional[KVCache] = None, update_cache: bool = False):
        """Returns (hidden (B, T, E), cache).

        No cache: plain forward. With a cache and `update_cache`, the tokens are
        appended to it (prefill and decoding). With a cache and not
        `update_cache`, the tokens attend to the cached prefix read-only (e.g.
        every denoising step over an image, after its text prefix) and the
        cache comes back unchanged.
        """
        x = ax.constrain(x.astype(self.cfg.compute_dtype), ("batch", "length", "act_embed"))
        graphdef, params = nnx.split(self.blocks)
        slots, kv_meta = None, None
        if cache is not None:
            if update_cache:
                cache, slots = cache.append_meta(meta)
            kv_meta = cache.meta

        def body(h, layer):
            p, kv = layer
            h, new_kv = nnx.merge(graphdef, p)(h, meta, kv, kv_meta, slots)
            return h, new_kv

        policy = REMAT_POLICIES[self.cfg.remat]
        if self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        kvs = None if cache is None else (cache.k, cache.v)
        x, new_kvs = jax.lax.scan(body, x, (params, kvs))
        if cache is not None and update_cache:
            cache = dataclasses.replace(cache, k=new_kvs[0], v=new_kvs[1])
        return self.final_norm(x), cache
