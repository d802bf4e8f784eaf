import grain
import numpy as np
import pytest
from PIL import Image

from unimm.data import shapes
from unimm.data import spec as spec_lib
from unimm.data.scenes import relations, Obj
from unimm.data.shapes import ShapesSource


def test_examples_are_deterministic_and_random_access():
    a, b = ShapesSource(seed=3), ShapesSource(seed=3)
    for i in (0, 7, 10**12):
        x, y = a[i], b[i]
        np.testing.assert_array_equal(x["image"], y["image"])
        assert x["caption"] == y["caption"] and x["qa"] == y["qa"]
    assert not np.array_equal(a[0]["image"], ShapesSource(seed=4)[0]["image"])


def test_splits_draw_different_streams():
    tr, ev = ShapesSource(split="train"), ShapesSource(split="eval")
    assert any(not np.array_equal(tr[i]["image"], ev[i]["image"]) for i in range(4))


@pytest.mark.parametrize("resolution", [32, 64])
def test_resolution_and_dtype(resolution):
    e = ShapesSource(resolution=resolution)[1]
    assert e["image"].shape == (resolution, resolution, 3) and e["image"].dtype == np.uint8


def test_grain_map_dataset_source():
    src = ShapesSource(resolution=32)
    ds = grain.MapDataset.source(src).shuffle(seed=0).map(lambda e: e["image"]).batch(4)
    batch = ds[0]
    assert batch.shape == (4, 32, 32, 3)
    assert len(src) >= 2**48  # never exhausted


def test_ground_truth_matches_caption():
    src = ShapesSource(resolution=32, holdout=False)
    for i in range(200):
        e = src[i]
        spec = spec_lib.Spec.from_dict(e["spec"])
        objs = [Obj(o["shape"], o["color"], tuple(o["box"])) for o in e["scene"]["objects"]]
        assert 1 <= len(objs) <= 4
        assert spec.num_objects == len(objs)
        for g in spec.groups:
            assert sum(o.shape == g.shape and g.color in (None, o.color) for o in objs) >= g.count
        if spec.relation:  # the stated relation is the only one that holds
            assert relations(objs[0], objs[1]) == {spec.relation}


def test_every_object_is_drawn_in_its_colour():
    from unimm.data import vocab
    e = ShapesSource(resolution=64, holdout=False)[5]
    img = e["image"].reshape(-1, 3)
    for o in e["scene"]["objects"]:
        assert (np.abs(img.astype(int) - vocab.COLORS[o["color"]]).sum(1) == 0).any()


def test_holdout_never_captions_reserved_compositions():
    held = ShapesSource(categories=("position", "color_attr", "multi_object"))
    open_ = ShapesSource(categories=("position", "color_attr", "multi_object"), holdout=False)
    specs = lambda src: [spec_lib.Spec.from_dict(src[i]["spec"]) for i in range(400)]
    assert not any(spec_lib.is_heldout(s) for s in specs(held))
    assert any(spec_lib.is_heldout(s) for s in specs(open_))


def test_category_weights_and_backgrounds():
    src = ShapesSource(categories=("colors", "counting"), weights=(1, 0), backgrounds=("black", "grey"))
    cats = {src[i]["category"] for i in range(50)}
    bgs = {src[i]["scene"]["background"] for i in range(50)}
    assert cats == {"colors"} and bgs == {"black", "grey"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="test"), "split"), (dict(resolution=8), "resolution"), (dict(categories=("x",)), "categories"),
    (dict(backgrounds=("pink",)), "backgrounds"), (dict(weights=(1,)), "weights"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShapesSource(**kwargs)


def test_index_out_of_range():
    with pytest.raises(IndexError):
        ShapesSource(size=5)[5]


def test_cli_writes_a_captioned_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    shapes.main(["--out", str(out), "--n", "9", "--resolution", "32"])
    img = Image.open(out)
    assert img.size[0] >= 3 * 128 and img.mode == "RGB"
    printed = capsys.readouterr().out
    src = ShapesSource(resolution=32)
    assert all(src[i]["caption"] in printed for i in range(9))
