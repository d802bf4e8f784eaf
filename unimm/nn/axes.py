"""Logical axis names for parameters and activations, and their mapping to a mesh.

Every parameter is created with logical names (`param(..., axes=("embed", "mlp"))`,
stored as Flax's `out_sharding` metadata, never eagerly sharded, so modules work
with or without a mesh). Key activations are annotated with `constrain(x, axes)`,
a no-op unless a `sharding_context(mesh, rules)` is active. One rules table maps
logical names to mesh axes, e.g.

    RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ...)

Parameter names: embed, heads, kv_heads, head_dim, mlp, vocab, layers, patch,
conv (convolution channels), norm. Activation names: batch, length, act_embed,
act_heads, act_kv_heads, act_mlp, act_vocab, cache_length.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, Any], ...]

_CTX = threading.local()


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules):
    """Within it, `constrain` pins activations to the mesh according to `rules`."""
    old = getattr(_CTX, "value", None)
    _CTX.value = (mesh, tuple(rules))
    try:
        yield
    finally:
        _CTX.value = old


def current() -> Optional[tuple[Mesh, Rules]]:
    return getattr(_CTX, "value", None)


def spec(axes: Sequence[Optional[str]], rules: Rules, shape: Optional[Sequence[int]] = None,
         mesh: Optional[Mesh] = None, what: str = "") -> PartitionSpec:
    """PartitionSpec for logical `axes` under `rules`.

    A mesh axis is used at most once per array (later uses are dropped). If
    `shape` and `mesh` are given, a dimension that the mapped mesh axes do not
    divide is replicated instead, with a warning naming the array.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r}{' of ' + what if what else ''} has no entry in the "
                           f"sharding rules; add ({name!r}, <mesh axes or None>) to config.mesh.rules")
        target = table[name]
        mesh_axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
        if shape is not None and mesh is not None and mesh_axes:
            size = 1
            for a in mesh_axes:
                size *= mesh.shape[a]
            if shape[i] % size:
                logging.warning("%s: dim %d (%s=%d) is not divisible by mesh axes %s (%d); replicating it",
                                what or "array", i, name, shape[i], mesh_axes, size)
                mesh_axes = ()
        used.update(mesh_axes)
        out.append(None if not mesh_axes else (mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes))
    return PartitionSpec(*out)


def constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
    ctx = current()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(axes, rules, x.shape, mesh)))


def param(init, key: jax.Array, shape: Sequence[int], axes: Sequence[Optional[str]],
          dtype=jnp.float32) -> nnx.Param:
    """A parameter initialised by `init(key, shape, dtype)`, carrying logical axis names."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(shape)}")
    return nnx.Param(init(key, tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


class Buffer(nnx.Variable):
    """Model state that is not trained by the optimizer but written by the
    training loss itself (EMA codebooks, code-usage statistics). The trainer
    checkpoints and shards buffers like parameters and keeps the loss's writes."""


def buffer(value: jax.Array, axes: Sequence[Optional[str]]) -> Buffer:
    """A buffer holding `value`, carrying logical axis names."""
    if len(axes) != value.ndim:
        raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(value.shape)}")
    return Buffer(value, out_sharding=tuple(axes), eager_sharding=False)


def logical_axes(variable: nnx.Variable) -> Optional[tuple]:
    return variable.get_metadata().get("out_sharding")


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: Mesh, rules: Rules):
    """NamedSharding for every array in an nnx.State (or abstract state), by its logical axes."""
    def one(path, v):
        value = v.get_value() if _is_var(v) else v
        axes = logical_axes(v) if _is_var(v) else None
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        s = spec(axes, rules, value.shape, mesh, what=name) if axes else PartitionSpec()
        return NamedSharding(mesh, s)
    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_var)


def prepend_axis(module: nnx.Module, name: str) -> None:
    """Add a leading logical axis name to every variable of `module` (after stacking)."""
    for _, v in nnx.iter_graph(module):
        if _is_var(v) and logical_axes(v) is not None:
            v.set_metadata(out_sharding=(name,) + tuple(logical_axes(v)))
