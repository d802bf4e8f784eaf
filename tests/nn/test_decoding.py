import jax
import jax.numpy as jnp
import numpy as np

from unimm.nn.decoding import decode, pad_rows, prefill


def _counting_step(model, tokens, meta, cache):
    """A toy model whose next token is (token + 1) mod 10; its 'cache' counts the tokens each row wrote."""
    del model
    logits = jax.nn.one_hot((tokens + 1) % 10, 10) * 10.0
    return logits, cache + (meta.segment != 0).sum(1)


def test_greedy_decoding_stops_per_row_and_pads():
    first = jax.nn.one_hot(jnp.array([3, 7]), 10) * 10.0
    out, lengths, fed = decode(_counting_step, None, jnp.zeros((2,), jnp.int32), first, jnp.array([5, 2]), max_new=6,
                               stop_ids=(9,), pad_id=0, rng=jax.random.key(0))
    np.testing.assert_array_equal(out, [[3, 4, 5, 6, 7, 8], [7, 8, 9, 0, 0, 0]])
    np.testing.assert_array_equal(lengths, [6, 3])
    np.testing.assert_array_equal(fed, [5, 2])  # finished rows stop feeding their cache; stop tokens are not fed


def test_inactive_rows_decode_nothing():
    first = jax.nn.one_hot(jnp.array([3, 7]), 10) * 10.0
    out, lengths, fed = decode(_counting_step, None, jnp.zeros((2,), jnp.int32), first, jnp.array([5, 2]), 4, (9,), 0,
                               jax.random.key(0), active=jnp.array([False, True]))
    np.testing.assert_array_equal(out, [[0, 0, 0, 0], [7, 8, 9, 0]])
    np.testing.assert_array_equal(lengths, [0, 3])
    np.testing.assert_array_equal(fed, [0, 2])


def test_prefill_returns_each_rows_last_logits():
    tokens, lengths = pad_rows([[1, 2, 3], [4]], pad_id=0)
    logits, fed = prefill(_counting_step, None, jnp.zeros((2,), jnp.int32), jnp.asarray(tokens), jnp.asarray(lengths))
    np.testing.assert_array_equal(jnp.argmax(logits, -1), [4, 5])  # after 3 and after 4
    np.testing.assert_array_equal(fed, [3, 1])  # padding (segment 0) is not written


def test_sampling_follows_the_distribution():
    def step(model, tokens, meta, cache):
        return jnp.log(jnp.array([[[0.2, 0.8]]] * tokens.shape[0])), cache

    first = jnp.log(jnp.array([[0.2, 0.8]] * 4000))
    out, _, _ = decode(step, None, 0, first, jnp.zeros((4000,), jnp.int32), 2, (5,), 0, jax.random.key(1), 1.0)
    assert abs(float(out.mean()) - 0.8) < 0.03
