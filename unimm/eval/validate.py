"""How far to trust the scene checker: accuracy on true renders, rejection of wrong ones.

Positives are ground-truth renders of each category's captions; negatives are
images that do *not* satisfy the caption by ground truth:

  other      a render of a random other caption
  perturbed  a render of the caption with one thing changed (a colour, a shape,
             a count by one, the relation inverted, the colours swapped)
  noise      uniform pixel noise
  blank      an empty canvas of each background
  blurred    a perturbed render, Gaussian-blurred (sigma 1 px)
  noisy      a perturbed render with Gaussian pixel noise (std 20 of 255)

Corruptions (blur, noise) can be applied to positives to measure robustness:

    python -m unimm.eval.validate [--n 100] [--resolutions 32,64]

prints the tables quoted in docs/checkers.md.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses

import numpy as np
from scipy import ndimage

from unimm.data import spec as spec_lib
from unimm.data import vocab
from unimm.data.scenes import Scene, render, sample_scene
from unimm.data.shapes import ShapesSource
from unimm.data.spec import Spec
from unimm.eval.detect import detect
from unimm.eval.rules import check

NEGATIVE_KINDS = ("other", "perturbed", "noise", "blank", "blurred", "noisy")
ALL_BACKGROUNDS = tuple(vocab.BACKGROUNDS)


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur, sigma in pixels; float result in 0..255."""
    return np.clip(ndimage.gaussian_filter(np.asarray(image, np.float32), (sigma, sigma, 0)), 0, 255)


