import jax
import jax.numpy as jnp
import numpy as np

from unimm.nn.attention import Meta
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


def test_guided_decoding_over_conditional_and_unconditional_prefixes():
    """Logit guidance at scale 1 decodes exactly as the conditional rows alone, each
    half at its own positions; at other scales the guided logits are what decoding samples."""
    from flax import nnx

    from unimm.nn import guidance
    from unimm.nn.decoding import guided
    from unimm.nn.layers import Embed, Linear
    from unimm.nn.transformer import Decoder, DecoderConfig

    class LM(nnx.Module):
        def __init__(self):
            cfg = DecoderConfig(num_layers=2, d_model=16, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=32)
            self.embed, self.decoder = Embed(20, 16, rngs=nnx.Rngs(0)), Decoder(cfg, rngs=nnx.Rngs(1))
            self.head = Linear(16, 20, ("embed", "vocab"), rngs=nnx.Rngs(2))

        def text(self, tokens, meta, cache):
            h, cache = self.decoder(self.embed(tokens), meta, cache, update_cache=True)
            return self.head(h), cache

    model = LM()
    cond, uncond = [[3, 4, 5, 6], [7, 8]], [[1], [1]]
    tokens, lengths = pad_rows(cond + uncond, 0)
    cache = model.decoder.init_cache(4, 12)
    logits, cache = prefill(LM.text, model, cache, jnp.asarray(tokens), jnp.asarray(lengths))
    for scale in (1.0, 3.0):
        out, n, _ = decode(guided(LM.text, scale), model, cache, guidance.combine(logits, scale), jnp.asarray(lengths[:2]),
                           5, (19,), 0, jax.random.key(0))
        # Reference: each step's guided logits from two separate uncached passes per row.
        for r in range(2):
            seq_c, seq_u = list(cond[r]), list(uncond[r])
            for i in range(5):
                step_logits = []
                for seq in (seq_c, seq_u):
                    n_ = len(seq)
                    meta = Meta(jnp.ones((1, n_), jnp.int32), jnp.zeros((1, n_), jnp.int32), jnp.arange(n_)[None])
                    h, _ = model.decoder(model.embed(jnp.asarray([seq])), meta)
                    step_logits.append(model.head(h)[0, -1])
                nxt = int(jnp.argmax(guidance.guide(*step_logits, scale)))
                assert int(out[r, i]) == nxt, (scale, r, i)
                seq_c.append(nxt)
                seq_u.append(nxt)
