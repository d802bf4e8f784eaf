import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimm.nn.image_io import make_image_io, patchify, sincos_2d, unpatchify


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


def test_sincos_positions_tell_rows_and_columns_apart():
    emb = np.asarray(sincos_2d(4, 6, 32))
    assert emb.shape == (24, 32)
    assert len({tuple(np.round(r, 5)) for r in emb}) == 24  # every patch distinct
    # The first half of the channels depends on the row only, the second on the column only.
    grid = emb.reshape(4, 6, 32)
    np.testing.assert_allclose(grid[:, 0, :16], grid[:, 5, :16])
    np.testing.assert_allclose(grid[0, :, 16:], grid[3, :, 16:])
    io = make_image_io("linear", (16, 16, 3), 4, 32, rngs=nnx.Rngs(0), pos_embedding="sincos")
    np.testing.assert_allclose(io.pos[...], sincos_2d(4, 4, 32), atol=1e-6)
    with pytest.raises(ValueError, match="position embedding"):
        make_image_io("linear", (16, 16, 3), 4, 32, rngs=nnx.Rngs(0), pos_embedding="rope")


def test_refine_convs_smooth_across_patch_seams():
    io = make_image_io("linear", (16, 16, 3), 4, 24, rngs=nnx.Rngs(0), refine_channels=8)
    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 3))
    tokens, ctx = io.encode(x, jnp.array([10]))
    np.testing.assert_array_equal(io.decode(tokens, None, ctx), 0.0)  # still starts at 0
    # With the output layers no longer zero, changing one token's hidden state
    # moves pixels of the neighbouring patch too (the 3x3 convs cross the seam).
    io.out.kernel[...] = jax.random.normal(jax.random.key(1), io.out.kernel[...].shape) * 0.1
    io.refine[1].kernel[...] = jax.random.normal(jax.random.key(2), io.refine[1].kernel[...].shape) * 0.1
    base = io.decode(tokens, None, ctx)
    moved = io.decode(tokens.at[0, 0].add(1.0), None, ctx)
    changed = np.abs(np.asarray(moved - base))[0].sum(-1) > 1e-6
    assert changed[:4, :4].any() and changed[:4, 4].any() and not changed[:4, 6:].any()
    plain = make_image_io("linear", (16, 16, 3), 4, 24, rngs=nnx.Rngs(0))
    plain.out.kernel[...] = io.out.kernel[...]
    p_changed = np.abs(np.asarray(plain.decode(tokens.at[0, 0].add(1.0), None, None) -
                                  plain.decode(tokens, None, None)))[0].sum(-1) > 1e-6
    assert p_changed[:4, :4].any() and not p_changed[:, 4:].any() and not p_changed[4:].any()


def test_unet_skips_leave_the_token_level_to_the_transformer():
    io = make_image_io("unet", (16, 16, 3), 4, 24, rngs=nnx.Rngs(0), channels=(8, 8, 16), skips=True)
    # Skips widen every up level except the token one (which would duplicate the transformer's input).
    assert io.up[0][0].conv1.kernel[...].shape[2] == 16 and io.up[1][0].conv1.kernel[...].shape[2] == 16
    assert io.up[2][0].conv1.kernel[...].shape[2] == 16  # channels[2] alone
    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 3))
    tokens, ctx = io.encode(x, jnp.array([500]))
    assert ctx[1] is not None and len(ctx[1]) == 3
    io.conv_out.kernel[...] = jax.random.normal(jax.random.key(1), io.conv_out.kernel[...].shape) * 0.1
    out = io.decode(tokens, None, ctx)
    assert out.shape == x.shape
    assert not np.allclose(out, io.decode(tokens + 1.0, None, ctx))  # the transformer's output matters


def test_unet_token_skip_widens_the_token_level_and_carries_the_down_path():
    io = make_image_io("unet", (16, 16, 3), 4, 24, rngs=nnx.Rngs(0), channels=(8, 8, 16), skips=True,
                       token_skip=True)
    assert io.up[2][0].conv1.kernel[...].shape[2] == 32  # channels[2] and its skip
    io.conv_out.kernel[...] = jax.random.normal(jax.random.key(1), io.conv_out.kernel[...].shape) * 0.1
    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 3))
    tokens, (temb, skips) = io.encode(x, jnp.array([500]))
    # With the transformer's output held fixed, the token-level skip alone changes the output.
    changed = skips[:2] + [skips[2] + 1.0]
    assert not np.allclose(io.decode(tokens, None, (temb, skips)), io.decode(tokens, None, (temb, changed)))
    # Without skips the setting has nothing to add to.
    plain = make_image_io("unet", (16, 16, 3), 4, 24, rngs=nnx.Rngs(0), channels=(8, 8, 16), token_skip=True)
    assert plain.up[2][0].conv1.kernel[...].shape[2] == 16


