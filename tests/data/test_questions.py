import collections

import numpy as np

from unimm.data import vocab
from unimm.data.questions import RELATION_ANSWER, questions
from unimm.data.scenes import Obj, Scene, relations
from unimm.data.shapes import ShapesSource


def _scene(e):
    return Scene(tuple(Obj(o["shape"], o["color"], tuple(o["box"])) for o in e["scene"]["objects"]))


def test_answers_are_true_of_the_scene():
    src = ShapesSource(resolution=32)
    kinds = collections.Counter()
    for i in range(150):
        e = src[i]
        objs = _scene(e).objects
        for q in e["qa"]:
            kinds[q["kind"]] += 1
            words = q["question"].rstrip("?").split()
            if q["kind"] == "color":  # what color is the <shape>?
                assert [o.color for o in objs if o.shape == words[-1]] == [q["answer"]]
            elif q["kind"] == "shape":  # what shape is the <color> object?
                assert [o.shape for o in objs if o.color == words[-2]] == [q["answer"]]
            elif q["kind"] == "count":
                n = sum(o.shape + "s" == words[2] for o in objs)
                assert vocab.NUMBER_WORDS[n] == q["answer"]
            elif q["kind"] == "count_all":
                assert vocab.NUMBER_WORDS[len(objs)] == q["answer"]
            elif q["kind"] == "position":  # where is the <c> <s> relative to the <c> <s>?
                a = next(o for o in objs if (o.color, o.shape) == (words[3], words[4]))
                b = next(o for o in objs if (o.color, o.shape) == (words[-2], words[-1]))
                assert {RELATION_ANSWER[r] for r in relations(a, b)} == {q["answer"]}
            else:  # is there a <color> <shape> in the image?
                present = any((o.color, o.shape) == (words[3], words[4]) for o in objs)
                assert q["answer"] == ("yes" if present else "no")
    assert set(kinds) == {"color", "shape", "count", "count_all", "position", "pope_random", "pope_adversarial"}


def test_pope_is_balanced_and_adversarial_negatives_are_near():
    e = ShapesSource(resolution=32)[0]
    objs = _scene(e).objects
    for kind in ("pope_random", "pope_adversarial"):
        probes = [q for q in e["qa"] if q["kind"] == kind]
        assert sum(q["answer"] == "yes" for q in probes) == sum(q["answer"] == "no" for q in probes)
    for q in e["qa"]:
        if q["kind"] == "pope_adversarial" and q["answer"] == "no":
            color, shape = q["question"].split()[3:5]
            assert any(o.color == color or o.shape == shape for o in objs)


def test_questions_are_deterministic_given_rng():
    scene = _scene(ShapesSource()[3])
    a = questions(scene, np.random.default_rng(1))
    b = questions(scene, np.random.default_rng(1))
    assert a == b
