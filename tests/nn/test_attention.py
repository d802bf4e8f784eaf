import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm.nn.attention import Meta, attention_mask, dot_product_attention, rope

# One row: doc 1 = text(3) image(4) text(2), doc 2 = text(2) image(2), then 3 pads.
SEG = np.array([[1] * 9 + [2] * 4 + [0] * 3])
SPAN = np.array([[0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 2, 2, 0, 0, 0]])
POS = np.array([list(range(9)) + list(range(4)) + [0, 0, 0]])


@pytest.fixture(scope="module")
def mask():
    return np.asarray(attention_mask(SEG, SPAN, POS, SEG, SPAN, POS))[0, 0]


def test_image_patch_sees_later_patches_of_its_own_image(mask):
    for q in range(3, 7):
        assert mask[q, 3:7].all()  # the whole span, later patches included
        assert mask[q, :3].all()  # and the text before it
        assert not mask[q, 7:].any()  # never the text after it


def test_text_never_sees_the_future(mask):
    for q in (0, 1, 2, 7, 8, 9, 10):
        later = [k for k in range(16) if POS[0, k] > POS[0, q] and SEG[0, k] == SEG[0, q]]
        assert not mask[q, later].any()
    assert mask[8, :9].all()  # text after an image sees all of it


def test_nothing_sees_padding_and_padding_sees_nothing(mask):
    assert not mask[:, 13:].any()
    assert not mask[13:, :].any()


def test_documents_are_separate(mask):
    assert not mask[9:13, :9].any() and not mask[:9, 9:13].any()
    assert mask[11, 11:13].all() and not mask[10, 11]  # second image: bidirectional inside only


def _qkv(n_heads=4, kv_heads=2, t=16, d=8):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (1, t, n_heads, d))
    k = jax.random.normal(ks[1], (1, t, kv_heads, d))
    v = jax.random.normal(ks[2], (1, t, kv_heads, d))
    return q, k, v


def test_implementations_agree_with_gqa(mask):
    q, k, v = _qkv()
    m = jnp.asarray(mask)[None, None]
    ref = dot_product_attention(q, k, v, m, "xla")
    dpa = dot_product_attention(q, k, v, m, "dot_product_attention")
    rows = np.asarray(mask).any(1)  # fully masked (padding) rows are undefined
    np.testing.assert_allclose(np.asarray(ref)[0, rows], np.asarray(dpa)[0, rows], atol=1e-5)
    # GQA equals multi-head attention with each KV head repeated for its query group.
    full = dot_product_attention(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), m, "xla")
    np.testing.assert_allclose(np.asarray(ref)[0, rows], np.asarray(full)[0, rows], atol=1e-5)


def test_unknown_implementation_is_named():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention implementation"):
        dot_product_attention(q, k, v, jnp.ones((1, 1, 16, 16), bool), "flash9000")


def test_rope_with_equal_positions_on_every_axis_is_1d_rope():
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 16))
    pos = jnp.array([[0, 1, 2, 7, 9], [3, 4, 5, 6, 40]])
    np.testing.assert_allclose(rope(x, jnp.stack([pos] * 3, -1), 1e4), rope(x, pos, 1e4), atol=1e-6)


def test_grid_rope_positions():
    # BOS, BOI, a 2x3 grid of patches, EOI: text keeps its position on every axis.
    pos = jnp.arange(9)[None]
    index = jnp.array([[-1, -1, 0, 1, 2, 3, 4, 5, -1]])
    meta = Meta(jnp.ones_like(pos), jnp.zeros_like(pos), pos).with_grid_rope(index, width=3)
    expect = [[0, 0, 0], [1, 1, 1], [2, 2, 2], [2, 2, 3], [2, 2, 4], [2, 3, 2], [2, 3, 3], [2, 3, 4], [8, 8, 8]]
    np.testing.assert_array_equal(meta.rope[0], expect)


def test_grid_rope_attention_depends_on_2d_offsets():
    """With 2D RoPE, a patch pair's attention logit is a function of its (row,
    column) offset, wherever the pair lies: the same content one row down or
    one column right scores the same; with 1D RoPE a row's end and the next
    row's start look adjacent."""
    width = 4
    q, k = jax.random.normal(jax.random.key(1), (2, 1, 1, 1, 32))
    index = jnp.arange(width * width)[None]
    meta = Meta(index, index, index + 5).with_grid_rope(index, width)

    def logit(positions, a, b):
        n = index.shape[1]
        qs, ks = rope(jnp.broadcast_to(q, (1, n, 1, 32)), positions, 1e4), rope(jnp.broadcast_to(k, (1, n, 1, 32)),
                                                                               positions, 1e4)
        return float(jnp.sum(qs[0, a, 0] * ks[0, b, 0]))

    # (row 0, col 1) -> (row 1, col 2) equals (row 2, col 0) -> (row 3, col 1): offset (1, 1) both times.
    same = [logit(meta.rope, 1, 6), logit(meta.rope, 8, 13)]
    np.testing.assert_allclose(same[0], same[1], rtol=1e-5)
    # Patch 3 (row 0, col 3) and patch 4 (row 1, col 0) are neighbours in 1D order only.
    assert abs(logit(meta.rope, 3, 4) - logit(meta.rope, 0, 1)) > 1e-3
    np.testing.assert_allclose(logit(meta.position, 3, 4), logit(meta.position, 0, 1), rtol=1e-5)
