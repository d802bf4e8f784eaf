"""Optimizer from config.optim: AdamW, warmup + cosine/constant schedule,
global-norm clipping, updates skipped on non-finite gradients, parameters
frozen by name patterns (regular expressions over paths like 'decoder/blocks/...'),
and an optional exponential moving average of the parameters (`optim.ema_decay`),
kept in the optimizer state so it is sharded, checkpointed and resumed with it.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "constant")


def schedule(o, total_steps: int) -> optax.Schedule:
    if o.schedule not in SCHEDULES:
        raise ValueError(f"unknown optim.schedule {o.schedule!r}; choose from {SCHEDULES}")
    warmup = int(o.warmup_steps)
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, o.learning_rate, warmup, max(total_steps, warmup + 1), o.learning_rate * o.final_lr_fraction)
    return optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, max(warmup, 1)),
                                 optax.constant_schedule(o.learning_rate)], [warmup])


def path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def decay_mask(params):
    """Weight decay applies to matmul and convolution kernels only: never to norm
    scales, biases, embedding or position tables, whatever their rank (a scanned
    decoder stacks its norm scales into (layers, d) arrays)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: path_name(p).split("/")[-1] == "kernel", params)


def frozen_labels(params, patterns: Sequence[str]):
    """'frozen' for parameters whose path matches any pattern, else 'trained'."""
    compiled = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "frozen" if any(c.search(path_name(p)) for c in compiled) else "trained", params)


class ParamEMAState(NamedTuple):
    count: jax.Array
    ema: Any  # same structure, shapes and dtypes as the params
    inner: Any


def param_ema(inner: optax.GradientTransformation, decay: float) -> optax.GradientTransformation:
    """Wrap `inner` so its state also holds an EMA of the parameters after each update.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so a short
    run's average is not dominated by the random initialisation (with decay 0.999
    and 2000 steps, a fixed decay would still give the init 13% of the weight)."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"optim.ema_decay={decay} must be in (0, 1) (or 0 for no EMA)")

    def init(params):
        return ParamEMAState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.array, params), inner.init(params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("param_ema needs the params passed to update()")
        updates, inner_state = inner.update(updates, state.inner, params)
        new_params = optax.apply_updates(params, updates)
        n = state.count.astype(jnp.float32)
        d = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
        ema = jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), state.ema, new_params)
        return updates, ParamEMAState(state.count + 1, ema, inner_state)

    return optax.GradientTransformation(init, update)


def ema_params(opt_state) -> Optional[Any]:
    """The parameter EMA inside an optimizer state made by `make`, or None if it keeps none."""
    return optax.tree_utils.tree_get(
        opt_state, "ema", filtering=lambda path, _: getattr(path[-1], "tuple_name", None) == "ParamEMAState")


def make(o, total_steps: int, params=None, extra_freeze: Sequence[str] = ()) -> optax.GradientTransformation:
    lr = schedule(o, total_steps)
    parts = []
    if o.grad_clip and o.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(o.grad_clip))
    parts.append(optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask))
    tx = optax.chain(*parts)
    freeze = tuple(o.get("freeze", ())) + tuple(extra_freeze)
    if freeze:
        if params is not None:
            labels = jax.tree.leaves(frozen_labels(params, freeze))
            if "trained" not in labels:
                raise ValueError(f"optim.freeze={freeze} freezes every parameter; nothing would train")
            if "frozen" not in labels:
                raise ValueError(f"optim.freeze={freeze} matches no parameter path")
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()},
                                   lambda ps: frozen_labels(ps, freeze))
    if o.get("ema_decay", 0.0):
        tx = param_ema(tx, float(o.ema_decay))
    # Non-finite gradients skip the update (params and their EMA stay as they
    # were); the trainer stops after too many in a row.
    return optax.apply_if_finite(tx, max_consecutive_errors=10**9)
