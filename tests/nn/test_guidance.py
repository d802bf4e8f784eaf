import jax
import numpy as np
import pytest

from unimm.nn import guidance


def test_the_two_conventions_and_their_neutral_scales():
    cond, uncond = jax.random.normal(jax.random.key(0), (2, 3, 4))
    np.testing.assert_allclose(guidance.guide(cond, uncond, 1.0, "cfg"), cond, atol=1e-6)
    np.testing.assert_allclose(guidance.guide(cond, uncond, 0.0, "cfg"), uncond, atol=1e-6)
    np.testing.assert_allclose(guidance.guide(cond, uncond, 0.0, "muse"), cond, atol=1e-6)
    # muse's s is cfg's w - 1: (1 + s) c - s u = u + (1 + s)(c - u).
    np.testing.assert_allclose(guidance.guide(cond, uncond, 1.75, "muse"), guidance.guide(cond, uncond, 2.75, "cfg"),
                               rtol=1e-5, atol=1e-6)
    # JanusFlow's w v_c - (w - 1) v_u is the cfg convention.
    np.testing.assert_allclose(guidance.guide(cond, uncond, 2.0, "cfg"), 2 * cond - uncond, rtol=1e-5, atol=1e-6)
    assert guidance.is_conditional(1.0, "cfg") and guidance.is_conditional(0.0, "muse")
    assert not guidance.is_conditional(1.0, "muse")
    with pytest.raises(ValueError, match="unknown guidance convention"):
        guidance.guide(cond, uncond, 1.0, "imagen")


def test_doubled_rows_come_back_guided():
    x = jax.random.normal(jax.random.key(1), (3, 5))
    both = guidance.double(x)
    assert both.shape == (6, 5)
    np.testing.assert_array_equal(both[:3], both[3:])
    shifted = both.at[3:].add(1.0)  # unconditional rows predict x + 1
    np.testing.assert_allclose(guidance.combine(shifted, 3.0, "cfg"), x - 2.0, atol=1e-6)
