import jax.numpy as jnp
import numpy as np

from unimm.nn import spans


def test_placing_and_gathering_image_tokens():
    start = jnp.array([[1, 6], [2, 0]])
    valid = jnp.array([[True, True], [True, False]])
    where = spans.slots(start, valid, 3, 10)
    np.testing.assert_array_equal(where, [[1, 2, 3, 6, 7, 8], [2, 3, 4, 10, 11, 12]])  # missing image: past the end
    x = jnp.zeros((2, 10, 1))
    values = jnp.arange(1, 13, dtype=jnp.float32).reshape(2, 6, 1)
    placed = spans.place(x, where, values)
    np.testing.assert_array_equal(placed[0, :, 0], [0, 1, 2, 3, 0, 0, 4, 5, 6, 0])
    np.testing.assert_array_equal(placed[1, :, 0], [0, 0, 7, 8, 9, 0, 0, 0, 0, 0])  # the missing image is dropped
    np.testing.assert_array_equal(spans.gather(placed, where)[0, :, 0], [1, 2, 3, 4, 5, 6])
    inside, image = spans.token_maps(where, 3, 10)
    np.testing.assert_array_equal(inside[0], [-1, 0, 1, 2, -1, -1, 0, 1, 2, -1])
    np.testing.assert_array_equal(image[0], [-1, 0, 0, 0, -1, -1, 1, 1, 1, -1])
    np.testing.assert_array_equal(image[1], [-1, -1, 0, 0, 0, -1, -1, -1, -1, -1])


def test_a_span_on_its_own():
    meta = spans.span_meta(jnp.array([4, 7]), 3, jnp.array([True, False]), span_id=2)
    np.testing.assert_array_equal(meta.position, [[4, 5, 6], [7, 8, 9]])
    np.testing.assert_array_equal(meta.segment, [[1, 1, 1], [0, 0, 0]])  # an inactive row writes nothing
    np.testing.assert_array_equal(meta.span, [[2, 2, 2], [0, 0, 0]])
