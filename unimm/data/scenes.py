"""Scenes: objects placed on a canvas to satisfy a spec, and their rendering.

Geometry is in normalised image coordinates ([0, 1] on both axes, y down), so
one scene renders at any resolution. Objects never overlap and keep a gap, so
every object stays a separate blob at 32 px.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from unimm.data import vocab
from unimm.data.spec import Spec

# Object side (fraction of the image side) by number of objects; the smallest is
# 7 px at 32 px, where the four shapes are still told apart.
SIZE_RANGE = {1: (0.30, 0.50), 2: (0.25, 0.38), 3: (0.22, 0.30), 4: (0.22, 0.28)}
GAP = 0.08  # minimum clearance between object boxes (2.5 px at 32 px)
MARGIN = 0.03  # minimum clearance from the image border
POSITION_THRESHOLD = 0.1  # GenEval's: offsets shrink by this fraction of the summed box sizes


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1, normalised

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "box": [round(v, 5) for v in self.box],
                "center": [round(v, 5) for v in self.center]}


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str = "white"

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [o.to_dict() for o in self.objects]}


def relations(a: Obj, b: Obj) -> set[str]:
    """Where `a` lies relative to `b`, GenEval's rule: centre offsets, shrunk by a
    fraction of the boxes' sizes, count along an axis when that axis carries more
    than half of the offset's length."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box, b.box
    offset = np.array(a.center) - np.array(b.center)
    dims = np.array([ax1 - ax0 + bx1 - bx0, ay1 - ay0 + by1 - by0])
    shrunk = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0.0) * np.sign(offset)
    norm = float(np.linalg.norm(offset))
    if norm == 0.0 or np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / norm
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


# ---------------------------------------------------------------------------
# Placement


def _boxes_clear(box, others) -> bool:
    x0, y0, x1, y1 = box
    return all(x1 + GAP <= o[0] or o[2] + GAP <= x0 or y1 + GAP <= o[1] or o[3] + GAP <= y0 for o in others)


def _place(rng: np.random.Generator, n: int, shrink: float):
    lo, hi = SIZE_RANGE[n]
    boxes = []
    for _ in range(n):
        for _ in range(50):
            s = rng.uniform(lo, hi) * shrink
            cx, cy = rng.uniform(MARGIN + s / 2, 1 - MARGIN - s / 2, size=2)
            box = (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)
            if _boxes_clear(box, boxes):
                boxes.append(tuple(float(v) for v in box))
                break
        else:
            return None
    return boxes


def sample_scene(spec: Spec, rng: np.random.Generator, backgrounds=("white",)) -> Scene:
    """A random scene that satisfies `spec` exactly and contains nothing else."""
    items = []  # (shape, color) per object, in spec order
    for g in spec.groups:
        for _ in range(g.count):
            color = g.color or tuple(vocab.COLORS)[rng.integers(len(vocab.COLORS))]
            items.append((g.shape, color))
    if not 1 <= len(items) <= vocab.MAX_OBJECTS:
        raise ValueError(f"a scene holds 1 to {vocab.MAX_OBJECTS} objects, the spec asks for {len(items)}")
    background = backgrounds[rng.integers(len(backgrounds))]
    shrink = 1.0
    for attempt in range(1000):
        boxes = _place(rng, len(items), shrink)
        if boxes is not None:
            objs = tuple(Obj(s, c, b) for (s, c), b in zip(items, boxes))
            # The caption's relation must be the only one that holds, so the text is unambiguous.
            if spec.relation is None or relations(objs[0], objs[1]) == {spec.relation}:
                return Scene(objs, background)
        if attempt % 100 == 99:
            shrink *= 0.95
    raise RuntimeError(f"could not place objects for {spec}")  # not reached with the size table above


# ---------------------------------------------------------------------------
# Rendering


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in box-local coordinates u, v in [-1, 1] (v down).

    Triangles point up in scenes; the other orientations exist for the checker's
    templates, which should still name a rotated triangle in a generated image.
    """
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape.startswith("triangle"):
        orient = shape.partition("_")[2] or "up"
        u, v = {"up": (u, v), "down": (u, -v), "left": (v, u), "right": (v, -u)}[orient]
        return (np.abs(v) <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, resolution: int = 32, supersample: int = 4) -> np.ndarray:
    """RGB uint8 image (resolution, resolution, 3), anti-aliased by supersampling."""
    n = resolution * supersample
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    xs, ys = coords[None, :], coords[:, None]
    canvas = np.empty((n, n, 3), np.float32)
    canvas[:] = vocab.BACKGROUNDS[scene.background]
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        (cx, cy), hw, hh = o.center, (x1 - x0) / 2, (y1 - y0) / 2
        mask = shape_mask(o.shape, (xs - cx) / hw, (ys - cy) / hh)
        canvas[mask] = vocab.COLORS[o.color]
    pooled = canvas.reshape(resolution, supersample, resolution, supersample, 3).mean(axis=(1, 3))
    return np.round(pooled).astype(np.uint8)
