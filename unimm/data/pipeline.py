"""Training and evaluation data: grain datasets of encoded recipe streams.

A recipe declares its streams (name, mixing weight, encoder, examples per
sequence); this module draws each stream from its own seed of the data source
(`data.source`, from the registry in unimm.data.sources),
encodes it, mixes the streams by weight, keeps this process's share and batches
it. The result is a checkpointable grain iterator of numpy batches.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import numpy as np

from unimm.data import sources

def make_source(data_cfg, resolution: int, split: str = "train", seed_offset: int = 0):
    """The source a config's `data` section describes (unimm.data.sources)."""
    return sources.make(data_cfg, resolution, split, data_cfg.seed + seed_offset)


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


def pack(documents: grain.IterDataset, packing) -> grain.IterDataset:
    """Rows of first-fit packed documents (`packing`: an objective's Packing)."""
    rows = grain.experimental.FirstFitPackIterDataset(documents, length_struct=dict(packing.lengths),
                                                      num_packing_bins=packing.bins, shuffle_bins=False)
    return rows.map(packing.finish)


def batches(data_cfg, resolution: int, streams: Sequence, global_batch: int, process_index: int = 0,
            process_count: int = 1, split: str = "train", packing=None) -> grain.IterDataset:
    """This process's batches: global_batch / process_count rows each (examples,
    or documents packed into rows when `packing` is given)."""
    if global_batch % process_count:
        raise ValueError(f"data.batch_size={global_batch} is not divisible by the {process_count} processes")
    ds = mixed_dataset(data_cfg, resolution, streams, split)[process_index::process_count]
    options = grain.ReadOptions(num_threads=data_cfg.get("num_threads", 2),
                                prefetch_buffer_size=data_cfg.get("prefetch", 4))
    if packing is None:
        return ds.batch(global_batch // process_count, drop_remainder=True).to_iter_dataset(options)
    return pack(ds.to_iter_dataset(options), packing).batch(global_batch // process_count, drop_remainder=True)


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
