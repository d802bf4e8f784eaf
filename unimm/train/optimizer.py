"""Optimizer from config.optim: AdamW, warmup + cosine/constant schedule,
global-norm clipping, updates skipped on non-finite gradients, and parameters
frozen by name patterns (regular expressions over paths like 'decoder/blocks/...').
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
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


def frozen_labels(params, patterns: Sequence[str]):
    """'frozen' for parameters whose path matches any pattern, else 'trained'."""
    compiled = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "frozen" if any(c.search(path_name(p)) for c in compiled) else "trained", params)


def make(o, total_steps: int, params=None, extra_freeze: Sequence[str] = ()) -> optax.GradientTransformation:
    lr = schedule(o, total_steps)
    decay_mask = lambda ps: jax.tree.map(lambda x: x.ndim >= 2, ps)  # no decay on norms and biases
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
    # Non-finite gradients skip the update (params stay as they were); the
    # trainer stops after too many in a row.
    return optax.apply_if_finite(tx, max_consecutive_errors=10**9)
