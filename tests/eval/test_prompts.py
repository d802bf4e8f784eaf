import collections

import pytest

from unimm.data import spec as spec_lib
from unimm.data.shapes import ShapesSource
from unimm.eval import prompts


def test_shipped_file_is_the_generated_list():
    assert prompts.load("v1") == prompts.build("v1")


def test_v1_spread_over_the_six_categories():
    entries = prompts.load("v1")
    counts = collections.Counter(e["category"] for e in entries)
    assert counts == {"single_object": 4, "colors": 24, "two_object": 12, "counting": 84,
                      "position": 96, "color_attr": 96}
    assert len({e["id"] for e in entries}) == len({e["prompt"] for e in entries}) == len(entries)
    for e in entries:
        assert prompts.ID_RE.match(e["id"])
        spec = spec_lib.Spec.from_dict(e["spec"])
        assert spec_lib.caption(spec) == e["prompt"] and spec.category == e["category"]


def test_compositional_prompts_are_held_out_of_training():
    held = {e["prompt"] for e in prompts.load() if e["category"] in ("position", "color_attr")}
    assert all(spec_lib.is_heldout(spec_lib.parse_caption(p)) for p in held)
    train = ShapesSource(categories=("position", "color_attr", "multi_object"))
    assert not any(train[i]["caption"] in held for i in range(500))
    everything = ShapesSource(categories=("color_attr",), holdout=False)
    assert any(everything[i]["caption"] in held for i in range(500))


def test_plan_balances_categories():
    plan = prompts.plan(10)
    per_cat = collections.Counter(e["category"] for e, _ in plan)
    assert set(per_cat.values()) == {10}
    singles = [(e["id"], k) for e, k in plan if e["category"] == "single_object"]
    assert len(set(singles)) == 10 and max(k for _, k in singles) == 2
    assert prompts.image_name("colors-003", 0) == "colors-003"
    assert prompts.image_name("colors-003", 2) == "colors-003_2"


def test_unknown_version_is_named():
    with pytest.raises(ValueError, match="unknown prompt set version"):
        prompts.build("v0")
