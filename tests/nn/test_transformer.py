import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimm.nn import axes as ax
from unimm.nn.attention import Meta
from unimm.nn.transformer import Cond, Decoder, DecoderConfig

CFG = DecoderConfig(num_layers=3, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, qk_norm=True)


@pytest.fixture(scope="module")
def decoder():
    return Decoder(CFG, rngs=nnx.Rngs(0))


def _inputs(b=2, t=12):
    x = jax.random.normal(jax.random.key(1), (b, t, CFG.d_model))
    seg = jnp.ones((b, t), jnp.int32)
    span = jnp.zeros((b, t), jnp.int32).at[:, 4:9].set(1)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return x, Meta(seg, span, pos)


def _slice(meta, a, b):
    return Meta(meta.segment[:, a:b], meta.span[:, a:b], meta.position[:, a:b])


def test_cached_decoding_equals_the_uncached_forward(decoder):
    x, meta = _inputs()
    full, _ = decoder(x, meta)
    cache = decoder.init_cache(2, 16)
    outs = []
    for a, b in [(0, 4), (4, 9), (9, 10), (10, 11), (11, 12)]:  # prefix, image span, then token by token
        h, cache = decoder(x[:, a:b], _slice(meta, a, b), cache, update_cache=True)
        outs.append(h)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)
    assert cache.end.tolist() == [12, 12]


def test_read_only_prefix_cache_equals_the_full_forward(decoder):
    x, meta = _inputs()
    full, _ = decoder(x, meta)
    cache = decoder.init_cache(2, 16)
    _, cache = decoder(x[:, :4], _slice(meta, 0, 4), cache, update_cache=True)
    for _ in range(2):  # the same cache serves many passes and never changes
        h, after = decoder(x[:, 4:9], _slice(meta, 4, 9), cache, update_cache=False)
        np.testing.assert_allclose(h, full[:, 4:9], atol=1e-5)
        assert after.end.tolist() == [4, 4]


