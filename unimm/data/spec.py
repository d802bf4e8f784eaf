"""Structured scene descriptions ("specs"), their captions, and the caption parser.

A spec is what a caption says, in the form GenEval's metadata has: groups of
objects (shape, count, optional colour) and an optional relation of the first
group to the second. The same spec drives three things: the caption text, the
sampling of a scene that satisfies it, and the checker that decides whether an
image satisfies it. `parse_caption` inverts `caption`, so model outputs and CLI
prompts become specs too.

Category templates follow GenEval: single object "a circle", colors "a red
circle", two objects "a circle and a square", counting "three triangles",
position "a circle to the left of a square", color attribution "a red circle and
a blue square". Training captions also use coloured variants of the counting and
position forms ("three green triangles", "a red circle to the left of a blue
square") and a multi-object form ("a red circle, a blue square and a green
triangle").
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
from typing import Optional

import numpy as np

from unimm.data import vocab

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# Training-only form: a full list of 3-4 coloured objects.
MULTI_OBJECT = "multi_object"
ALL_CATEGORIES = CATEGORIES + (MULTI_OBJECT,)

COUNTING_RANGE = (2, 4)


@dataclasses.dataclass(frozen=True)
class Group:
    shape: str
    count: int = 1
    color: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Spec:
    category: str
    groups: tuple[Group, ...]
    relation: Optional[str] = None  # how groups[0] lies relative to groups[1]

    @property
    def exact_count(self) -> bool:
        """Counting prompts ask for exactly `count` objects (GenEval excludes count+1)."""
        return self.category == "counting"

    @property
    def num_objects(self) -> int:
        return sum(g.count for g in self.groups)

    def to_dict(self) -> dict:
        return {
            "category": self.category,
            "groups": [dataclasses.asdict(g) for g in self.groups],
            "relation": self.relation,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Spec":
        return cls(d["category"], tuple(Group(**g) for g in d["groups"]), d.get("relation"))


# ---------------------------------------------------------------------------
# Spec -> text


def _phrase(g: Group) -> str:
    color = f"{g.color} " if g.color else ""
    if g.count == 1:
        return f"{vocab.article(color or g.shape)} {color}{g.shape}"
    return f"{vocab.NUMBER_WORDS[g.count]} {color}{vocab.plural(g.shape)}"


def caption(spec: Spec) -> str:
    phrases = [_phrase(g) for g in spec.groups]
    if spec.relation:
        return f"{phrases[0]} {vocab.RELATION_TEXT[spec.relation]} {phrases[1]}"
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


# ---------------------------------------------------------------------------
# Text -> spec

_COLOR = "|".join(vocab.COLORS)
_SHAPE = "|".join(vocab.SHAPES)
_NUMBER = "|".join(vocab.NUMBER_WORDS[2:])
_PHRASE_RE = re.compile(
    rf"^(?:(?:a|an) (?:(?P<c1>{_COLOR}) )?(?P<s1>{_SHAPE})"
    rf"|(?P<n>{_NUMBER}) (?:(?P<c2>{_COLOR}) )?(?P<s2>{_SHAPE})s)$"
)
_RELATION_RE = re.compile(
    "^(.+?) (" + "|".join(re.escape(t) for t in vocab.RELATION_TEXT.values()) + ") (.+)$"
)
_TEXT_TO_RELATION = {t: r for r, t in vocab.RELATION_TEXT.items()}

GRAMMAR_HELP = (
    "captions look like 'a circle', 'a red circle', 'a circle and a square', "
    "'three green triangles', 'a red circle to the left of a blue square', "
    "'a red circle, a blue square and a green triangle' "
    f"(shapes: {', '.join(vocab.SHAPES)}; colours: {', '.join(vocab.COLORS)})"
)


class CaptionError(ValueError):
    pass


def normalize_text(text: str) -> str:
    text = text.lower().strip().rstrip(".")
    text = text.replace("colour", "color")
    return re.sub(r"\s+", " ", text)


def _parse_phrase(text: str) -> Group:
    m = _PHRASE_RE.match(text)
    if not m:
        raise CaptionError(f"cannot read {text!r} as an object phrase; {GRAMMAR_HELP}")
    if m.group("s1"):
        return Group(m.group("s1"), 1, m.group("c1"))
    return Group(m.group("s2"), vocab.NUMBER_WORDS.index(m.group("n")), m.group("c2"))


def parse_caption(text: str) -> Spec:
    """Read a caption of the scene grammar into a spec; CaptionError if it is not one."""
    text = normalize_text(text)
    rel = _RELATION_RE.match(text)
    if rel:
        a, b = _parse_phrase(rel.group(1)), _parse_phrase(rel.group(3))
        if a.count != 1 or b.count != 1:
            raise CaptionError(f"{text!r}: position captions relate two single objects")
        return Spec("position", (a, b), _TEXT_TO_RELATION[rel.group(2)])
    parts = text.rsplit(" and ", 1)
    items = parts[0].split(", ") + parts[1:]
    groups = tuple(_parse_phrase(p) for p in items)
    if len(groups) == 1:
        g = groups[0]
        if g.count > 1:
            return Spec("counting", groups)
        return Spec("colors" if g.color else "single_object", groups)
    if any(g.count > 1 for g in groups):
        raise CaptionError(f"{text!r}: counts go alone ('three triangles'); {GRAMMAR_HELP}")
    if len(groups) == 2:
        return Spec("color_attr" if all(g.color for g in groups) else "two_object", groups)
    return Spec(MULTI_OBJECT, groups)


# ---------------------------------------------------------------------------
# Held-out compositions
#
# Generation prompts for color attribution and position are compositions that
# training never captions (when holdout is on). The choice is by SHA-256 of a
# canonical key, so it never changes with library versions. Colour binding keys
# are unordered pairs of (colour, shape); position keys are (first, second, axis)
# with `first` left of / above `second`.

HELDOUT_BINDINGS_COUNT = 48  # of 180 possible pairs
HELDOUT_POSITIONS_COUNT = 6  # of 24 possible triples


def _stable_rank(keys):
    return sorted(keys, key=lambda k: hashlib.sha256(repr(k).encode()).hexdigest())


def _binding_key(a: tuple[str, str], b: tuple[str, str]):
    return tuple(sorted([a, b]))


def _position_key(a: str, rel: str, b: str):
    if rel in ("right of", "below"):
        a, b, rel = b, a, vocab.INVERSE_RELATION[rel]
    return (a, b, "h" if rel == "left of" else "v")


def _all_bindings():
    objs = [(c, s) for c in vocab.COLORS for s in vocab.SHAPES]
    return [
        _binding_key(x, y)
        for x, y in itertools.combinations(objs, 2)
        if x[0] != y[0] and x[1] != y[1]
    ]


def _all_positions():
    return [(a, b, ax) for a in vocab.SHAPES for b in vocab.SHAPES if a != b for ax in "hv"]


HELDOUT_BINDINGS = frozenset(_stable_rank(_all_bindings())[:HELDOUT_BINDINGS_COUNT])
HELDOUT_POSITIONS = frozenset(_stable_rank(_all_positions())[:HELDOUT_POSITIONS_COUNT])


def is_heldout(spec: Spec) -> bool:
    """True if the caption states a composition reserved for generation evaluation."""
    if spec.relation and _position_key(spec.groups[0].shape, spec.relation, spec.groups[1].shape) in HELDOUT_POSITIONS:
        return True
    colored = [(g.color, g.shape) for g in spec.groups if g.color and g.count == 1]
    return any(
        _binding_key(x, y) in HELDOUT_BINDINGS
        for x, y in itertools.combinations(colored, 2)
        if x[0] != y[0] and x[1] != y[1]
    )


# ---------------------------------------------------------------------------
# Sampling specs


def _pick(rng: np.random.Generator, seq, n=None, replace=False):
    idx = rng.choice(len(seq), size=n, replace=replace)
    return seq[idx] if n is None else [seq[i] for i in idx]


def sample_spec(category: str, rng: np.random.Generator, color_prob: float = 0.5) -> Spec:
    """A random caption spec of `category`. `color_prob`: how often optional colours are named."""
    shapes, colors = vocab.SHAPES, tuple(vocab.COLORS)
    if category in ("single_object", "colors"):
        color = _pick(rng, colors) if category == "colors" else None
        return Spec(category, (Group(_pick(rng, shapes), 1, color),))
    if category in ("two_object", "color_attr", "position"):
        s = _pick(rng, shapes, 2)
        with_color = category == "color_attr" or (category == "position" and rng.random() < color_prob)
        c = _pick(rng, colors, 2) if with_color else [None, None]
        relation = _pick(rng, vocab.RELATIONS) if category == "position" else None
        return Spec(category, (Group(s[0], 1, c[0]), Group(s[1], 1, c[1])), relation)
    if category == "counting":
        n = int(rng.integers(COUNTING_RANGE[0], COUNTING_RANGE[1] + 1))
        color = _pick(rng, colors) if rng.random() < color_prob else None
        return Spec(category, (Group(_pick(rng, shapes), n, color),))
    if category == MULTI_OBJECT:
        n = int(rng.integers(3, vocab.MAX_OBJECTS + 1))
        pairs = [(c, s) for c in colors for s in shapes]
        return Spec(category, tuple(Group(s, 1, c) for c, s in _pick(rng, pairs, n)))
    raise ValueError(f"unknown category {category!r}; expected one of {ALL_CATEGORIES}")
