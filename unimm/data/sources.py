"""Training data sources by name (`config.data.source`).

A source factory takes (data config, image resolution, split, seed) and returns
a grain random-access source (`__len__`, `__getitem__`) of example dicts with
at least `image` (uint8 H x W x 3) and `caption` (str); recipes that train
understanding also read `qa` ([{"kind", "question", "answer"}]). Register a new
one with `register("name", factory)` (before the config that names it is
built); the pipeline and recipes need no change.
"""

from __future__ import annotations

from typing import Callable

from unimm.data.shapes import ShapesSource

SHAPES_KEYS = ("categories", "weights", "holdout", "backgrounds", "color_prob", "size")

_FACTORIES: dict[str, Callable] = {}


def register(name: str, factory: Callable) -> None:
    """Make `factory(data_cfg, resolution, split, seed)` the source `data.source=name` builds."""
    _FACTORIES[name] = factory


def names() -> list[str]:
    return sorted(_FACTORIES)


def as_tuple(value) -> tuple:
    """A config sequence; 'a,b' (as --config.data.categories=a,b gives it) reads as ('a', 'b')."""
    items = [value] if isinstance(value, str) else list(value)
    out = []
    for item in items:
        out += [x.strip() for x in item.split(",")] if isinstance(item, str) else [item]
    return tuple(out)


def make(data_cfg, resolution: int, split: str = "train", seed: int = 0):
    """The source `data_cfg.source` names, for `split`, drawn with `seed`."""
    name = data_cfg.source
    if name == "synthetic":
        raise ValueError("data.source='synthetic' is random data for benchmarks (python -m unimm.bench); "
                         f"train on one of {names()}")
    if name not in _FACTORIES:
        raise ValueError(f"unknown data source {name!r}; registered: {names()} (unimm.data.sources.register adds one)")
    return _FACTORIES[name](data_cfg, resolution, split, seed)


def _shapes(data_cfg, resolution: int, split: str, seed: int) -> ShapesSource:
    """The embedded procedural scenes."""
    kwargs = {k: data_cfg[k] for k in SHAPES_KEYS if k in data_cfg and data_cfg[k] is not None}
    if not kwargs.get("size"):
        kwargs.pop("size", None)  # 0 means unbounded
    for k in ("categories", "weights", "backgrounds"):
        if k in kwargs:
            kwargs[k] = as_tuple(kwargs[k])
    return ShapesSource(resolution=resolution, seed=seed, split=split, **kwargs)


register("shapes", _shapes)
