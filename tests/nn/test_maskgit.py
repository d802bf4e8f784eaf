import jax
import jax.numpy as jnp
import numpy as np

from unimm.nn import maskgit


def test_keep_lowest_and_the_schedule():
    scores = jnp.array([[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(maskgit.keep_lowest(scores, jnp.array([2, 1])),
                                  [[False, True, False, True], [True, False, False, False]])
    left = [int(maskgit.num_still_masked(i, 4, 16, 16)) for i in range(4)]
    assert left[-1] == 0 and left == sorted(left, reverse=True)
    assert left[0] == int(np.floor(16 * np.cos(np.pi / 2 * 0.25)))


def test_unmask_reveals_the_most_confident_first_and_keeps_known_codes():
    """Logits that favour code (position % 3) with a margin growing with position:
    without noise, one token a step, the most confident (last) positions come first."""
    n, k = 8, 3
    target = jnp.arange(n) % k
    logits = jax.nn.one_hot(target, k) * (1.0 + jnp.arange(n))[:, None]
    fn = lambda codes, masked: jnp.broadcast_to(logits, codes.shape + (k,))
    codes, history = maskgit.unmask(fn, jnp.zeros((1, n), jnp.int32), jnp.ones((1, n), bool), jax.random.key(0),
                                     steps=n, temperature=0.0, confidence_noise=0.0)
    np.testing.assert_array_equal(codes[0], target)
    np.testing.assert_array_equal(history[:, 0], np.arange(n - 1, -1, -1))
    # Known codes (inpainting) are kept.
    known = jnp.array([[2] * n])
    masked = jnp.array([[True, False] * (n // 2)])
    out, _ = maskgit.unmask(fn, known, masked, jax.random.key(1), 3, 1.0, 1.0)
    np.testing.assert_array_equal(out[0, 1::2], 2)


def test_training_mask_is_cosine_scheduled():
    masked = np.asarray(maskgit.training_mask(jax.random.key(0), 4000, 16))
    counts = masked.sum(1)
    assert counts.min() >= 1 and counts.max() <= 16
    assert abs(counts.mean() / 16 - 2 / np.pi) < 0.03
