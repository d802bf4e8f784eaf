"""Losses shared by recipes."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array, z_loss: float = 0.0,
                  normalizer=None):
    """Weighted mean token cross-entropy, plus z_loss * mean(log Z^2) (PaLM's
    stabiliser). Returns (loss, metrics) with the plain CE and accuracy.

    The sum is divided by `normalizer` (default: the weights' sum); dividing by
    a token count instead lets weights below 1 down-weight a stream."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit
    w = weights.astype(jnp.float32)
    denom = jnp.maximum(w.sum() if normalizer is None else normalizer, 1.0)
    ce = (nll * w).sum() / denom
    loss = ce + z_loss * ((log_z**2) * w).sum() / denom
    acc = ((jnp.argmax(logits, -1) == targets) * w).sum() / denom
    return loss, {"ce": ce, "accuracy": acc}
