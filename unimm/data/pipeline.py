"""Training and evaluation data: grain datasets of encoded recipe streams.

A recipe declares its streams (name, mixing weight, encoder, examples per
sequence); this module draws each stream from its own seed of the scene source,
encodes it, mixes the streams by weight, keeps this process's share and batches
it. The result is a checkpointable grain iterator of numpy batches.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import numpy as np

from unimm.data.shapes import ShapesSource

SOURCE_KEYS = ("categories", "weights", "holdout", "backgrounds", "color_prob", "size")


def _as_tuple(value) -> tuple:
    """A config sequence; 'a,b' (as --config.data.categories=a,b gives it) reads as ('a', 'b')."""
    items = [value] if isinstance(value, str) else list(value)
    out = []
    for item in items:
        out += [x.strip() for x in item.split(",")] if isinstance(item, str) else [item]
    return tuple(out)


def make_source(data_cfg, resolution: int, split: str = "train", seed_offset: int = 0) -> ShapesSource:
    """The scene source a config's `data` section describes."""
    if data_cfg.source == "synthetic":
        raise ValueError("data.source='synthetic' is random data for benchmarks (python -m unimm.bench); "
                         "train on data.source='shapes'")
    if data_cfg.source != "shapes":
        raise ValueError(f"unknown data source {data_cfg.source!r}; the embedded source is 'shapes'")
    kwargs = {k: data_cfg[k] for k in SOURCE_KEYS if k in data_cfg and data_cfg[k] is not None}
    if not kwargs.get("size"):
        kwargs.pop("size", None)  # 0 means unbounded
    for k in ("categories", "weights", "backgrounds"):
        if k in kwargs:
            kwargs[k] = _as_tuple(kwargs[k])
    return ShapesSource(resolution=resolution, seed=data_cfg.seed + seed_offset, split=split, **kwargs)


def mixed_dataset(data_cfg, resolution: int, streams: Sequence, split: str = "train") -> grain.MapDataset:
    """One encoded, mixed example per index (not yet sharded or batched)."""
    parts = []
    for i, stream in enumerate(streams):
        src = grain.MapDataset.source(make_source(data_cfg, resolution, split, seed_offset=1000 * i))
        ds = src.batch(stream.group, drop_remainder=True, batch_fn=list)
        parts.append(ds.random_map(lambda exs, rng, enc=stream.encode: enc(exs, rng), seed=data_cfg.seed + i))
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [s.weight for s in streams])
    if data_cfg.get("size"):  # a finite set of scenes (e.g. to overfit): cycle through it
        ds = ds.repeat()
    return ds


def batches(data_cfg, resolution: int, streams: Sequence, global_batch: int, process_index: int = 0,
            process_count: int = 1, split: str = "train") -> grain.IterDataset:
    """This process's batches: global_batch / process_count examples each."""
    if global_batch % process_count:
        raise ValueError(f"data.batch_size={global_batch} is not divisible by the {process_count} processes")
    ds = mixed_dataset(data_cfg, resolution, streams, split)[process_index::process_count]
    ds = ds.batch(global_batch // process_count, drop_remainder=True)
    options = grain.ReadOptions(num_threads=data_cfg.get("num_threads", 2),
                                prefetch_buffer_size=data_cfg.get("prefetch", 4))
    return ds.to_iter_dataset(options)


def stack(examples: Sequence[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


@dataclasses.dataclass
class EvalSet:
    """Fixed evaluation examples (images, captions, scenes, questions) from the eval split."""

    examples: list[dict]

    @classmethod
    def make(cls, data_cfg, resolution: int, n: int) -> "EvalSet":
        src = make_source(data_cfg, resolution, split="eval")
        return cls([src[i] for i in range(n)])
