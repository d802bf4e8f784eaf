"""Text over a KV cache, for any recipe: prefill a prompt, then decode token by token.

The recipe supplies its model's step, `step(model, tokens (B, T), meta, cache)
-> (logits (B, T, V), cache)`, which embeds the tokens, appends them to the
cache and returns the logits at each of them (rows whose tokens have segment
0 write nothing). Decoding stops per row at a stop token and for all rows when
every row has stopped.

`prefill_jit` and `decode_jit` are the same functions jitted over the split
model (graphdef static, params traced), with the step passed as a static
function (an unbound method such as `MyModel.text`), so each recipe and shape
compiles once.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm.nn import guidance
from unimm.nn.attention import KVCache, Meta

Step = Callable[..., tuple[jax.Array, KVCache]]


def pick(logits: jax.Array, rng: jax.Array, temperature: float) -> jax.Array:
    """Greedy at temperature 0, else a sample from softmax(logits / temperature)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, logits.astype(jnp.float32) / temperature).astype(jnp.int32)


def prefix_meta(lengths, length: int, span=None) -> Meta:
    """Metadata of right-padded prompts (B, length): causal text (and the image
    spans `span` marks, if given), padding as segment 0."""
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (lengths.shape[0], length))
    seg = (pos < lengths[:, None]).astype(jnp.int32)
    return Meta(seg, jnp.zeros_like(seg) if span is None else jnp.asarray(span, jnp.int32) * seg, pos)


def prefill(step: Step, model, cache: KVCache, tokens: jax.Array, lengths: jax.Array, span=None):
    """Run right-padded prompts (B, T) of `lengths` (B,) into `cache`; returns
    (the logits after each prompt's last token (B, V), cache)."""
    logits, cache = step(model, tokens, prefix_meta(lengths, tokens.shape[1], span), cache)
    return logits[jnp.arange(tokens.shape[0]), lengths - 1], cache


def feed(step: Step, model, cache: KVCache, token: jax.Array, position: jax.Array, active: jax.Array):
    """Append one token per row (B,) at `position` (B,) (inactive rows write
    nothing); returns (the logits after it (B, V), cache)."""
    seg = active.astype(jnp.int32)[:, None]
    logits, cache = step(model, token[:, None].astype(jnp.int32), Meta(seg, jnp.zeros_like(seg), position[:, None]),
                         cache)
    return logits[:, -1], cache


def decode(step: Step, model, cache: KVCache, first_logits: jax.Array, start_position: jax.Array, max_new: int,
           stop_ids: Sequence[int], pad_id: int, rng: jax.Array, temperature: float = 0.0, active=None):
    """Decode up to `max_new` tokens per row.

    first_logits (B, V): the model's prediction after the prompt; start_position
    (B,): the position of the first new token; `active` (B,): rows to decode
    (default all; the others produce nothing and write nothing). Returns
    (tokens (B, max_new), lengths (B,) including the stop token, cache). The
    stop token itself is not fed; after a row stops, its remaining tokens are
    `pad_id`.
    """
    b = first_logits.shape[0]
    active = jnp.ones((b,), bool) if active is None else jnp.asarray(active, bool)
    stop = jnp.asarray(tuple(stop_ids), jnp.int32)
    rng, sub = jax.random.split(rng)
    tok = jnp.where(active, pick(first_logits, sub, temperature), pad_id)
    out = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, stop) | ~active
    lengths = active.astype(jnp.int32)

    def cond(carry):
        i, _, _, done, _, _, _ = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, cache, tok, done, out, lengths, rng = carry
        logits, cache = feed(step, model, cache, tok, start_position + i - 1, ~done)
        rng, sub = jax.random.split(rng)
        nxt = jnp.where(done, pad_id, pick(logits, sub, temperature))
        out = out.at[:, i].set(nxt)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(nxt, stop)
        return i + 1, cache, nxt, done, out, lengths, rng

    carry = (jnp.int32(1), cache, tok, done, out, lengths, rng)
    _, cache, _, _, out, lengths, _ = jax.lax.while_loop(cond, body, carry)
    return out, lengths, cache


def guided(step: Step, scale: float, convention: str = "cfg") -> Step:
    """A step for B rows that runs over a cache of 2B: the rows' conditional
    prefixes, then their unconditional ones. Both halves read the same new tokens,
    each at its own next position (its cache's fill: prefixes may differ in
    length), and the logits come back guided (B, T, V), as autoregressive image
    generation with logit guidance samples (Janus-Pro)."""

    def wrapped(model, tokens, meta, cache):
        t = tokens.shape[1]
        seg = guidance.double(meta.segment)
        pos = cache.end[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        logits, cache = step(model, guidance.double(tokens), Meta(seg, jnp.zeros_like(seg), pos), cache)
        return guidance.combine(logits, scale, convention), cache

    return wrapped


@functools.partial(jax.jit, static_argnames=("graphdef", "step", "cache_len"))
def prefill_jit(graphdef, params, tokens, lengths, span=None, *, step: Step, cache_len: int):
    """`prefill` into a new cache of `cache_len` slots, over the split model."""
    model = nnx.merge(graphdef, params)
    cache = model.decoder.init_cache(tokens.shape[0], cache_len)
    return prefill(step, model, cache, tokens, lengths, span)


@functools.partial(jax.jit, static_argnames=("graphdef", "step"))
def feed_jit(graphdef, params, cache, token, position, active, *, step: Step):
    return feed(step, nnx.merge(graphdef, params), cache, token, position, active)


@functools.partial(jax.jit, static_argnames=("graphdef", "step", "max_new", "stop_ids", "pad_id", "temperature"))
def decode_jit(graphdef, params, cache, first_logits, start, rng, active=None, *, step: Step, max_new: int,
               stop_ids: tuple, pad_id: int, temperature: float = 0.0):
    """`decode` over the split model."""
    return decode(step, nnx.merge(graphdef, params), cache, first_logits, start, max_new, stop_ids, pad_id, rng,
                  temperature, active)


def pad_rows(seqs: Sequence[Sequence[int]], pad_id: int, length: Optional[int] = None):
    """Right-pad token lists into (N, length or the longest) int32 and their lengths (N,)."""
    lengths = np.array([len(q) for q in seqs], np.int32)
    out = np.full((len(seqs), int(length or lengths.max())), pad_id, np.int32)
    for i, q in enumerate(seqs):
        out[i, :len(q)] = q
    return out, lengths
