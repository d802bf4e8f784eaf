"""Autoregressive token decoding over a KV cache, for any recipe.

The recipe supplies `step(state, tokens (B, 1), positions (B, 1), active (B,))
-> (logits (B, V), state)`, which feeds one token per row into its model and
cache (rows that are not active write nothing). Decoding stops per row at a
stop token and for all rows when every row has stopped.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unimm.nn.attention import Meta


def pick(logits: jax.Array, rng: jax.Array, temperature: float) -> jax.Array:
    """Greedy at temperature 0, else a sample from softmax(logits / temperature)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, logits.astype(jnp.float32) / temperature).astype(jnp.int32)


def decode(step: Callable, state, first_logits: jax.Array, start_position: jax.Array, max_new: int,
           stop_ids: Sequence[int], pad_id: int, rng: jax.Array, temperature: float = 0.0):
    """Decode up to `max_new` tokens per row.

    first_logits (B, V): the model's prediction after the prompt; start_position
    (B,): the position of the first new token. Returns (tokens (B, max_new),
    lengths (B,) including the stop token, state). After a row stops, its
    remaining tokens are `pad_id`.
    """
    b = first_logits.shape[0]
    stop = jnp.asarray(tuple(stop_ids), jnp.int32)
    rng, sub = jax.random.split(rng)
    tok = pick(first_logits, sub, temperature)
    out = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, stop)
    lengths = jnp.ones((b,), jnp.int32)

    def cond(carry):
        i, _, _, done, _, _, _ = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, state, tok, done, out, lengths, rng = carry
        pos = start_position + i - 1
        logits, state = step(state, tok[:, None], pos[:, None], ~done)
        rng, sub = jax.random.split(rng)
        nxt = jnp.where(done, pad_id, pick(logits, sub, temperature))
        out = out.at[:, i].set(nxt)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(nxt, stop)
        return i + 1, state, nxt, done, out, lengths, rng

    carry = (jnp.int32(1), state, tok, done, out, lengths, rng)
    _, state, _, _, out, lengths, _ = jax.lax.while_loop(cond, body, carry)
    return out, lengths, state


def pad_rows(seqs: Sequence[Sequence[int]], pad_id: int):
    """Right-pad token lists into (N, max length) int32 and their lengths (N,)."""
    lengths = np.array([len(q) for q in seqs], np.int32)
    out = np.full((len(seqs), int(lengths.max())), pad_id, np.int32)
    for i, q in enumerate(seqs):
        out[i, :len(q)] = q
    return out, lengths


def prefix_meta(lengths, length: int) -> Meta:
    """Metadata of right-padded prompts (B, length): causal text, padding as segment 0."""
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (lengths.shape[0], length))
    seg = (pos < lengths[:, None]).astype(jnp.int32)
    return Meta(seg, jnp.zeros_like(seg), pos)
