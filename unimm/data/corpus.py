"""Every text of the scene world (captions, questions, answers), for tokenizer training."""

from __future__ import annotations

import itertools

import numpy as np

from unimm.data import spec as spec_lib
from unimm.data import vocab
from unimm.data.questions import RELATION_ANSWER, pope_question
from unimm.data.spec import Group, Spec


def captions() -> list[str]:
    """All single/colour/counting captions and two-object forms, and multi-object samples."""
    out = []
    shapes, colors = vocab.SHAPES, list(vocab.COLORS)
    for s in shapes:
        for c in [None] + colors:
            for n in range(1, vocab.MAX_OBJECTS + 1):
                out.append(spec_lib.caption(Spec("x", (Group(s, n, c),))))
    for a, b in itertools.permutations(shapes, 2):
        for ca, cb in [(None, None)] + list(itertools.permutations(colors, 2)):
            out.append(spec_lib.caption(Spec("x", (Group(a, 1, ca), Group(b, 1, cb)))))
            for rel in vocab.RELATIONS:
                out.append(spec_lib.caption(Spec("x", (Group(a, 1, ca), Group(b, 1, cb)), rel)))
    rng = np.random.default_rng(0)
    out += [spec_lib.caption(spec_lib.sample_spec(spec_lib.MULTI_OBJECT, rng)) for _ in range(500)]
    return out


def questions_and_answers() -> list[str]:
    out = ["how many objects are there?"]
    for s in vocab.SHAPES:
        out += [f"what color is the {s}?", f"how many {vocab.plural(s)} are there?"]
        for c in vocab.COLORS:
            out += [f"what shape is the {c} object?", pope_question(c, s)]
    out += list(vocab.NUMBER_WORDS) + list(RELATION_ANSWER.values()) + ["yes", "no"]
    out += list(vocab.SHAPES) + list(vocab.COLORS)
    for (c1, s1), (c2, s2) in itertools.islice(
            itertools.permutations([(c, s) for c in vocab.COLORS for s in vocab.SHAPES], 2), 0, None, 7):
        out.append(f"where is the {c1} {s1} relative to the {c2} {s2}?")
    return out


def corpus() -> list[str]:
    return captions() + questions_and_answers()