def test_batched_ragged_rows_equal_single_rows(decoder):
    """Rows with different prompt lengths share one cache (right padding)."""
    x, _ = _inputs(b=2, t=8)
    lengths = np.array([8, 5])
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    seg = (pos < lengths[:, None]).astype(jnp.int32)
    meta = Meta(seg, jnp.zeros_like(seg), pos)
    cache = decoder.init_cache(2, 12)
    h, cache = decoder(x, meta, cache, update_cache=True)
    assert cache.end.tolist() == [8, 5]
    step = jax.random.normal(jax.random.key(3), (2, 1, CFG.d_model))
    nxt = Meta(jnp.ones((2, 1), jnp.int32), jnp.zeros((2, 1), jnp.int32), jnp.asarray(lengths)[:, None])
    h2, _ = decoder(step, nxt, cache, update_cache=True)
    for row in range(2):
        n = lengths[row]
        xr = jnp.concatenate([x[row:row + 1, :n], step[row:row + 1]], 1)
        mr = Meta(jnp.ones((1, n + 1), jnp.int32), jnp.zeros((1, n + 1), jnp.int32), jnp.arange(n + 1)[None])
        single, _ = decoder(xr, mr)
        np.testing.assert_allclose(h[row, :n], single[0, :n], atol=1e-5)
        np.testing.assert_allclose(h2[row, 0], single[0, n], atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_change_memory_not_results(policy):
    x, meta = _inputs()
    plain = Decoder(CFG, rngs=nnx.Rngs(0))
    remat = Decoder(DecoderConfig(**{**CFG.__dict__, "remat": policy}), rngs=nnx.Rngs(0))

    def loss(m):
        return jnp.sum(m(x, meta)[0] ** 2)

    g1, g2 = nnx.grad(loss)(plain), nnx.grad(loss)(remat)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_layers_are_stacked_with_logical_axes(decoder):
    kernel = decoder.blocks.mlp.wi.kernel
    assert kernel.shape == (3, 32, 2, 64)
    assert ax.logical_axes(kernel) == ("layers", "embed", None, "mlp")
    layer_keys = [np.asarray(decoder.blocks.attn.q.kernel[i]) for i in range(3)]
    assert not np.allclose(layer_keys[0], layer_keys[1])  # independently initialised


def test_parameter_count_formula(decoder):
    n = sum(x.size for x in jax.tree.leaves(nnx.state(decoder, nnx.Param)))
    assert n == CFG.num_params()


@pytest.mark.parametrize("bad, match", [
    (dict(num_heads=3, num_kv_heads=2), "multiple"), (dict(head_dim=7), "even"),
    (dict(attention="flash"), "attention"), (dict(remat="some"), "remat"), (dict(dtype="float8"), "dtype"),
])
def test_bad_settings_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        DecoderConfig(**{**CFG.__dict__, **bad})


def test_unknown_setting_is_named():
    with pytest.raises(ValueError, match="unknown decoder settings"):
        DecoderConfig.from_config({"num_layers": 2, "depth": 3})


def _modulated_decoder():
    """A decoder with adaLN conditioning whose (zero-started) modulations are random."""
    from helpers import randomize_zero_inits
    cfg = dataclasses.replace(CFG, cond_dim=8)
    return cfg, randomize_zero_inits(Decoder(cfg, rngs=nnx.Rngs(0)))


def test_adaln_leaves_unconditioned_tokens_alone_and_modulates_the_rest():
    cfg, dec = _modulated_decoder()
    x, meta = _inputs()
    vectors = jax.random.normal(jax.random.key(2), (2, 1, cfg.cond_dim))
    none = Cond(vectors, jnp.full(meta.position.shape, -1, jnp.int32))
    plain, _ = dec(x, meta)
    np.testing.assert_allclose(dec(x, meta, cond=none)[0], plain, atol=1e-6)
    # Tokens 4..8 (the image span) read vector 0; the tokens before them cannot see them.
    index = jnp.full(meta.position.shape, -1, jnp.int32).at[:, 4:9].set(0)
    a, _ = dec(x, meta, cond=Cond(vectors, index))
    b, _ = dec(x, meta, cond=Cond(-vectors, index))
    np.testing.assert_allclose(a[:, :4], plain[:, :4], atol=1e-6)
    assert float(jnp.abs(a[:, 4:9] - b[:, 4:9]).mean()) > 1e-2


def test_adaln_per_vector_index_equals_per_row_gathering():
    """Each token reads the vector its index names: two vectors in one row equal
    each one given alone to the tokens that name it."""
    cfg, dec = _modulated_decoder()
    x, meta = _inputs(b=1)
    vectors = jax.random.normal(jax.random.key(3), (1, 2, cfg.cond_dim))
    index = jnp.full((1, 12), -1, jnp.int32).at[:, 4:9].set(1)
    two, _ = dec(x, meta, cond=Cond(vectors, index))
    one, _ = dec(x, meta, cond=Cond(vectors[:, 1:], jnp.where(index >= 0, 0, -1)))
    np.testing.assert_allclose(two, one, atol=1e-6)


def test_adaln_cached_decoding_equals_the_uncached_forward():
    cfg, dec = _modulated_decoder()
    x, meta = _inputs()
    vectors = jax.random.normal(jax.random.key(2), (2, 1, cfg.cond_dim))
    index = jnp.full(meta.position.shape, -1, jnp.int32).at[:, 4:9].set(0)
    full, _ = dec(x, meta, cond=Cond(vectors, index))
    cache = dec.init_cache(2, 16)
    _, cache = dec(x[:, :4], _slice(meta, 0, 4), cache, update_cache=True)
    h, _ = dec(x[:, 4:9], _slice(meta, 4, 9), cache, update_cache=False, cond=Cond(vectors, index[:, 4:9]))
    np.testing.assert_allclose(h, full[:, 4:9], atol=1e-5)


def test_conditioning_a_decoder_built_without_it_is_an_error(decoder):
    x, meta = _inputs()
    with pytest.raises(ValueError, match="cond_dim=0"):
        decoder(x, meta, cond=Cond(jnp.zeros((2, 1, 4)), jnp.zeros((2, 12), jnp.int32)))
