"""The embedded dataset: procedurally rendered captioned scenes, as a grain source.

Example i of split s is a pure function of (seed, s, i), so the source is
random-access, unbounded in practice (2^48 examples, the most grain's index
arithmetic takes) and needs no files:

    source = ShapesSource(resolution=32)
    ds = grain.MapDataset.source(source).shuffle(seed=0)

Look at it:

    python -m unimm.data.shapes --out grid.png --n 64
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional, Sequence

import numpy as np

from unimm.data import spec as spec_lib
from unimm.data import vocab
from unimm.data.questions import questions
from unimm.data.scenes import render, sample_scene

SPLITS = {"train": 0, "eval": 1}


@dataclasses.dataclass(frozen=True)
class ShapesSource:
    """Random-access source of scene examples.

    Each example is a dict:
      image     uint8 (resolution, resolution, 3)
      caption   str, e.g. "a red circle to the left of a blue square"
      category  one of spec.ALL_CATEGORIES
      spec      the caption's structured form (Spec.to_dict())
      scene     ground truth: background and objects with shape, color, box, center
      qa        list of {"kind", "question", "answer"} (VQA and POPE probes)
      index     the example's index

    Args:
      resolution: image side in pixels.
      seed: dataset seed; with split and index it fixes every example.
      split: "train" or "eval"; the two draw disjoint random streams.
      categories: caption categories to draw, uniformly (or by `weights`).
      weights: relative frequency of each category.
      holdout: never caption the compositions reserved for generation evaluation
        (spec.is_heldout); set False to train on everything.
      backgrounds: background names to draw from (vocab.BACKGROUNDS).
      color_prob: how often optional colours are named in counting/position captions.
      size: length reported to grain; 2^48 by default (never exhausted).
    """

    resolution: int = 32
    seed: int = 0
    split: str = "train"
    categories: Sequence[str] = spec_lib.ALL_CATEGORIES
    weights: Optional[Sequence[float]] = None
    holdout: bool = True
    backgrounds: Sequence[str] = ("white",)
    color_prob: float = 0.5
    supersample: int = 4
    size: int = 2**48

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {self.split!r}")
        if self.resolution < 16:
            raise ValueError(f"resolution {self.resolution} is too small for recognisable shapes; use >= 16 (32 or 64)")
        bad = [c for c in self.categories if c not in spec_lib.ALL_CATEGORIES]
        if bad or not self.categories:
            raise ValueError(f"unknown categories {bad}; choose from {spec_lib.ALL_CATEGORIES}")
        bad = [b for b in self.backgrounds if b not in vocab.BACKGROUNDS]
        if bad or not self.backgrounds:
            raise ValueError(f"unknown backgrounds {bad}; choose from {list(vocab.BACKGROUNDS)}")
        if self.weights is not None and (len(self.weights) != len(self.categories) or min(self.weights) < 0
                                         or sum(self.weights) <= 0):
            raise ValueError("weights must be one non-negative number per category, not all zero")
        object.__setattr__(self, "categories", tuple(self.categories))
        object.__setattr__(self, "backgrounds", tuple(self.backgrounds))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a source of size {self.size}")
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        p = None if self.weights is None else np.asarray(self.weights, float) / sum(self.weights)
        category = self.categories[rng.choice(len(self.categories), p=p)]
        while True:
            spec = spec_lib.sample_spec(category, rng, self.color_prob)
            if not (self.holdout and spec_lib.is_heldout(spec)):
                break
        scene = sample_scene(spec, rng, self.backgrounds)
        return {
            "index": index,
            "image": render(scene, self.resolution, self.supersample),
            "caption": spec_lib.caption(spec),
            "category": category,
            "spec": spec.to_dict(),
            "scene": scene.to_dict(),
            "qa": [dataclasses.asdict(q) for q in questions(scene, rng)],
        }


def main(argv=None):
    from unimm.data.grid import make_grid

    parser = argparse.ArgumentParser(description="Write a grid of embedded scenes with their captions.")
    parser.add_argument("--out", default="grid.png", help="PNG path to write")
    parser.add_argument("--n", type=int, default=64, help="number of scenes")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", choices=list(SPLITS))
    parser.add_argument("--start", type=int, default=0, help="first index")
    parser.add_argument("--tile", type=int, default=128, help="displayed tile size in px")
    parser.add_argument("--backgrounds", default="white",
                        help=f"comma-separated, from {','.join(vocab.BACKGROUNDS)}")
    parser.add_argument("--qa", action="store_true", help="also print each scene's questions and answers")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")
    try:
        source = ShapesSource(resolution=args.resolution, seed=args.seed, split=args.split,
                              backgrounds=tuple(args.backgrounds.split(",")))
    except ValueError as e:
        parser.error(str(e))
    examples = [source[args.start + i] for i in range(args.n)]
    grid = make_grid([e["image"] for e in examples], [e["caption"] for e in examples], tile=args.tile)
    grid.save(args.out)
    for e in examples:
        print(f"{e['index']:6d}  {e['category']:<14} {e['caption']}")
        if args.qa:
            for q in e["qa"]:
                print(f"        {q['kind']:<17} {q['question']} -> {q['answer']}")
    print(f"wrote {args.out} ({args.n} scenes at {args.resolution} px)")


if __name__ == "__main__":
    main()
