"""The versioned prompt set for generation evaluation (our GenEval prompt list).

`load()` reads the shipped file `prompts/geneval_v1.jsonl`; `build(version)`
regenerates it from code, and a test keeps the two identical, so the list never
changes silently. A new list gets a new version; old scores stay comparable.

v1 (316 unique prompts):
  single_object   4   every shape                     ("a circle")
  colors         24   every colour-shape pair         ("a red circle")
  two_object     12   every ordered shape pair        ("a circle and a square")
  counting       84   2-4 of a shape, plain or coloured ("three green triangles")
  position       96   held-out shape/axis triples     ("a circle to the left of a square")
  color_attr     96   held-out colour bindings        ("a red circle and a blue square")

Held apart from training by construction: position and colour-attribution
prompts state compositions that `spec.is_heldout` reserves, and ShapesSource
(holdout=True, the default) never captions them; `holdout=False` trains on
everything. The other four categories have closed prompt spaces (4-84 texts):
training must name every shape and colour, so those prompts are in-distribution,
as GenEval's are, and are scored on fresh samples.

Categories with few prompts get more samples per prompt: `plan()` spreads an
image budget evenly over categories.
"""

from __future__ import annotations

import functools
import itertools
import json
import pathlib
import re

import numpy as np

from unimm.data import spec as spec_lib
from unimm.data import vocab
from unimm.data.spec import Group, Spec

LATEST = "v1"
_DIR = pathlib.Path(__file__).parent / "prompts"
ID_RE = re.compile(r"^(?P<id>[a-z_]+-\d{3})(?:_(?P<sample>\d+))?$")


def _entries(category: str, specs) -> list[dict]:
    return [
        {"id": f"{category}-{i:03d}", "category": category, "prompt": spec_lib.caption(s), "spec": s.to_dict()}
        for i, s in enumerate(specs)
    ]


def _build_v1() -> list[dict]:
    rng = np.random.default_rng(20241101)
    shapes, colors = vocab.SHAPES, list(vocab.COLORS)
    single = [Spec("single_object", (Group(s),)) for s in shapes]
    colored = [Spec("colors", (Group(s, 1, c),)) for c in colors for s in shapes]
    two = [Spec("two_object", (Group(a), Group(b))) for a, b in itertools.permutations(shapes, 2)]
    counts = range(spec_lib.COUNTING_RANGE[0], spec_lib.COUNTING_RANGE[1] + 1)
    counting = [Spec("counting", (Group(s, n),)) for n in counts for s in shapes]
    counting += [Spec("counting", (Group(s, n, c),)) for n in counts for s in shapes for c in colors]

    # Position: both phrasings of every held-out triple, plain and with colours.
    plain_pos, colored_pos = [], []
    for a, b, axis in sorted(spec_lib.HELDOUT_POSITIONS):
        first, second = ("left of", "right of") if axis == "h" else ("above", "below")
        for x, rel, y in ((a, first, b), (b, second, a)):
            plain_pos.append(Spec("position", (Group(x), Group(y)), rel))
            colored_pos += [Spec("position", (Group(x, 1, c1), Group(y, 1, c2)), rel)
                            for c1, c2 in itertools.permutations(colors, 2)]
    picks = sorted(rng.choice(len(colored_pos), 96 - len(plain_pos), replace=False))
    position = plain_pos + [colored_pos[i] for i in picks]

    # Colour attribution: both orders of every held-out binding.
    attr = []
    for x, y in sorted(spec_lib.HELDOUT_BINDINGS):
        for (c1, s1), (c2, s2) in ((x, y), (y, x)):
            attr.append(Spec("color_attr", (Group(s1, 1, c1), Group(s2, 1, c2))))
    out = []
    for cat, specs in zip(spec_lib.CATEGORIES, (single, two, counting, colored, position, attr)):
        out += _entries(cat, specs)
    return out


_BUILDERS = {"v1": _build_v1}


def build(version: str = LATEST) -> list[dict]:
    if version not in _BUILDERS:
        raise ValueError(f"unknown prompt set version {version!r}; known: {sorted(_BUILDERS)}")
    return _BUILDERS[version]()


def path(version: str = LATEST) -> pathlib.Path:
    return _DIR / f"geneval_{version}.jsonl"


@functools.lru_cache(maxsize=None)
def _load(version: str) -> tuple[dict, ...]:
    p = path(version)
    if not p.exists():
        raise FileNotFoundError(f"no prompt file {p}; known versions: {sorted(_BUILDERS)}")
    with p.open() as f:
        return tuple(json.loads(line) for line in f if line.strip())


def load(version: str = LATEST) -> list[dict]:
    """The shipped prompt list: dicts with id, category, prompt, spec."""
    return [dict(e) for e in _load(version)]


def by_id(version: str = LATEST) -> dict[str, dict]:
    return {e["id"]: e for e in _load(version)}


def plan(images_per_category: int, version: str = LATEST) -> list[tuple[dict, int]]:
    """(prompt, sample index) pairs: `images_per_category` per category, spread
    round-robin over the category's prompts (more samples where prompts are few)."""
    if images_per_category < 1:
        raise ValueError("images_per_category must be >= 1")
    out = []
    for cat in spec_lib.CATEGORIES:
        entries = [e for e in _load(version) if e["category"] == cat]
        for k in range(images_per_category):
            out.append((dict(entries[k % len(entries)]), k // len(entries)))
    return out


def image_name(prompt_id: str, sample: int) -> str:
    """File stem for a generated image: '<id>' for sample 0, '<id>_<k>' after."""
    return prompt_id if sample == 0 else f"{prompt_id}_{sample}"


def write(version: str = LATEST) -> pathlib.Path:
    """Regenerate the shipped file (run once when a new version is added)."""
    p = path(version)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w") as f:
        for e in build(version):
            f.write(json.dumps(e, sort_keys=True) + "\n")
    return p


if __name__ == "__main__":
    print(f"wrote {write()}")
