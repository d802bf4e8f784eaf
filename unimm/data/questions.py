"""Question/answer pairs about a scene, for understanding: VQA and POPE probes.

Every question has exactly one correct short answer from a closed set, so
answers score by exact match. A question is only asked when the scene makes it
unambiguous (e.g. "what color is the circle?" needs exactly one circle).
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from unimm.data import vocab
from unimm.data.scenes import Scene, relations

KINDS = ("color", "shape", "count", "count_all", "position", "pope_random", "pope_adversarial")

# Relation -> one-word answer to "where is A relative to B?".
RELATION_ANSWER = {"left of": "left", "right of": "right", "above": "above", "below": "below"}


@dataclasses.dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str


def _name(color, shape):
    return f"{color} {shape}"


def pope_question(color: str, shape: str) -> str:
    return f"is there {vocab.article(color)} {color} {shape} in the image?"


def questions(scene: Scene, rng: np.random.Generator) -> list[QA]:
    objs = scene.objects
    shape_count = collections.Counter(o.shape for o in objs)
    color_count = collections.Counter(o.color for o in objs)
    pair_count = collections.Counter((o.color, o.shape) for o in objs)
    out = []
    for o in objs:
        if shape_count[o.shape] == 1:
            out.append(QA("color", f"what color is the {o.shape}?", o.color))
        if color_count[o.color] == 1:
            out.append(QA("shape", f"what shape is the {o.color} object?", o.shape))
    shape = vocab.SHAPES[rng.integers(len(vocab.SHAPES))]
    out.append(QA("count", f"how many {vocab.plural(shape)} are there?", vocab.NUMBER_WORDS[shape_count[shape]]))
    out.append(QA("count_all", "how many objects are there?", vocab.NUMBER_WORDS[len(objs)]))
    for a in objs:
        for b in objs:
            if a is b or pair_count[(a.color, a.shape)] > 1 or pair_count[(b.color, b.shape)] > 1:
                continue
            rel = relations(a, b)
            if len(rel) == 1:
                q = f"where is the {_name(a.color, a.shape)} relative to the {_name(b.color, b.shape)}?"
                out.append(QA("position", q, RELATION_ANSWER[rel.pop()]))
    out.extend(pope_probes(scene, rng))
    return out


def pope_probes(scene: Scene, rng: np.random.Generator) -> list[QA]:
    """POPE: a yes-probe per distinct present object, and as many no-probes per
    negative kind: random absent objects, and adversarial ones that share the
    shape or the colour of a present object."""
    present = sorted({(o.color, o.shape) for o in scene.objects})
    absent = [(c, s) for c in vocab.COLORS for s in vocab.SHAPES if (c, s) not in present]
    near = [p for p in absent if any(p[0] == c or p[1] == s for c, s in present)]
    out = []
    for kind, pool in (("pope_random", absent), ("pope_adversarial", near)):
        out.extend(QA(kind, pope_question(c, s), "yes") for c, s in present)
        picks = rng.choice(len(pool), size=min(len(present), len(pool)), replace=False)
        out.extend(QA(kind, pope_question(*pool[i]), "no") for i in picks)
    return out
