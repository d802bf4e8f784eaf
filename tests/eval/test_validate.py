"""The checker's trustworthiness: true renders pass, wrong images fail."""

import pytest

from unimm.data import spec as spec_lib
from unimm.eval import validate

N_PER_CATEGORY = 50
N_PER_NEGATIVE_KIND = 40


@pytest.fixture(scope="module", params=[32, 64])
def resolution(request):
    return request.param


@pytest.fixture(scope="module")
def positives(resolution):
    return validate.positives(resolution, N_PER_CATEGORY)


def test_accepts_ground_truth_renders(positives):
    acc = validate.accuracy(positives)
    assert set(acc) == set(spec_lib.CATEGORIES)
    for cat, a in acc.items():
        assert a >= 0.98, (cat, a)


def test_rejects_wrong_images(resolution):
    negatives = validate.negatives(resolution, N_PER_NEGATIVE_KIND)
    rej = validate.rejection(negatives)
    assert set(rej) == set(validate.NEGATIVE_KINDS)
    for kind, r in rej.items():
        assert r >= 0.95, (kind, r)


@pytest.mark.parametrize("kind, level", [("blur", 0.5), ("noise", 10.0)])
def test_tolerates_mild_blur_and_noise(positives, resolution, kind, level):
    # docs/checkers.md gives the full robustness table; this guards its mild end.
    acc = validate.accuracy(positives, kind, level * resolution / 32)
    assert min(acc.values()) >= 0.95, acc


def test_negatives_are_wrong_by_ground_truth():
    import numpy as np
    from unimm.data.scenes import sample_scene
    from unimm.eval.rules import check

    rng = np.random.default_rng(0)
    for cat in spec_lib.CATEGORIES:
        for _ in range(30):
            s = spec_lib.sample_spec(cat, rng)
            scene = sample_scene(validate.perturb(s, rng), rng)
            assert not check(s, scene.objects)[0], (s, scene)
