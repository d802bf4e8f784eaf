"""Quantizers for discrete image tokenizers: a VQ codebook and a lookup-free quantizer.

Both map continuous vectors z (..., D) to integer codes and back, pass gradients
to z straight through (z + stop_gradient(q - z)), and return their auxiliary
losses and statistics in a dict, so any encoder/decoder can wrap them.

- `VectorQuantizer` (VQ-VAE): nearest codebook entry. The codebook learns either
  by gradient (codebook loss ||sg(z) - q||^2) or by exponential moving averages
  of the vectors assigned to each code (`ema_decay > 0`, VQ-VAE-2). Codes whose
  running usage falls below `restart_threshold` of a uniform share are restarted
  on encoder outputs of the batch (dead-code restarts, as in SoundStream and
  Jukebox), drawn in proportion to their quantization error (k-means++ seeding):
  on scenes that are mostly blank background a uniform draw lands most restarts
  on background vectors and splits one flat colour over many codes.
- `LookupFreeQuantizer` (MAGVIT-v2's LFQ): each of D channels is a bit, sign(z);
  the code is the bits read as an integer, so the codebook has 2^D entries and
  no table. Its entropy penalty makes each token confident (low per-token
  entropy) and the batch use all codes (high entropy of the mean distribution).

Training-time updates (EMA, usage, restarts) write `Buffer`s and, for restarts,
the codebook itself; they happen only when called with `train=True` and a key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unimm.nn import axes as ax


def _entropy(p: jax.Array, axis: int = -1) -> jax.Array:
    return -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-12)), axis=axis)


class VectorQuantizer(nnx.Module):
    """Nearest-neighbour VQ over `num_codes` vectors of `dim` channels.

    beta: commitment weight. ema_decay: 0 trains the codebook by gradient, else
    by EMA with this decay. restart_threshold: a code is dead when its running
    share of assignments is below this fraction of 1/num_codes (0 disables);
    usage_decay: decay of that running share.
    """

    def __init__(self, num_codes: int, dim: int, *, rngs: nnx.Rngs, beta: float = 0.25, ema_decay: float = 0.0,
                 restart_threshold: float = 0.03, usage_decay: float = 0.99, epsilon: float = 1e-5):
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay} must be in [0, 1) (0: gradient updates)")
        self.num_codes, self.dim = num_codes, dim
        self.beta, self.ema_decay, self.epsilon = beta, ema_decay, epsilon
        self.restart_threshold, self.usage_decay = restart_threshold, usage_decay
        init = jax.nn.initializers.variance_scaling(1.0, "fan_out", "uniform")
        book = init(rngs.params(), (num_codes, dim), jnp.float32)
        axes = ("codes", "code_dim")
        if ema_decay > 0:
            self.codebook = ax.buffer(book, axes)
            self.ema_count = ax.buffer(jnp.ones((num_codes,), jnp.float32), ("codes",))
            self.ema_sum = ax.buffer(book, axes)
        else:
            self.codebook = nnx.Param(book, out_sharding=axes, eager_sharding=False)
        self.usage = ax.buffer(jnp.full((num_codes,), 1.0 / num_codes, jnp.float32), ("codes",))

    def codes(self, z: jax.Array) -> jax.Array:
        """Nearest code index of each vector (..., D) -> (...)."""
        book = self.codebook[...]
        zf = z.astype(jnp.float32).reshape(-1, self.dim)
        d = jnp.sum(zf**2, -1, keepdims=True) - 2.0 * zf @ book.T + jnp.sum(book**2, -1)[None, :]
        return jnp.argmin(d, axis=-1).reshape(z.shape[:-1]).astype(jnp.int32)

    def lookup(self, codes: jax.Array) -> jax.Array:
        """Code indices (...) -> vectors (..., D)."""
        return jnp.take(self.codebook[...], codes, axis=0)

    def __call__(self, z: jax.Array, *, train: bool = False, rng=None):
        """(straight-through quantized z, codes, aux) where aux holds 'loss' (to add to
        the training loss) and statistics."""
        codes = self.codes(z)
        q = self.lookup(codes)
        zf = z.astype(jnp.float32)
        commit = jnp.mean((zf - jax.lax.stop_gradient(q)) ** 2)
        book_loss = jnp.zeros(()) if self.ema_decay > 0 else jnp.mean((jax.lax.stop_gradient(zf) - q) ** 2)
        onehot = jax.nn.one_hot(codes.reshape(-1), self.num_codes, dtype=jnp.float32)
        counts = onehot.sum(0)
        share = counts / jnp.maximum(counts.sum(), 1.0)
        aux = {"loss": book_loss + self.beta * commit, "commitment": commit, "codebook_loss": book_loss,
               "perplexity": jnp.exp(_entropy(share)), "used_codes": jnp.sum(counts > 0).astype(jnp.float32)}
        if train:
            err = jnp.sum(jax.lax.stop_gradient(zf - q) ** 2, -1).reshape(-1)
            self._update(jax.lax.stop_gradient(zf).reshape(-1, self.dim), err, onehot, counts, share, rng)
        q_st = zf + jax.lax.stop_gradient(q - zf)
        return q_st.astype(z.dtype), codes, aux

    def _update(self, zf, err, onehot, counts, share, rng):
        if self.ema_decay > 0:
            d = self.ema_decay
            count = d * self.ema_count[...] + (1 - d) * counts
            total = count.sum()
            # Laplace smoothing keeps rarely used codes away from a division by ~0.
            count = (count + self.epsilon) / (total + self.num_codes * self.epsilon) * total
            self.ema_count[...] = count
            self.ema_sum[...] = d * self.ema_sum[...] + (1 - d) * (onehot.T @ zf)
            self.codebook[...] = self.ema_sum[...] / count[:, None]
        usage = self.usage_decay * self.usage[...] + (1 - self.usage_decay) * share
        if self.restart_threshold > 0 and rng is not None:
            dead = usage < self.restart_threshold / self.num_codes
            # Where the codebook fits worst; uniform when every error is 0.
            pick = jax.random.categorical(rng, jnp.log(err + 1e-12), shape=(self.num_codes,))
            fresh = zf[pick]
            self.codebook[...] = jnp.where(dead[:, None], fresh, self.codebook[...])
            if self.ema_decay > 0:
                self.ema_sum[...] = jnp.where(dead[:, None], fresh * self.ema_count[...][:, None], self.ema_sum[...])
            usage = jnp.where(dead, 1.0 / self.num_codes, usage)
        self.usage[...] = usage


class LookupFreeQuantizer(nnx.Module):
    """LFQ with `bits` channels (2^bits codes). entropy_weight scales the entropy
    penalty (per-token entropy - diversity_weight * entropy of the batch's mean
    code distribution); the code distribution of a vector is softmax(-||z - c||^2 / temperature)
    over all codes c in {-1, 1}^bits, which factorises over bits."""

    def __init__(self, bits: int, *, beta: float = 0.25, entropy_weight: float = 0.1,
                 diversity_weight: float = 1.0, temperature: float = 0.1):
        if not 1 <= bits <= 24:
            raise ValueError(f"LFQ bits={bits} must be in [1, 24] (2^bits codes)")
        self.bits, self.num_codes = bits, 2**bits
        self.beta, self.entropy_weight = beta, entropy_weight
        self.diversity_weight, self.temperature = diversity_weight, temperature

    def codes(self, z: jax.Array) -> jax.Array:
        bits = (z > 0).astype(jnp.int32)
        return jnp.sum(bits << jnp.arange(self.bits, dtype=jnp.int32), axis=-1)

    def lookup(self, codes: jax.Array) -> jax.Array:
        bits = (codes[..., None] >> jnp.arange(self.bits, dtype=jnp.int32)) & 1
        return bits.astype(jnp.float32) * 2.0 - 1.0

    def entropies(self, z: jax.Array):
        """(mean per-token entropy, entropy of the mean code distribution), in nats.

        Per bit, p(+1 | z) = sigmoid(4 z / temperature) (since (z+1)^2 - (z-1)^2 = 4z).
        The per-token entropy is the sum of bit entropies; the batch distribution is
        formed exactly over all 2^bits codes when that is at most 2^14, else
        approximated by independent bits (an upper bound)."""
        zf = z.astype(jnp.float32).reshape(-1, self.bits)
        logit = 4.0 * zf / self.temperature
        p1 = jax.nn.sigmoid(logit)
        bit_h = _entropy(jnp.stack([p1, 1 - p1], -1))
        token_h = jnp.mean(jnp.sum(bit_h, -1))
        if self.bits <= 14:
            signs = self.lookup(jnp.arange(self.num_codes))  # (K, bits) of +-1
            logp = 0.5 * (signs @ logit.T).T - jnp.sum(jnp.logaddexp(0.5 * logit, -0.5 * logit), -1, keepdims=True)
            batch_h = _entropy(jnp.mean(jnp.exp(logp), 0))
        else:
            m = jnp.mean(p1, 0)
            batch_h = jnp.sum(_entropy(jnp.stack([m, 1 - m], -1)))
        return token_h, batch_h

    def __call__(self, z: jax.Array, *, train: bool = False, rng=None):
        del train, rng  # LFQ has no state to update
        zf = z.astype(jnp.float32)
        codes = self.codes(zf)
        q = jnp.where(zf > 0, 1.0, -1.0)
        commit = jnp.mean((zf - q) ** 2)
        token_h, batch_h = self.entropies(zf)
        entropy_loss = token_h - self.diversity_weight * batch_h
        counts = jnp.zeros((self.num_codes,), jnp.float32).at[codes.reshape(-1)].add(1.0)
        share = counts / counts.sum()
        aux = {"loss": self.beta * commit + self.entropy_weight * entropy_loss, "commitment": commit,
               "token_entropy": token_h, "batch_entropy": batch_h, "perplexity": jnp.exp(_entropy(share)),
               "used_codes": jnp.sum(counts > 0).astype(jnp.float32)}
        q_st = zf + jax.lax.stop_gradient(q - zf)
        return q_st.astype(z.dtype), codes, aux
