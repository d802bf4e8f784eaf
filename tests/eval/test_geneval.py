import json

import numpy as np
import pytest
from PIL import Image

from unimm.data import spec as spec_lib
from unimm.data.scenes import Scene, render, sample_scene
from unimm.eval import geneval, prompts
from unimm.eval.validate import perturb


def _write_plan(folder, good: bool, per_category=4):
    rng = np.random.default_rng(0)
    for entry, k in prompts.plan(per_category):
        spec = spec_lib.Spec.from_dict(entry["spec"])
        scene = sample_scene(spec if good else perturb(spec, rng), rng)
        Image.fromarray(render(scene, 64)).save(folder / f"{prompts.image_name(entry['id'], k)}.png")


def test_true_renders_score_one_and_wrong_ones_zero(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir(), bad.mkdir()
    _write_plan(good, True)
    _write_plan(bad, False)
    s_good, results = geneval.score_folder(good)
    assert s_good["overall"] == 1.0 and s_good["n"] == 24
    assert list(s_good["categories"]) == list(spec_lib.CATEGORIES)
    assert {r["id"] for r in results if r["category"] == "single_object"} == {f"single_object-00{i}" for i in range(4)}
    s_bad, _ = geneval.score_folder(bad)
    assert s_bad["overall"] == 0.0


def test_summary_is_mean_of_category_accuracies():
    rs = [{"category": "colors", "passed": True}, {"category": "colors", "passed": False},
          {"category": "position", "passed": True}]
    s = geneval.summarize(rs)
    assert s["categories"]["colors"] == {"accuracy": 0.5, "n": 2}
    assert s["overall"] == pytest.approx(0.75)


def test_cli_json_and_table(tmp_path, capsys):
    _write_plan(tmp_path, True, per_category=1)
    (tmp_path / "notes.png").write_bytes(b"")  # named by no prompt: skipped
    (tmp_path / "colors-001.png").write_bytes(b"not a png")  # unreadable: fails, with the reason
    assert geneval.main(["--images", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["summary"]["skipped"] == ["notes.png"]
    broken = [r for r in out["results"] if r["file"] == "colors-001.png"][0]
    assert not broken["passed"] and "not a readable image" in broken["reason"]
    assert out["summary"]["categories"]["colors"]["accuracy"] == 0.5
    assert geneval.main(["--images", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "overall" in table and "color_attr" in table


def test_cli_errors_are_clear(tmp_path, capsys):
    assert geneval.main(["--images", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert geneval.main(["--images", str(tmp_path)]) == 2
    assert "no PNG named by a prompt id" in capsys.readouterr().err


def test_score_image_accepts_float_images():
    spec = spec_lib.parse_caption("a red circle")
    scene = Scene(sample_scene(spec, np.random.default_rng(0)).objects)
    img = render(scene, 32).astype(np.float32) / 255.0
    assert geneval.score_image(spec, img)[0]
    assert not geneval.score_image(spec_lib.parse_caption("a blue circle"), img)[0]
