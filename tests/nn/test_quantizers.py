import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimm.nn.quantizers import LookupFreeQuantizer, VectorQuantizer


def test_vq_picks_nearest_code_and_passes_gradients_straight_through():
    vq = VectorQuantizer(16, 4, rngs=nnx.Rngs(0), ema_decay=0.0)
    z = jax.random.normal(jax.random.key(1), (3, 5, 4))
    q, codes, aux = vq(z)
    book = np.asarray(vq.codebook[...])
    brute = np.argmin(((np.asarray(z)[..., None, :] - book) ** 2).sum(-1), -1)
    np.testing.assert_array_equal(codes, brute)
    np.testing.assert_allclose(q, book[brute], atol=1e-6)
    w = jax.random.normal(jax.random.key(2), z.shape)
    grad = jax.grad(lambda z: jnp.sum(vq(z)[0] * w))(z)
    np.testing.assert_allclose(grad, w, atol=1e-6)
    np.testing.assert_allclose(aux["commitment"], np.mean((np.asarray(z) - book[brute]) ** 2), rtol=1e-5)
    assert aux["codebook_loss"] > 0 and aux["used_codes"] == len(np.unique(brute))


def test_vq_codebook_loss_trains_the_codebook_only_by_gradient_mode():
    z = jax.random.normal(jax.random.key(1), (8, 4))
    for ema, expect_grad in ((0.0, True), (0.9, False)):
        vq = VectorQuantizer(4, 4, rngs=nnx.Rngs(0), ema_decay=ema)
        graphdef, params, rest = nnx.split(vq, nnx.Param, ...)
        grads = jax.grad(lambda p: nnx.merge(graphdef, p, rest)(z)[2]["loss"])(params)
        leaves = jax.tree.leaves(grads)
        assert bool(leaves) == expect_grad and (not leaves or np.abs(leaves[0]).sum() > 0)


def test_vq_ema_moves_codes_to_the_mean_of_their_vectors():
    vq = VectorQuantizer(2, 2, rngs=nnx.Rngs(0), ema_decay=0.5, restart_threshold=0.0)
    vq.codebook[...] = jnp.array([[1.0, 0.0], [-1.0, 0.0]])
    vq.ema_sum[...] = vq.codebook[...]
    z = jnp.array([[2.0, 0.0], [4.0, 0.0], [-3.0, 1.0]])
    vq(z, train=True, rng=jax.random.key(0))
    # count_0 = 0.5 * 1 + 0.5 * 2 = 1.5 and sum_0 = 0.5 * (1, 0) + 0.5 * (6, 0) = (3.5, 0) -> (2.33, 0);
    # code 1: count 1, sum 0.5 * (-1, 0) + 0.5 * (-3, 1) = (-2, 0.5). Laplace smoothing moves this by ~1e-5.
    np.testing.assert_allclose(vq.codebook[...], [[3.5 / 1.5, 0.0], [-2.0, 0.5]], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(vq.usage[...], 0.99 * 0.5 + 0.01 * np.array([2 / 3, 1 / 3]), rtol=1e-6)


@pytest.mark.parametrize("ema", [0.0, 0.99])
def test_vq_restarts_dead_codes_on_batch_vectors(ema):
    vq = VectorQuantizer(8, 3, rngs=nnx.Rngs(0), ema_decay=ema, usage_decay=0.0, restart_threshold=0.5)
    vq.codebook[...] = vq.codebook[...].at[:2].set(100.0)  # codes 0 and 1: far from every vector
    z = jax.random.normal(jax.random.key(3), (64, 3))
    share = np.bincount(np.asarray(vq.codes(z)), minlength=8) / 64
    dead = [k for k in range(8) if share[k] < 0.5 / 8]
    used = [k for k in range(8) if k not in dead]
    assert {0, 1} <= set(dead)
    before = np.asarray(vq.codebook[...]).copy()
    vq(z, train=True, rng=jax.random.key(4))
    after = np.asarray(vq.codebook[...])
    zs = np.asarray(z)
    for k in dead:  # restarted: now exactly one of the batch's vectors, usage reset to a uniform share
        assert np.min(np.abs(zs - after[k]).sum(-1)) < 1e-6
        assert vq.usage[...][k] == pytest.approx(1 / 8)
    if ema == 0.0:  # gradient mode: live codes are left to the optimizer
        np.testing.assert_array_equal(after[used], before[used])


def test_vq_restarts_land_where_the_codebook_fits_worst():
    """Restarts draw vectors in proportion to their quantization error: a batch that is
    mostly one vector already on a code (a blank background) restarts its dead codes on
    the few vectors the codebook misses, never on that one."""
    vq = VectorQuantizer(8, 3, rngs=nnx.Rngs(0), ema_decay=0.0, usage_decay=0.0, restart_threshold=0.5)
    book = np.asarray(vq.codebook[...])
    background = np.repeat(book[:1], 60, 0)  # exactly on code 0: error 0
    outliers = book[1:2] + np.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [-5.0, 0, 0]])
    z = jnp.asarray(np.concatenate([background, outliers]), jnp.float32)
    vq(z, train=True, rng=jax.random.key(0))
    after = np.asarray(vq.codebook[...])
    restarted = [k for k in range(8) if not np.allclose(after[k], book[k])]
    assert len(restarted) >= 5  # every code but 0 and the outliers' nearest is dead
    for k in restarted:
        assert np.min(np.abs(outliers - after[k]).sum(-1)) < 1e-5


def test_lfq_codes_are_sign_bits_and_round_trip():
    lfq = LookupFreeQuantizer(5)
    z = jax.random.normal(jax.random.key(0), (4, 7, 5))
    q, codes, aux = lfq(z)
    np.testing.assert_array_equal(q, np.where(np.asarray(z) > 0, 1.0, -1.0))
    np.testing.assert_array_equal(lfq.lookup(codes), q)
    np.testing.assert_array_equal(lfq.codes(lfq.lookup(jnp.arange(32))), np.arange(32))
    assert codes.min() >= 0 and codes.max() < 32
    w = jax.random.normal(jax.random.key(2), z.shape)
    np.testing.assert_allclose(jax.grad(lambda z: jnp.sum(lfq(z)[0] * w))(z), w, atol=1e-6)


def test_lfq_entropies_match_the_full_code_distribution():
    lfq = LookupFreeQuantizer(4, temperature=0.5)
    z = 0.3 * jax.random.normal(jax.random.key(1), (10, 4))
    token_h, batch_h = lfq.entropies(z)
    codes = np.array(list(itertools.product([-1.0, 1.0], repeat=4)))  # all 16 codes
    logits = -((np.asarray(z)[:, None, :] - codes[None]) ** 2).sum(-1) / 0.5
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    h = lambda p: -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(token_h, h(p).mean(), rtol=1e-5)
    np.testing.assert_allclose(batch_h, h(p.mean(0)), rtol=1e-5)
    # The entropy penalty prefers confident tokens spread over many codes.
    spread = 3.0 * jnp.array(codes[:8])[:, :4]
    collapsed = 3.0 * jnp.ones((8, 4))
    assert lfq(spread)[2]["loss"] < lfq(collapsed)[2]["loss"]


def test_lfq_rejects_bad_sizes():
    with pytest.raises(ValueError, match="bits"):
        LookupFreeQuantizer(0)
