"""The decoder stack, in two block styles selected by `DecoderConfig.block`:

- `llama`: pre-norm blocks (RMSNorm, GQA attention with RoPE and optional
  QK-norm, SwiGLU), no biases;
- `phi`: Phi-1.5's parallel block, x + attn(ln(x)) + mlp(ln(x)) with one
  LayerNorm (with bias), biases on every projection, a GELU MLP, RoPE on the
  first `rotary_fraction` of each head, optional LayerNorm QK-norm; the
  decoder's final norm is a LayerNorm too. Parameter for parameter Phi's
  (k and v projections stacked in one kernel).

Blocks are stacked along a leading `layers` axis and run with `jax.lax.scan`,
so compile time does not grow with depth. Rematerialisation of each block is
chosen by `remat` policy name. The decoder can also return the hidden states
after chosen layers (REPA aligns one of them with an image encoder's features);
asking for none costs nothing.

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
from unimm.nn.layers import GeluMLP, LayerNorm, Linear, RMSNorm, SwiGLU

BLOCKS = ("llama", "phi")
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
    block: str = "llama"  # one of BLOCKS
    rotary_fraction: float = 1.0  # the share of each head's channels RoPE rotates (Phi-1.5: 0.5)

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
        if self.block not in BLOCKS:
            raise ValueError(f"model.block={self.block!r}; choose from {BLOCKS}")
        if self.block == "phi" and self.cond_dim:
            raise ValueError("adaLN conditioning (cond_dim > 0) is built for model.block='llama' only")
        if not 0.0 < self.rotary_fraction <= 1.0 or self.rotary_dim % 2:
            raise ValueError(f"model.rotary_fraction={self.rotary_fraction} must be in (0, 1] and rotate an even "
                             f"number of each head's {self.head_dim} channels")

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

    @property
    def rotary_dim(self) -> int:
        return int(round(self.head_dim * self.rotary_fraction))

    @property
    def head_bias(self) -> bool:
        """Whether the output heads over this decoder carry a bias (Phi's LM head does)."""
        return self.block == "phi"

    def num_params(self) -> int:
        """Parameters of the decoder stack (no embeddings or heads)."""
        d, h, kh, hd, f = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim
        attn = d * h * hd + 2 * d * kh * hd + h * hd * d
        if self.block == "phi":
            attn += h * hd + 2 * kh * hd + d + (4 * hd if self.qk_norm else 0)
            return self.num_layers * (attn + 2 * d * f + f + d + 2 * d) + 2 * d
        attn += 2 * hd if self.qk_norm else 0
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


def _layer_parts(cfg: DecoderConfig, rngs: nnx.Rngs, **attention):
    """(attention, the keyword arguments of the block's other layers) for a block of `cfg`.
    Residual-branch outputs start small (GPT-2/Llama practice) for stable deep stacks."""
    kw = dict(rngs=rngs, dtype=cfg.compute_dtype, param_dtype=dtype_of(cfg.param_dtype),
              out_init_scale=1.0 / (2 * cfg.num_layers))
    attn = Attention(cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, qk_norm=cfg.qk_norm,
                     rope_theta=cfg.rope_theta, impl=cfg.attention, norm_eps=cfg.norm_eps,
                     rotary_dim=cfg.rotary_dim, **kw, **attention)
    return attn, kw


class Block(nnx.Module):
    """Llama's pre-norm block, with optional adaLN modulation."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.attn, kw = _layer_parts(cfg, rngs)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_dim, **kw)
        self.modulation = (Modulation(cfg.cond_dim, cfg.d_model, rngs=rngs, dtype=cfg.compute_dtype,
                                      param_dtype=dtype_of(cfg.param_dtype)) if cfg.cond_dim else None)

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


class PhiBlock(nnx.Module):
    """Phi-1.5's parallel block: x + attn(ln(x)) + mlp(ln(x))."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.attn, kw = _layer_parts(cfg, rngs, use_bias=True, norm="layer")
        self.norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = GeluMLP(cfg.d_model, cfg.mlp_dim, **kw)

    def __call__(self, x, meta: Meta, kv=None, kv_meta=None, slots=None, cond: Optional[Cond] = None):
        del cond  # DecoderConfig rejects adaLN for this block
        h = self.norm(x)
        a, new_kv = self.attn(h, meta, kv, kv_meta, slots)
        return ax.constrain(x + a + self.mlp(h), ("batch", "length", "act_embed")), new_kv


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
        block = PhiBlock if cfg.block == "phi" else Block
        self.blocks = stacked(lambda r: block(cfg, rngs=r), cfg.num_layers, rngs)
        self.final_norm = (LayerNorm if cfg.block == "phi" else RMSNorm)(cfg.d_model, eps=cfg.norm_eps)

    def init_cache(self, batch: int, length: int, dtype=None) -> KVCache:
        c = self.cfg
        return KVCache.empty(c.num_layers, batch, length, c.num_kv_heads, c.head_dim, dtype or c.compute_dtype)

    def __call__(self, x: jax.Array, meta: Meta, cache: Optional[KVCache] = None, update_cache: bool = False,
                 cond: Optional[Cond] = None, hidden_layers: tuple[int, ...] = ()):
        """Returns (hidden (B, T, E), cache), and with `hidden_layers` also a dict
        {k: the residual stream after the first k blocks (B, T, E)}.

        No cache: plain forward. With a cache and `update_cache`, the tokens are
        appended to it (prefill and decoding). With a cache and not
        `update_cache`, the tokens attend to the cached prefix read-only (e.g.
        every denoising step over an image, after its text prefix) and the
        cache comes back unchanged. `cond`: adaLN conditioning (needs cond_dim > 0).
        """
        if cond is not None and not self.cfg.cond_dim:
            raise ValueError("adaLN conditioning given to a decoder built with cond_dim=0")
        n = self.cfg.num_layers
        bad = [k for k in hidden_layers if not 0 <= k <= n]
        if bad:
            raise ValueError(f"hidden_layers {bad} out of range: the decoder has {n} layers (0..{n})")
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
        # One scan per run of layers between the requested hidden states (one scan when none is asked for).
        edges = sorted({0, n} | {k for k in hidden_layers})
        hidden, new_kvs = {0: x}, []
        for a, b in zip(edges[:-1], edges[1:]):
            part = (params, kvs) if (a, b) == (0, n) else jax.tree.map(lambda t: t[a:b], (params, kvs))
            x, part_kvs = jax.lax.scan(body, x, part)
            hidden[b] = x
            new_kvs.append(part_kvs)
        if cache is not None and update_cache:
            k, v = (new_kvs[0] if len(new_kvs) == 1 else
                    tuple(jnp.concatenate(parts, axis=0) for parts in zip(*new_kvs)))
            cache = dataclasses.replace(cache, k=k, v=v)
        out = self.final_norm(x)
        if hidden_layers:
            return out, cache, {k: hidden[k] for k in hidden_layers}
        return out, cache