def add_noise(image: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian pixel noise of `std` (0..255 scale); float result in 0..255."""
    return np.clip(np.asarray(image, np.float32) + rng.normal(0.0, std, np.shape(image)), 0, 255)


def corrupt(image: np.ndarray, kind: str, level: float, rng: np.random.Generator) -> np.ndarray:
    if kind == "clean" or level == 0:
        return image
    if kind == "blur":
        return blur(image, level)
    if kind == "noise":
        return add_noise(image, level, rng)
    raise ValueError(f"unknown corruption {kind!r}; expected clean, blur or noise")


def positives(resolution: int, n_per_category: int, seed: int = 0):
    """(category, spec, image) for true renders, over all backgrounds."""
    out = []
    for cat in spec_lib.CATEGORIES:
        src = ShapesSource(resolution=resolution, seed=seed, split="eval", categories=(cat,),
                           holdout=False, backgrounds=ALL_BACKGROUNDS)
        for i in range(n_per_category):
            e = src[i]
            out.append((cat, Spec.from_dict(e["spec"]), e["image"]))
    return out


def accuracy(examples, kind: str = "clean", level: float = 0.0, seed: int = 0) -> dict[str, float]:
    """Per-category pass rate of the checker on (category, spec, image) positives."""
    rng = np.random.default_rng(seed)
    hits = collections.defaultdict(list)
    for cat, spec, image in examples:
        hits[cat].append(check(spec, detect(corrupt(image, kind, level, rng)))[0])
    return {c: float(np.mean(v)) for c, v in hits.items()}


def perturb(spec: Spec, rng: np.random.Generator) -> Spec:
    """The spec with one attribute changed, so a scene for it never satisfies `spec`."""
    groups = list(spec.groups)
    colors = list(vocab.COLORS)
    options = ["shape"]
    if any(g.color for g in groups):
        options.append("color")
    if spec.category == "counting":
        options = ["count"]
    if spec.relation:
        options.append("relation")
    if spec.category == "color_attr":
        options.append("swap")
    choice = options[rng.integers(len(options))]
    i = int(rng.integers(len(groups)))
    g = groups[i]
    if choice == "shape":
        others = [s for s in vocab.SHAPES if s not in {h.shape for h in groups}]
        groups[i] = dataclasses.replace(g, shape=others[rng.integers(len(others))])
    elif choice == "color":
        i = next(k for k, h in enumerate(groups) if h.color)
        others = [c for c in colors if c != groups[i].color]
        groups[i] = dataclasses.replace(groups[i], color=others[rng.integers(len(others))])
    elif choice == "count":
        lo, hi = 1, vocab.MAX_OBJECTS
        n = g.count + (1 if g.count == lo or (g.count < hi and rng.random() < 0.5) else -1)
        groups[i] = dataclasses.replace(g, count=n)
    elif choice == "relation":
        return dataclasses.replace(spec, relation=vocab.INVERSE_RELATION[spec.relation])
    else:  # swap the colours of a colour-attribution pair
        a, b = groups
        groups = [dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color)]
    return dataclasses.replace(spec, groups=tuple(groups))


def _wrong_scene(spec: Spec, rng, make_spec) -> Scene:
    """A scene whose ground truth fails `spec` (resampled until it does)."""
    for _ in range(100):
        scene = sample_scene(make_spec(), rng, ALL_BACKGROUNDS)
        if not check(spec, scene.objects)[0]:
            return scene
    raise RuntimeError(f"could not draw a scene that fails {spec}")


def negatives(resolution: int, n_per_kind: int, seed: int = 0):
    """(kind, category, spec, image) for images that fail their spec by ground truth."""
    rng = np.random.default_rng([seed, resolution])
    prompts = positives(resolution, max(1, n_per_kind // len(spec_lib.CATEGORIES) + 1), seed + 1)
    out = []
    for kind in NEGATIVE_KINDS:
        for j in range(n_per_kind):
            cat, spec, _ = prompts[j % len(prompts)]
            if kind == "other":
                other_cat = spec_lib.CATEGORIES[rng.integers(len(spec_lib.CATEGORIES))]
                image = render(_wrong_scene(spec, rng, lambda c=other_cat: spec_lib.sample_spec(c, rng)), resolution)
            elif kind == "noise":
                image = rng.integers(0, 256, (resolution, resolution, 3)).astype(np.uint8)
            elif kind == "blank":
                image = render(Scene((), ALL_BACKGROUNDS[j % len(ALL_BACKGROUNDS)]), resolution)
            else:
                image = render(_wrong_scene(spec, rng, lambda s=spec: perturb(s, rng)), resolution)
                if kind == "blurred":
                    image = blur(image, 1.0)
                elif kind == "noisy":
                    image = add_noise(image, 20.0, rng)
            out.append((kind, cat, spec, image))
    return out


def rejection(examples) -> dict[str, float]:
    """Per negative kind, the fraction the checker rejects."""
    rejected = collections.defaultdict(list)
    for kind, _, spec, image in examples:
        rejected[kind].append(not check(spec, detect(image))[0])
    return {k: float(np.mean(v)) for k, v in rejected.items()}


BLUR_LEVELS = (0.5, 1.0, 1.5, 2.0)
NOISE_LEVELS = (10.0, 20.0, 30.0, 40.0, 60.0)


def _row(label: str, acc: dict) -> str:
    cells = "".join(f"{acc[c]:>8.2f}" for c in spec_lib.CATEGORIES)
    return f"| {label:<14}|{cells}  | {np.mean(list(acc.values())):.3f} |"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Measure the scene checker's accuracy and robustness.")
    parser.add_argument("--n", type=int, default=100, help="images per category (positives) and per negative kind")
    parser.add_argument("--resolutions", default="32,64")
    args = parser.parse_args(argv)
    short = ("single", "two", "count", "colors", "pos", "attr")
    for res in (int(r) for r in args.resolutions.split(",")):
        pos = positives(res, args.n)
        print(f"\n{res} px, {args.n} images per category, all backgrounds")
        print("| corruption    |" + "".join(f"{s:>8}" for s in short) + "  | mean  |")
        print(_row("clean", accuracy(pos)))
        for s in BLUR_LEVELS:
            print(_row(f"blur {s:g} px", accuracy(pos, "blur", s)))
        for s in NOISE_LEVELS:
            print(_row(f"noise {s:g}", accuracy(pos, "noise", s)))
        rej = rejection(negatives(res, args.n))
        print(f"rejection of wrong images ({args.n} per kind): "
              + ", ".join(f"{k} {v:.3f}" for k, v in rej.items()))


if __name__ == "__main__":
    main()
