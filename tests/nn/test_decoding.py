import jax
import jax.numpy as jnp
import numpy as np

from unimm.nn.decoding import decode


def test_greedy_decoding_stops_per_row_and_pads():
    """A toy 'model' whose next token is (token + 1) mod 10, counting feeds in its state."""
    def step(state, tok, pos, active):
        logits = jax.nn.one_hot((tok[:, 0] + 1) % 10, 10) * 10.0
        return logits, state + active.astype(jnp.int32)

    first = jax.nn.one_hot(jnp.array([3, 7]), 10) * 10.0
    out, lengths, fed = decode(step, jnp.zeros((2,), jnp.int32), first, jnp.array([5, 2]), max_new=6,
                               stop_ids=(9,), pad_id=0, rng=jax.random.key(0))
    np.testing.assert_array_equal(out, [[3, 4, 5, 6, 7, 8], [7, 8, 9, 0, 0, 0]])
    np.testing.assert_array_equal(lengths, [6, 3])
    np.testing.assert_array_equal(fed, [5, 2])  # finished rows stop feeding their cache


def test_sampling_follows_the_distribution():
    def step(state, tok, pos, active):
        return jnp.log(jnp.array([[0.2, 0.8]] * tok.shape[0])), state

    first = jnp.log(jnp.array([[0.2, 0.8]] * 4000))
    out, _, _ = decode(step, 0, first, jnp.zeros((4000,), jnp.int32), 2, (5,), 0, jax.random.key(1), 1.0)
    assert abs(float(out.mean()) - 0.8) < 0.03