def test_unet_mid_blocks_process_the_tokens_but_not_the_token_level_skip():
    kw = dict(channels=(8, 8, 16), skips=True, token_skip=True)
    io = make_image_io("unet", (16, 16, 3), 4, 24, mid_blocks=1, rngs=nnx.Rngs(0), **kw)
    plain = make_image_io("unet", (16, 16, 3), 4, 24, rngs=nnx.Rngs(0), **kw)
    assert len(io.mid) == 1 and len(plain.mid) == 0
    # A ResBlock starts as the identity (zero-initialised second conv): make it do something.
    block = io.mid[0]
    block.conv2.kernel[...] = jax.random.normal(jax.random.key(2), block.conv2.kernel[...].shape) * 0.1
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    t = jnp.array([100, 800])
    tokens, (_, skips) = io.encode(x, t)
    plain_tokens, (_, plain_skips) = plain.encode(x, t)
    for a, b in zip(skips, plain_skips):  # same down path (same init): the skips never see the middle
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert tokens.shape == plain_tokens.shape and not np.allclose(tokens, plain_tokens)


def test_unet_skips_can_be_withheld_at_high_noise():
    io = make_image_io("unet", (16, 16, 3), 4, 24, rngs=nnx.Rngs(0), channels=(8, 8, 16), skips=True,
                       skip_max_t=500)
    io.conv_out.kernel[...] = jax.random.normal(jax.random.key(1), io.conv_out.kernel[...].shape) * 0.1
    x, x2 = jax.random.normal(jax.random.key(0), (2, 1, 16, 16, 3))

    def out(x, t, tokens_from=None):
        tokens, ctx = io.encode(x, jnp.array([t]))
        if tokens_from is not None:  # same transformer output, only the skips differ
            tokens = io.encode(tokens_from, jnp.array([t]))[0]
        return io.decode(tokens, None, ctx)

    # Below skip_max_t the skips carry x_t's detail; at and above it they are withheld.
    assert not np.allclose(out(x, 100), out(x2, 100, tokens_from=x))
    np.testing.assert_allclose(out(x, 500), out(x2, 500, tokens_from=x), atol=1e-6)


def test_refine_blocks_read_the_noisy_input():
    io = make_image_io("linear", (16, 16, 3), 4, 24, rngs=nnx.Rngs(0), refine_channels=8, refine_blocks=1)
    x, x2 = jax.random.normal(jax.random.key(0), (2, 1, 16, 16, 3))
    tokens, ctx = io.encode(x, jnp.array([10]))
    np.testing.assert_array_equal(io.decode(tokens, None, ctx), 0.0)  # zero-initialised: starts at 0
    io.refine[-1].kernel[...] = jax.random.normal(jax.random.key(1), io.refine[-1].kernel[...].shape) * 0.1
    _, ctx2 = io.encode(x2, jnp.array([10]))
    assert not np.allclose(io.decode(tokens, None, ctx), io.decode(tokens, None, ctx2))  # same tokens, other x_t
    with pytest.raises(ValueError, match="refine_channels"):
        make_image_io("linear", (16, 16, 3), 4, 24, rngs=nnx.Rngs(0), refine_blocks=1)


def test_resblock_conditioning_survives_one_channel_groups():
    from helpers import randomize_zero_inits
    from unimm.nn.image_io import ResBlock

    # 8 channels -> 8 GroupNorm groups of one channel: an embedding added before the
    # norm would be removed exactly; the scale-shift after it is not.
    block = randomize_zero_inits(ResBlock(8, 8, 4, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 8))
    assert np.abs(block(x, jnp.ones((1, 4))) - block(x, -jnp.ones((1, 4)))).mean() > 0.1


def test_unet_global_conditioning_reaches_every_pixel():
    from helpers import randomize_zero_inits

    far_change = {}
    for global_cond in (False, True):
        io = make_image_io("unet", (32, 32, 3), 4, 24, rngs=nnx.Rngs(0), channels=(8, 8, 16), skips=True,
                           global_cond=global_cond)
        randomize_zero_inits(io)
        if global_cond:  # a trained projection, strong enough to see past GroupNorm's global coupling
            io.global_cond.kernel[...] = io.global_cond.kernel[...] * 30
        x = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
        tokens, ctx = io.encode(x, jnp.array([300]))
        d = np.abs(np.asarray(io.decode(tokens, None, ctx) - io.decode(tokens.at[:, 0].add(1.0), None, ctx)))
        assert d[:, :4, :4].mean() > 0.02  # the changed top-left token redraws its own patch
        far_change[global_cond] = d[:, 24:, 24:].mean()  # the opposite corner
    # Without global conditioning a token reaches its conv neighbourhood (and the far corner
    # only through GroupNorm's statistics); with it, the mean output conditions every block.
    assert far_change[True] > 3 * far_change[False], far_change
