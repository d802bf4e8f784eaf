import pytest

from unimm.data.scenes import Obj
from unimm.eval import understanding as u


def test_answer_normalisation():
    assert u.normalize_answer("Three.") == u.normalize_answer("3") == "three"
    assert u.normalize_answer("The Red one") == "red one"


def test_vqa_accuracy_per_kind():
    rs = [
        {"kind": "color", "answer": "red", "prediction": "Red"},
        {"kind": "color", "answer": "red", "prediction": "blue"},
        {"kind": "count", "answer": "two", "prediction": "2"},
        {"kind": "pope_random", "answer": "yes", "prediction": "no"},  # not VQA
    ]
    s = u.vqa_scores(rs)
    assert s["kinds"] == {"color": 0.5, "count": 1.0}
    assert s["accuracy"] == pytest.approx(2 / 3) and s["n"] == 3


def test_pope_metrics():
    # 4 positives, 4 negatives; the model says yes to 3 positives and 1 negative,
    # and gives a non-answer to one negative (wrong, read as "no").
    truth = ["yes"] * 4 + ["no"] * 4
    preds = ["yes", "yes", "yes", "no", "yes", "no", "no", "maybe"]
    rs = [{"kind": "pope_random", "answer": t, "prediction": p} for t, p in zip(truth, preds)]
    s = u.pope_scores(rs)["random"]
    assert s["precision"] == pytest.approx(0.75) and s["recall"] == pytest.approx(0.75)
    assert s["f1"] == pytest.approx(0.75)
    assert s["accuracy"] == pytest.approx(5 / 8)
    assert s["yes_ratio"] == pytest.approx(0.5)


def test_caption_scores():
    objs = [Obj("circle", "red", (0.1, 0.4, 0.3, 0.6)), Obj("square", "blue", (0.6, 0.4, 0.8, 0.6))]
    ref = "a red circle to the left of a blue square"
    preds = [ref, "a red circle and a blue square", "a blue circle", "a purple dog"]
    s = u.caption_scores(preds, [ref] * 4, [objs] * 4)
    assert s["exact"] == 0.25 and s["parsed"] == 0.75 and s["true"] == 0.5
    # Second: shapes and colours but no relation (4 of 5 attributes); third: 1 shape.
    assert s["attribute_recall"] == pytest.approx((1 + 4 / 5 + 1 / 5 + 0) / 4)


def test_caption_lengths_must_match():
    with pytest.raises(ValueError, match="same length"):
        u.caption_scores(["a"], [], [])
