"""Basic layers with logical axis names: Linear, RMSNorm, LayerNorm, Embed, SwiGLU
and GELU MLPs.

Parameters are stored in `param_dtype` (float32 by default); matmuls run in
`dtype` (float32 or bfloat16); normalisation statistics are always float32.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unimm.nn import axes as ax


def _tuple(x) -> tuple[int, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (int(x),)


class Linear(nnx.Module):
    """y = x . W (+ b), contracting the trailing `in_features` dims of x.

    `in_features`/`out_features` may be tuples (e.g. (embed,) -> (heads, head_dim));
    `axes` names every kernel dimension, in order.
    """

    def __init__(self, in_features, out_features, axes: Sequence[Optional[str]], *, rngs: nnx.Rngs,
                 use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
                 init_scale: float = 1.0, zero_init: bool = False):
        self.in_shape, self.out_shape = _tuple(in_features), _tuple(out_features)
        shape = self.in_shape + self.out_shape
        n_in = len(self.in_shape)
        if zero_init:
            init = jax.nn.initializers.zeros
        else:
            init = jax.nn.initializers.variance_scaling(
                init_scale, "fan_in", "truncated_normal",
                in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, len(shape))))
        self.kernel = ax.param(init, rngs.params(), shape, axes, param_dtype)
        self.bias = (ax.param(jax.nn.initializers.zeros, rngs.params(), self.out_shape, axes[n_in:], param_dtype)
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), self.kernel[...].astype(self.dtype), (contract, ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str = "norm", param_dtype=jnp.float32,
                 rngs: Optional[nnx.Rngs] = None):
        del rngs  # no random init; accepted for a uniform constructor signature
        self.scale = ax.param(jax.nn.initializers.ones, jax.random.key(0), (dim,), (axis_name,), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with a learned scale and bias (Phi's and GPT-2's norm)."""

    def __init__(self, dim: int, *, eps: float = 1e-5, axis_name: str = "norm", param_dtype=jnp.float32,
                 rngs: Optional[nnx.Rngs] = None):
        del rngs  # no random init; accepted for a uniform constructor signature
        self.scale = ax.param(jax.nn.initializers.ones, jax.random.key(0), (dim,), (axis_name,), param_dtype)
        self.bias = ax.param(jax.nn.initializers.zeros, jax.random.key(0), (dim,), (axis_name,), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding table (vocab, embed); `attend` gives logits against it (tied output)."""

    def __init__(self, vocab_size: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        init = jax.nn.initializers.normal(stddev=1.0 / math.sqrt(dim))
        self.embedding = ax.param(init, rngs.params(), (vocab_size, dim), ("vocab", "embed"), param_dtype)
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding[...].astype(self.dtype))


class SwiGLU(nnx.Module):
    """Llama's feed-forward: down(silu(gate(x)) * up(x)), gate and up fused in one matmul."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 out_init_scale: float = 1.0):
        self.wi = Linear(dim, (2, hidden), ("embed", None, "mlp"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.wo = Linear(hidden, dim, ("mlp", "embed"), rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                         init_scale=out_init_scale)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.wi(x)
        h = ax.constrain(h, ("batch", "length", None, "act_mlp"))
        h = jax.nn.silu(h[..., 0, :]) * h[..., 1, :]
        return self.wo(h)


class GeluMLP(nnx.Module):
    """Phi's and GPT-2's feed-forward: fc2(gelu(fc1(x))), with biases (tanh-approximated GELU)."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 out_init_scale: float = 1.0):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=True)
        self.fc1 = Linear(dim, hidden, ("embed", "mlp"), **kw)
        self.fc2 = Linear(hidden, dim, ("mlp", "embed"), init_scale=out_init_scale, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = ax.constrain(self.fc1(x), ("batch", "length", "act_mlp"))
        return self.fc2(jax.nn.gelu(h, approximate=True))
