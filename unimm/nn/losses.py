"""Losses shared by recipes."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood of `targets` and the log partition function."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    return log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0], log_z


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array, z_loss: float = 0.0,
                  normalizer=None):
    """Weighted mean token cross-entropy, plus z_loss * mean(log Z^2) (PaLM's
    stabiliser). Returns (loss, metrics) with the plain CE and accuracy.

    The sum is divided by `normalizer` (default: the weights' sum); dividing by
    a token count instead lets weights below 1 down-weight a stream."""
    nll, log_z = token_nll(logits, targets)
    logits = logits.astype(jnp.float32)
    w = weights.astype(jnp.float32)
    denom = jnp.maximum(w.sum() if normalizer is None else normalizer, 1.0)
    ce = (nll * w).sum() / denom
    loss = ce + z_loss * ((log_z**2) * w).sum() / denom
    acc = ((jnp.argmax(logits, -1) == targets) * w).sum() / denom
    return loss, {"ce": ce, "accuracy": acc}


def masked_token_loss(logits: jax.Array, targets: jax.Array, masked: jax.Array, row_weight: jax.Array):
    """Masked-token prediction (MaskGIT, Show-o's L_MTP): cross-entropy of logits
    (B, N, K) at the masked positions (B, N) only, scaled per row (B,),
    averaged over the masked positions."""
    w = masked.astype(jnp.float32) * row_weight[:, None]
    return cross_entropy(logits, targets, w, normalizer=masked.sum())
