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


def test_hidden_states_of_chosen_layers_cost_nothing_when_not_asked(decoder):
    """REPA reads an intermediate layer: hidden_layers=(k,) returns the residual
    stream after k blocks; the output and the cache are those of a plain call."""
    x, meta = _inputs()
    full, _ = decoder(x, meta)
    out, _, hidden = decoder(x, meta, hidden_layers=(0, 1, 3))
    np.testing.assert_allclose(out, full, atol=1e-6)
    np.testing.assert_array_equal(hidden[0], x)
    np.testing.assert_allclose(decoder.final_norm(hidden[3]), full, atol=1e-6)
    # After one block: a one-layer decoder holding the first layer's weights.
    one = Decoder(dataclasses.replace(CFG, num_layers=1), rngs=nnx.Rngs(0))
    nnx.update(one.blocks, jax.tree.map(lambda a: a[:1], nnx.state(decoder.blocks)))
    _, _, first = one(x, meta, hidden_layers=(1,))
    np.testing.assert_allclose(hidden[1], first[1], atol=1e-6)
    cache = decoder.init_cache(2, 16)
    _, plain = decoder(x, meta, cache, update_cache=True)
    _, with_hidden, _ = decoder(x, meta, cache, update_cache=True, hidden_layers=(2,))
    np.testing.assert_allclose(with_hidden.k, plain.k, atol=1e-6)
    with pytest.raises(ValueError, match="hidden_layers"):
        decoder(x, meta, hidden_layers=(4,))


PHI = DecoderConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=4, head_dim=8, mlp_dim=64, qk_norm=True,
                    block="phi", rotary_fraction=0.5, norm_eps=1e-5)


def _layer_norm(x, scale, bias, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def _phi_reference(x, params, cfg):
    """Phi-1.5's decoder layer by layer in numpy, causal, written from the model's
    definition (HF PhiDecoderLayer): x + attn(ln(x)) + mlp(ln(x)), partial rotary."""
    t, hd, rot = x.shape[1], cfg.head_dim, cfg.rotary_dim
    pos = np.arange(t)
    freqs = cfg.rope_theta ** (-np.arange(rot // 2) * 2.0 / rot)
    cos, sin = np.cos(pos[:, None] * freqs), np.sin(pos[:, None] * freqs)

    def rotate(q):  # (B, T, H, hd): rotate_half on the first `rot` channels
        r, rest = q[..., :rot], q[..., rot:]
        x1, x2 = r[..., :rot // 2], r[..., rot // 2:]
        c, s = cos[None, :, None], sin[None, :, None]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, rest], -1)

    gelu = lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))
    blocks = jax.tree.map(np.asarray, params["blocks"])
    for i in range(cfg.num_layers):
        p = jax.tree.map(lambda a: a[i], blocks)
        h = _layer_norm(x, p["norm"]["scale"], p["norm"]["bias"], cfg.norm_eps)
        q = np.einsum("btd,dhk->bthk", h, p["attn"]["q"]["kernel"]) + p["attn"]["q"]["bias"]
        kv = np.einsum("btd,dshk->btshk", h, p["attn"]["kv"]["kernel"]) + p["attn"]["kv"]["bias"]
        k, v = kv[:, :, 0], kv[:, :, 1]
        qn, kn = p["attn"]["q_norm"], p["attn"]["k_norm"]
        q = rotate(_layer_norm(q, qn["scale"], qn["bias"], cfg.norm_eps))
        k = rotate(_layer_norm(k, kn["scale"], kn["bias"], cfg.norm_eps))
        logits = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(hd)
        logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = np.einsum("bhts,bshk->bthk", w, v)
        a = np.einsum("bthk,hkd->btd", o, p["attn"]["o"]["kernel"]) + p["attn"]["o"]["bias"]
        m = gelu(h @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]) @ p["mlp"]["fc2"]["kernel"]
        x = x + a + m + p["mlp"]["fc2"]["bias"]
    f = jax.tree.map(np.asarray, params["final_norm"])
    return _layer_norm(x, f["scale"], f["bias"], cfg.norm_eps)


def test_phi_block_matches_phi_layer_by_layer():
    dec = Decoder(PHI, rngs=nnx.Rngs(3))
    params = nnx.to_pure_dict(nnx.state(dec, nnx.Param))
    # Random norms and biases (they start at 1 and 0), so every parameter is exercised.
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.1 * jax.random.normal(jax.random.key(len(str(p))), a.shape)
        if str(p[-1]) in ("['bias']", "['scale']") else a, params)
    nnx.update(dec, params)
    x = jax.random.normal(jax.random.key(1), (2, 7, PHI.d_model))
    meta = Meta(jnp.ones((2, 7), jnp.int32), jnp.zeros((2, 7), jnp.int32),
                jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7)))
    out, _ = dec(x, meta)
    np.testing.assert_allclose(out, _phi_reference(np.asarray(x, np.float64), params, PHI), atol=2e-4)


def test_phi_parameters_are_phis_one_for_one():
    """Every tensor of a Phi-1.5 layer (HF names) has its counterpart, of the same size."""
    d, f, hd, h = PHI.d_model, PHI.mlp_dim, PHI.head_dim, PHI.num_heads
    dec = nnx.eval_shape(lambda: Decoder(PHI, rngs=nnx.Rngs(0)))
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v.shape
            for path, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(dec, nnx.Param)))}
    L = PHI.num_layers
    phi = {  # HF PhiForCausalLM tensor -> (ours, its shape there, per layer)
        "input_layernorm.weight": ("blocks/norm/scale", (d,)), "input_layernorm.bias": ("blocks/norm/bias", (d,)),
        "self_attn.q_proj.weight": ("blocks/attn/q/kernel", (d, h, hd)),
        "self_attn.q_proj.bias": ("blocks/attn/q/bias", (h, hd)),
        "self_attn.k_proj.weight+v_proj.weight": ("blocks/attn/kv/kernel", (d, 2, h, hd)),
        "self_attn.k_proj.bias+v_proj.bias": ("blocks/attn/kv/bias", (2, h, hd)),
        "self_attn.dense.weight": ("blocks/attn/o/kernel", (h, hd, d)), "self_attn.dense.bias": ("blocks/attn/o/bias", (d,)),
        "self_attn.q_layernorm.weight": ("blocks/attn/q_norm/scale", (hd,)),
        "self_attn.q_layernorm.bias": ("blocks/attn/q_norm/bias", (hd,)),
        "self_attn.k_layernorm.weight": ("blocks/attn/k_norm/scale", (hd,)),
        "self_attn.k_layernorm.bias": ("blocks/attn/k_norm/bias", (hd,)),
        "mlp.fc1.weight": ("blocks/mlp/fc1/kernel", (d, f)), "mlp.fc1.bias": ("blocks/mlp/fc1/bias", (f,)),
        "mlp.fc2.weight": ("blocks/mlp/fc2/kernel", (f, d)), "mlp.fc2.bias": ("blocks/mlp/fc2/bias", (d,)),
    }
    expected = {ours: (L,) + shape for ours, shape in phi.values()}
    expected.update({"final_norm/scale": (d,), "final_norm/bias": (d,)})
    assert flat == expected
    assert sum(int(np.prod(s)) for s in flat.values()) == PHI.num_params()
    assert PHI.head_bias
