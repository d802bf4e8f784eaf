import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimm.nn.image_io import make_image_io, patchify, unpatchify


def test_patchify_round_trip_and_order():
    x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    p = patchify(x, 4)
    assert p.shape == (2, 4, 48)
    np.testing.assert_array_equal(p[0, 1].reshape(4, 4, 3), x[0, :4, 4:8])  # row-major patches
    np.testing.assert_array_equal(unpatchify(p, 4, 8, 8, 3), x)


@pytest.mark.parametrize("kind, patch, channels", [("linear", 4, None), ("unet", 4, (8, 16, 16)),
                                                    ("unet", 8, (8, 8, 16, 16))])
def test_tokens_and_outputs(kind, patch, channels):
    io = make_image_io(kind, (16, 16, 3), patch, 24, rngs=nnx.Rngs(0), channels=channels)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    tokens, ctx = io.encode(x, jnp.array([0, 500]))
    assert tokens.shape == (2, (16 // patch) ** 2, 24)
    out = io.decode(tokens, None, ctx)
    assert out.shape == x.shape
    np.testing.assert_array_equal(out, 0.0)  # zero-initialised output layer: predictions start at 0
    t2, _ = io.encode(x, jnp.array([1, 500]))
    assert not np.allclose(tokens[0], t2[0]) and np.allclose(tokens[1], t2[1])  # timestep conditioning


def test_bad_unet_settings():
    with pytest.raises(ValueError, match="power of 2"):
        make_image_io("unet", (12, 12, 3), 3, 8, rngs=nnx.Rngs(0), channels=(4, 4))
    with pytest.raises(ValueError, match="channel widths"):
        make_image_io("unet", (16, 16, 3), 4, 8, rngs=nnx.Rngs(0), channels=(4, 4))
    with pytest.raises(ValueError, match="unknown image in/out"):
        make_image_io("vit", (16, 16, 3), 4, 8, rngs=nnx.Rngs(0))
