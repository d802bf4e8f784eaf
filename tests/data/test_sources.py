import ml_collections
import numpy as np
import pytest

from unimm.data import pipeline, sources
from unimm.objectives.base import Stream


def _solid(data_cfg, resolution, split, seed):
    """A source of one-colour images captioned by their colour."""
    colours = {"red": (255, 0, 0), "blue": (0, 0, 255)}

    class Solid:
        def __len__(self):
            return 1000

        def __getitem__(self, i):
            name = sorted(colours)[(i + seed) % 2]
            return {"image": np.full((resolution, resolution, 3), colours[name], np.uint8), "caption": name}

    return Solid()


def test_a_registered_source_feeds_the_pipeline_unchanged():
    sources.register("solid", _solid)
    cfg = ml_collections.ConfigDict(dict(source="solid", seed=0, num_threads=1, prefetch=1))
    stream = Stream("captions", 1.0, lambda exs, rng: {"image": exs[0]["image"],
                                                        "red": np.bool_(exs[0]["caption"] == "red")})
    batch = next(iter(pipeline.batches(cfg, 8, [stream], global_batch=6)))
    assert batch["image"].shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(batch["red"], batch["image"][:, 0, 0, 0] == 255)
    assert "solid" in sources.names() and "shapes" in sources.names()


def test_unknown_and_synthetic_sources_are_named():
    with pytest.raises(ValueError, match="unknown data source 'laion'; registered"):
        sources.make(ml_collections.ConfigDict(dict(source="laion", seed=0)), 32)
    with pytest.raises(ValueError, match="random data for benchmarks"):
        sources.make(ml_collections.ConfigDict(dict(source="synthetic", seed=0)), 32)
