"""MaskGIT (Chang et al., 2022): the cosine masking schedule for training and
iterative parallel unmasking for sampling discrete image codes.

Sampling starts from codes of which some (all, or an inpainting region) are
masked. Each of S steps predicts every masked code, samples one per position,
scores it by its log-probability plus Gumbel noise whose scale anneals linearly
to 0 (MaskGIT's choice temperature), and keeps the least confident
floor(N_masked * cos(pi/2 (i+1)/S)) still masked (at least one revealed per
step, none left after the last).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def mask_ratio(progress):
    """The cosine schedule: the fraction of tokens masked at progress in [0, 1]."""
    return jnp.cos(0.5 * jnp.pi * progress)


def num_still_masked(step, steps: int, total, masked_now):
    """Tokens left masked after unmasking step `step` of `steps` (0-based), for
    `total` maskable tokens of which `masked_now` are masked."""
    n = jnp.floor(total * mask_ratio((step + 1) / steps)).astype(jnp.int32)
    n = jnp.clip(n, 1, jnp.maximum(masked_now - 1, 0))
    return jnp.where(step + 1 >= steps, 0, jnp.minimum(n, masked_now))


def keep_lowest(scores: jax.Array, n: jax.Array) -> jax.Array:
    """Boolean (B, N): the n[b] lowest-scoring positions of each row."""
    rank = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
    return rank < n[:, None]


def training_mask(rng: jax.Array, batch: int, n: int) -> jax.Array:
    """Which of n tokens (B, n) a training row masks: ceil(cos(pi/2 u) n) of them, u uniform, at least one."""
    r_ratio, r_pick = jax.random.split(rng)
    count = jnp.maximum(jnp.ceil(mask_ratio(jax.random.uniform(r_ratio, (batch,))) * n), 1).astype(jnp.int32)
    return keep_lowest(jax.random.uniform(r_pick, (batch, n)), count)


def unmask(logits_fn: Callable[[jax.Array, jax.Array], jax.Array], codes: jax.Array, masked: jax.Array,
           rng: jax.Array, steps: int, temperature: float = 1.0, confidence_noise: float = 1.0):
    """Reveal the `masked` codes (B, N) in `steps` steps.

    logits_fn(codes, masked) -> code logits (B, N, K) (guided, if guidance is
    used); temperature 0 picks the argmax. Returns (codes (B, N), the number
    still masked after each step (steps, B))."""
    total = masked.sum(-1)

    def body(i, carry):
        codes, masked, rng, history = carry
        logits = logits_fn(codes, masked).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, -1)
        rng, r_pick, r_conf = jax.random.split(rng, 3)
        if temperature > 0:
            sampled = jax.random.categorical(r_pick, logits / temperature).astype(jnp.int32)
        else:
            sampled = jnp.argmax(logits, -1).astype(jnp.int32)
        conf = jnp.take_along_axis(logp, sampled[..., None], -1)[..., 0]
        conf = conf + confidence_noise * (1.0 - (i + 1) / steps) * jax.random.gumbel(r_conf, conf.shape)
        conf = jnp.where(masked, conf, jnp.inf)
        still = masked & keep_lowest(conf, num_still_masked(i, steps, total, masked.sum(-1)))
        codes = jnp.where(masked & ~still, sampled, codes)
        return codes, still, rng, history.at[i].set(still.sum(-1))

    history = jnp.zeros((steps, codes.shape[0]), jnp.int32)
    codes, _, _, history = jax.lax.fori_loop(0, steps, body, (codes, masked, rng, history))
    return codes, history
