"""Llama-style decoder: pre-norm blocks (RMSNorm, GQA attention with RoPE and
optional QK-norm, SwiGLU), stacked along a leading `layers` axis and run with
`jax.lax.scan`, so compile time does not grow with depth. Rematerialisation of
each block is chosen by `remat` policy name.

With `cond_dim` > 0 the blocks also take adaptive-norm conditioning (DiT's
adaLN): a few conditioning vectors per row (e.g. one diffusion timestep
embedding per image) each scale and shift the norms and scale the residual
branches of the tokens that point at them, through per-layer linear maps that
start at zero; tokens that point at none (text) pass through unchanged.

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
from unimm.nn.layers import Linear, RMSNorm, SwiGLU

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
    cond_dim: int = 0  # > 0: width of the adaLN conditioning vectors the blocks accept (see Cond)

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
        mod = (self.cond_dim + 1) * 6 * d if self.cond_dim else 0
        return self.num_layers * (attn + 3 * d * f + 2 * d + mod) + d


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cond:
    """adaLN conditioning: vectors (B, K, cond_dim) and, per token, which one
    modulates it (B, T) int32, -1 for none."""

    vectors: jax.Array
    index: jax.Array


class Modulation(nnx.Module):
    """Per-token (shift, scale, gate) for a block's two norms and residual branches."""

    def __init__(self, cond_dim: int, d_model: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.proj = Linear(cond_dim, (6, d_model), ("embed", None, None), rngs=rngs, use_bias=True,
                           dtype=dtype, param_dtype=param_dtype, zero_init=True)

    def __call__(self, cond: Cond) -> jax.Array:
        """(6, B, T, d_model); zeros (no change) for tokens with index -1."""
        per_vector = self.proj(jax.nn.silu(cond.vectors))  # (B, K, 6, d): computed once per vector
        # A one-hot matmul rather than a gather: its gradient is a matmul too, not a scatter.
        pick = jax.nn.one_hot(cond.index, per_vector.shape[1], dtype=per_vector.dtype)  # index -1: all zero
        return jnp.einsum("btk,bkcd->cbtd", pick, per_vector)


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
        self.modulation = Modulation(cfg.cond_dim, cfg.d_model, **kw) if cfg.cond_dim else None

    def __call__(self, x, meta: Meta, kv=None, kv_meta=None, slots=None, cond: Optional[Cond] = None):
        if self.modulation is None or cond is None:
            h, new_kv = self.attn(self.attn_norm(x), meta, kv, kv_meta, slots)
            x = ax.constrain(x + h, ("batch", "length", "act_embed"))
            x = x + self.mlp(self.mlp_norm(x))
            return ax.constrain(x, ("batch", "length", "act_embed")), new_kv
        # (1 + scale), (1 + gate): zero modulation is the plain block, for text and at init.
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond).astype(x.dtype)
        h, new_kv = self.attn(self.attn_norm(x) * (1 + scale1) + shift1, meta, kv, kv_meta, slots)
        x = ax.constrain(x + (1 + gate1) * h, ("batch", "length", "act_embed"))
        x = x + (1 + gate2) * self.mlp(self.mlp_norm(x) * (1 + scale2) + shift2)
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

    def __call__(self, x: jax.Array, meta: Meta, cache: Optional[KVCache] = None, update_cache: bool = False,
                 cond: Optional[Cond] = None):
        """Returns (hidden (B, T, E), cache).

        No cache: plain forward. With a cache and `update_cache`, the tokens are
        appended to it (prefill and decoding). With a cache and not
        `update_cache`, the tokens attend to the cached prefix read-only (e.g.
        every denoising step over an image, after its text prefix) and the
        cache comes back unchanged. `cond`: adaLN conditioning (needs cond_dim > 0).
        """
        if cond is not None and not self.cfg.cond_dim:
            raise ValueError("adaLN conditioning given to a decoder built with cond_dim=0")
        x = ax.constrain(x.astype(self.cfg.compute_dtype), ("batch", "length", "act_embed"))
        graphdef, params = nnx.split(self.blocks)
        slots, kv_meta = None, None
        if cache is not None:
            if update_cache:
                cache, slots = cache.append_meta(meta)
            kv_meta = cache.meta

        def body(h, layer):
            p, kv = layer
            h, new_kv = nnx.merge(graphdef, p)(h, meta, kv, kv_meta, slots, cond)
            return h, new_kv

        policy = REMAT_POLICIES[self.cfg.remat]
        if self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        kvs = None if cache is None else (cache.k, cache.v)
        x, new_kvs = jax.lax.scan(body, x, (params, kvs))
        if cache is not None and update_cache:
            cache = dataclasses.replace(cache, k=new_kvs[0], v=new_kvs[1])
        return self.final_norm(x), cache
