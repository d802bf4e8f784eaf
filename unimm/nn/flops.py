"""Analytic model FLOPs of the decoder: matmuls plus attention over the pairs
the mask allows (causal pairs plus the extra pairs of bidirectional spans).

Model FLOPs count the model's arithmetic once (forward + backward = 3x forward),
not recomputation from rematerialisation, as in PaLM's MFU.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import numpy as np
from flax import nnx

from unimm.nn.transformer import DecoderConfig


def attention_pairs(segment: np.ndarray, span: np.ndarray) -> int:
    """Number of (query, key) pairs the attention mask allows, summed over a batch.

    Per document of n tokens, n(n+1)/2 causal pairs; per image span of m tokens,
    m(m-1)/2 more (keys later than the query inside the span). Assumes each
    document's tokens are in position order, as every layout here is.
    """
    segment, span = np.asarray(segment), np.asarray(span)
    total = 0
    for seg_row, span_row in zip(segment.reshape(-1, segment.shape[-1]), span.reshape(-1, span.shape[-1])):
        _, doc_sizes = np.unique(seg_row[seg_row != 0], return_counts=True)
        total += int((doc_sizes * (doc_sizes + 1) // 2).sum())
        in_span = (span_row != 0) & (seg_row != 0)
        keys = seg_row[in_span].astype(np.int64) * (1 << 32) + span_row[in_span]
        _, span_sizes = np.unique(keys, return_counts=True)
        total += int((span_sizes * (span_sizes - 1) // 2).sum())
    return total


def decoder_forward_flops(cfg: DecoderConfig, tokens: int, pairs: int) -> float:
    """Forward FLOPs of the decoder stack for `tokens` tokens and `pairs` attended pairs."""
    d, h, kh, hd, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    matmul_params = d * h * hd + 2 * d * kh * hd + h * hd * d + 3 * d * f
    per_layer = 2 * tokens * matmul_params + 2 * 2 * pairs * h * hd  # QK^T and PV
    return float(cfg.num_layers * per_layer)


def dense_flops(tokens: int, fan_in: int, fan_out: int) -> float:
    return 2.0 * tokens * fan_in * fan_out


def _flops_of(analysis) -> Optional[float]:
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def xla_flops(fn, *abstract_args) -> float:
    """FLOPs XLA counts in `fn`'s program (for conv stacks and other layers whose
    arithmetic is tedious to write down). Never runs it.

    The unoptimised program's count where the backend gives one (CPU, TPU); the
    GPU backend gives none for a lowering, so there the compiled program's."""
    lowered = jax.jit(fn).lower(*abstract_args)
    flops = _flops_of(lowered.cost_analysis())
    if flops is None:
        flops = _flops_of(lowered.compile().cost_analysis())
    if flops is None:
        raise RuntimeError(f"XLA gave no FLOP count for {getattr(fn, '__name__', fn)!r}")
    return flops


TRAIN_MULTIPLIER = 3.0  # backward is twice the forward


def lm_forward_flops(cfg: DecoderConfig, segment, span, vocab_size: int) -> float:
    """Forward FLOPs of a decoder with an output head over a batch's token
    metadata: every non-padding token through the stack and the head, attention
    over the pairs the mask allows."""
    tokens = int((np.asarray(segment) != 0).sum())
    return decoder_forward_flops(cfg, tokens, attention_pairs(segment, span)) + dense_flops(tokens, cfg.d_model,
                                                                                          vocab_size)


def module_flops(make_model: Callable, pick: Callable, call: Callable, *abstract_inputs) -> float:
    """XLA's FLOP count of `call(pick(model), *inputs)` for one abstract model
    from `make_model()` (never initialised): e.g. one image through a recipe's
    image encoder."""
    model = nnx.eval_shape(make_model)
    graphdef, state = nnx.split(pick(model))
    return xla_flops(lambda st, *xs: call(nnx.merge(graphdef, st), *xs), state, *abstract_inputs)
