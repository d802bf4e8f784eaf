import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import randomize_zero_inits
from unimm import objectives
from unimm.data.shapes import ShapesSource
from unimm.nn import diffusion as diff
from unimm.nn.attention import Meta
from unimm.nn.decoding import prefix_meta
from unimm.nn.flops import attention_pairs
from unimm.objectives import transfusion as tf


@pytest.fixture(scope="module")
def objective(tiny_config):
    return objectives.build(tiny_config)


@pytest.fixture(scope="module")
def model(objective):
    return randomize_zero_inits(objective.make_model(nnx.Rngs(0)))


# Architecture variants the equivalence tests also cover: 2D RoPE over the
# patches (no position table), DiT-style adaLN timestep conditioning, pooled
# caption conditioning (with adaLN, so it reaches every block), and the README
# default's U-Net path with self-conditioning.
VARIANTS = {"rope_2d": dict(image=dict(rope="2d", pos_embedding="none")),
            "adaln": dict(image=dict(timestep_cond="adaln")),
            "caption_cond": dict(image=dict(timestep_cond="adaln"), transfusion=dict(caption_cond=True)),
            "unet_self_cond": dict(image=dict(io="unet", unet_channels=(8, 8, 16), unet_skips=True,
                                              unet_global_cond=True),
                                   transfusion=dict(caption_cond=True, self_cond=True, prediction="v")),
            "caption_own": dict(transfusion=dict(caption_cond=True, caption_embedding="own"))}


@pytest.fixture(scope="module")
def variants(tiny_config):
    built = {}

    def get(name):
        if name not in built:
            cfg = tiny_config.copy_and_resolve_references()
            for section, values in VARIANTS[name].items():
                cfg[section].update(values)
            obj = objectives.build(cfg)
            built[name] = obj, randomize_zero_inits(obj.make_model(nnx.Rngs(0)))
        return built[name]
    return get


def _variant(request, name):
    """(objective, model) of the default architecture or one of VARIANTS."""
    if name == "default":
        return request.getfixturevalue("objective"), request.getfixturevalue("model")
    return request.getfixturevalue("variants")(name)


@pytest.fixture(scope="module")
def examples(objective):
    return [ShapesSource(resolution=objective.resolution)[i] for i in range(4)]


def test_registry(tiny_config):
    assert objectives.get("transfusion") is tf.Transfusion
    with pytest.raises(ValueError, match="unknown objective 'nope'; registered"):
        objectives.get("nope")


def test_caption_first_layout(objective, examples):
    ex = examples[0]
    out = objective.encode([ex], np.random.default_rng(1), caption_first=True)
    text = objective.tok.encode(ex["caption"])
    P, n = objective.s.num_patches, len(text)
    tok = out["tokens"]
    assert tok[0] == objective.tok.bos_id and list(tok[1:1 + n]) == text
    assert tok[1 + n] == objective.boi and tok[2 + n + P] == objective.eoi and tok[3 + n + P] == objective.tok.eos_id
    assert out["image_start"][0] == 2 + n
    assert (out["span"] == 1).sum() == P and out["span"][2 + n:2 + n + P].all()
    assert (out["segment"][:4 + n + P] == 1).all() and (out["segment"][4 + n + P:] == 0).all()
    assert list(out["position"][:4 + n + P]) == list(range(4 + n + P))
    # Targets: the caption, BOI and EOS; never BOS, patches or EOI.
    expected = np.zeros_like(out["lm_weight"])
    expected[1:2 + n] = 1
    expected[3 + n + P] = 1
    np.testing.assert_array_equal(out["lm_weight"], expected)
    np.testing.assert_array_equal(out["images"][0], ex["image"])
    assert not out["noise_cap"][0]


def test_image_first_layout_and_noise_cap(objective, examples):
    ex = examples[1]
    out = objective.encode([ex], np.random.default_rng(1), caption_first=False)
    P, n = objective.s.num_patches, len(objective.tok.encode(ex["caption"]))
    assert out["tokens"][1] == objective.boi and out["image_start"][0] == 2
    assert out["tokens"][2 + P] == objective.eoi
    assert list(out["tokens"][3 + P:3 + P + n]) == objective.tok.encode(ex["caption"])
    assert out["lm_weight"][1] == 1 and out["lm_weight"][2 + P] == 0 and out["lm_weight"][3 + P:4 + P + n].all()
    caps = [objective.encode([ex], np.random.default_rng(s), caption_first=False)["noise_cap"][0]
            for s in range(200)]
    assert abs(np.mean(caps) - objective.s.noise_cap_prob) < 0.1


def test_several_pairs_per_sequence(tiny_config, examples):
    cfg = tiny_config.copy_and_resolve_references()
    cfg.transfusion.pairs_per_sequence = 2
    obj = objectives.build(cfg)
    out = obj.encode(examples[:2], np.random.default_rng(0), caption_first=True)
    assert set(np.unique(out["segment"])) == {0, 1, 2}
    assert set(np.unique(out["span"])) == {0, 1, 2}
    assert out["images"].shape[0] == 2 and out["image_valid"].all()
    second = out["segment"] == 2
    assert out["position"][second][0] == 0  # each pair is its own document
    assert obj.streams()[0].group == 2


def test_condition_dropout_removes_the_caption(tiny_config, examples):
    cfg = tiny_config.copy_and_resolve_references()
    cfg.transfusion.cond_dropout = 1.0
    obj = objectives.build(cfg)
    out = obj.encode([examples[0]], np.random.default_rng(0), caption_first=True)
    assert list(out["tokens"][:2]) == [obj.tok.bos_id, obj.boi]


def test_over_long_text_is_a_clear_error(objective):
    with pytest.raises(ValueError, match="longer than transfusion.max_text_len"):
        objective.text_ids("a red circle and " * 10)


def test_loss_and_flops(objective, model, examples):
    batch = {k: np.stack([objective.encode([e], np.random.default_rng(i))[k] for i, e in enumerate(examples)])
             for k in objective.example_spec()}
    loss, metrics = jax.jit(lambda b, r: objective.loss(model, b, r))(batch, jax.random.key(0))
    assert np.isfinite(float(loss)) and set(metrics) == {"lm_loss", "lm_accuracy", "diffusion_loss"}
    expected = float(metrics["lm_loss"]) + objective.s.diffusion_weight * float(metrics["diffusion_loss"])
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert objective.tokens_per_batch(batch) == int((batch["segment"] != 0).sum())
    pairs = attention_pairs(batch["segment"], batch["span"])
    tokens = objective.tokens_per_batch(batch)
    assert pairs > tokens * (tokens / len(examples)) / 2 / len(examples)  # at least the causal pairs
    assert objective.flops_per_batch(batch) > 6 * tokens * objective.dcfg.num_params() * 0.9


def _full_sequence_eps(objective, model, prompt, x_t, t, x0_sc=None):
    """Noise prediction from one uncached pass over [BOS prompt BOI image EOI]."""
    ids = [objective.tok.bos_id] + objective.tok.encode(prompt) + [objective.boi]
    P = objective.s.num_patches
    seq = np.array([ids + [0] * P + [objective.eoi]], np.int32)
    n = seq.shape[1]
    span = np.zeros((1, n), np.int32)
    span[0, len(ids):len(ids) + P] = 1
    meta = Meta(np.ones((1, n), np.int32), span, np.arange(n, dtype=np.int32)[None])
    captions = objective._captions([ids[1:-1]])[None]
    _, out, _ = model(seq, meta, x_t[None, None], jnp.array([[t]]), np.array([[len(ids)]]), np.array([[True]]),
                      caption_ids=captions, x0_sc=None if x0_sc is None else x0_sc[None, None])
    out = out[0, 0]  # eps or v, per transfusion.prediction; denoise() always returns eps
    if objective.s.prediction == "v":
        out = diff.eps_from_v(out, x_t, jnp.asarray(objective.acp)[t])
    return out, len(ids)


@pytest.mark.parametrize("variant", ["default", *VARIANTS])
def test_prefix_cached_denoising_equals_uncached(request, variant):
    objective, model = _variant(request, variant)
    x_t = jax.random.normal(jax.random.key(0), objective.s.image_shape)
    # With self-conditioning the image path also reads an estimate of x0; use a real one.
    x0_sc = jnp.tanh(jax.random.normal(jax.random.key(5), x_t.shape)) if objective.s.self_cond else None
    full, n = _full_sequence_eps(objective, model, "a red circle", x_t, 700, x0_sc)
    assert float(jnp.abs(full).mean()) > 1e-2  # a real, non-trivial prediction
    if x0_sc is not None:  # the estimate is read: it changes the prediction
        assert not np.allclose(full, _full_sequence_eps(objective, model, "a red circle", x_t, 700)[0], atol=1e-3)
    ids = np.array([[objective.tok.bos_id] + objective.tok.encode("a red circle") + [objective.boi]], np.int32)
    cache = model.decoder.init_cache(1, n)
    _, cache = model.text(ids, Meta(np.ones_like(ids), np.zeros_like(ids), np.arange(n)[None]), cache)
    meta = tf._image_meta(jnp.array([n]), objective.s.num_patches, jnp.array([True]))
    extra = model.caption_features(objective._captions([ids[0, 1:-1]]))
    for _ in range(2):  # the prefix is computed once and reused by every step
        cached = model.denoise(x_t[None], jnp.array([700]), meta, cache, extra,
                               None if x0_sc is None else x0_sc[None])[0]
        np.testing.assert_allclose(cached, full, atol=2e-5)


@pytest.mark.parametrize("variant", ["default", "caption_cond", "unet_self_cond"])
def test_cfg_scale_one_equals_the_conditional_prediction(request, variant):
    objective, model = _variant(request, variant)
    bos, boi = objective.tok.bos_id, objective.boi
    text = objective.tok.encode("a blue square")
    prefix, lengths = objective._pad([[bos] + text + [boi], [bos, boi]])
    extra = model.caption_features(objective._captions([text, []]))
    cache = model.decoder.init_cache(2, prefix.shape[1])
    _, cache = model.decoder(model.embed(prefix), prefix_meta(jnp.asarray(lengths), prefix.shape[1]), cache,
                             True)
    x = jax.random.normal(jax.random.key(1), (1,) + objective.s.image_shape)
    meta = tf._image_meta(jnp.asarray(lengths), objective.s.num_patches, jnp.ones((2,), bool))
    # Self-conditioning: each of the two rows reads its own estimate of x0.
    x0_sc = (jnp.tanh(jax.random.normal(jax.random.key(2), (2,) + objective.s.image_shape))
             if objective.s.self_cond else None)
    guided = tf.guided_eps(model, x, 500, meta, cache, 1.0, extra, x0_sc)
    cond_meta = tf._image_meta(jnp.asarray(lengths[:1]), objective.s.num_patches, jnp.ones((1,), bool))
    cond_cache = jax.tree.map(lambda a: a[:, :1] if a.ndim == 5 else a[:1], cache)
    cond = model.denoise(x, jnp.array([500]), cond_meta, cond_cache, None if extra is None else extra[:1],
                         None if x0_sc is None else x0_sc[:1])
    np.testing.assert_allclose(guided, cond, atol=1e-5)
    strong = tf.guided_eps(model, x, 500, meta, cache, 3.0, extra, x0_sc)
    assert not np.allclose(strong, cond, atol=1e-4)  # guidance does act at other scales


def test_generate_images_is_seeded_and_valid(objective, model):
    rng = jax.random.key(3)
    a = objective.generate_images(model, ["a red circle", "two squares"], rng)
    b = objective.generate_images(model, ["a red circle", "two squares"], rng)
    assert a.shape == (2,) + objective.s.image_shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("variant", ["default", *VARIANTS])
def test_cached_captioning_equals_uncached_greedy_decoding(request, variant, examples):
    objective, model = _variant(request, variant)
    image = examples[0]["image"]
    caption = objective.caption_images(model, image[None], jax.random.key(0))[0]
    # Uncached reference: re-run the whole sequence for every new token.
    P = objective.s.num_patches
    seq = [objective.tok.bos_id, objective.boi] + [0] * P + [objective.eoi]
    x0 = objective.to_model_space(jnp.asarray(image))[None, None]
    out = []
    for _ in range(objective.s.max_new_tokens):
        n = len(seq)
        span = np.zeros((1, n), np.int32)
        span[0, 2:2 + P] = 1
        meta = Meta(np.ones((1, n), np.int32), span, np.arange(n, dtype=np.int32)[None])
        logits, _, _ = model(np.array([seq], np.int32), meta, x0, jnp.zeros((1, 1), jnp.int32),
                             np.array([[2]]), np.array([[True]]))
        nxt = int(jnp.argmax(logits[0, -1]))
        out.append(nxt)
        if nxt == objective.tok.eos_id:
            break
        seq.append(nxt)
    assert caption == objective.tok.decode(out)


def test_interleaved_generation(objective):
    """A model that always predicts BOI after text: decoding stops at BOI, an image
    is drawn there, EOI is appended, and text continues."""
    model = objective.make_model(nnx.Rngs(1))
    # Zero every residual branch so the hidden state is the token's own embedding,
    # make all embeddings equal, and point the LM head at BOI.
    model.decoder.blocks.attn.o.kernel[...] = jnp.zeros_like(model.decoder.blocks.attn.o.kernel[...])
    model.decoder.blocks.mlp.wo.kernel[...] = jnp.zeros_like(model.decoder.blocks.mlp.wo.kernel[...])
    model.embed.embedding[...] = jnp.ones_like(model.embed.embedding[...])
    head = np.zeros(model.lm_head.kernel.shape, np.float32)
    head[:, objective.boi] = 1.0
    model.lm_head.kernel[...] = jnp.asarray(head)
    (before, image, after), = objective.generate(model, ["a red circle"], jax.random.key(0), max_text=4)
    assert before == "" and after == ""  # only BOI tokens were produced around the image
    assert image is not None and image.shape == objective.s.image_shape and image.dtype == np.uint8


@pytest.mark.parametrize("override, message", [
    (dict(image=dict(refine_blocks=2)), "refine_blocks > 0 needs image.refine_channels"),
    (dict(transfusion=dict(timestep_sampling="beta")), "unknown timestep sampling 'beta'"),
    (dict(image=dict(rope="3d")), "image.rope='3d'; choose '1d' or '2d'"),
    (dict(transfusion=dict(caption_embedding="clip")), "caption_embedding='clip'; choose 'shared' or 'own'"),
    (dict(image=dict(timestep_cond="film")), "image.timestep_cond='film'; choose 'add' or 'adaln'"),
    (dict(image=dict(io="linear", unet_global_cond=True)), "image.unet_global_cond set, but U-Net settings apply only"),
    (dict(image=dict(io="linear", unet_mid_blocks=1)), "image.unet_mid_blocks set, but U-Net settings apply only"),
    (dict(image=dict(unet_mid_blocks=-1)), "image.unet_mid_blocks=-1; it counts ResBlocks"),
])
def test_bad_image_settings_fail_before_anything_is_built(tiny_config, override, message):
    c = tiny_config.copy_and_resolve_references()
    for section, values in override.items():
        c[section].update(values)
    with pytest.raises(ValueError, match=message):
        tf.settings_from_config(c)


def test_caption_cond_sees_caption_first_captions_only(request, examples):
    objective, model = _variant(request, "caption_cond")
    first = objective.encode(examples[:1], np.random.default_rng(1), caption_first=True)
    text = objective.tok.encode(examples[0]["caption"])
    np.testing.assert_array_equal(first["caption_ids"][0, :len(text)], text)
    assert (first["caption_ids"][0, len(text):] == -1).all()
    # An image-first caption follows its image: conditioning on it would leak it to the LM.
    second = objective.encode(examples[:1], np.random.default_rng(1), caption_first=False)
    assert (second["caption_ids"] == -1).all()
    feats = model.caption_features(objective._captions([text, [], objective.tok.encode("a blue square")]))
    assert float(jnp.abs(feats[0]).mean()) > 1e-3 and not np.allclose(feats[0], feats[2])
    np.testing.assert_array_equal(feats[1], 0.0)  # no caption: no conditioning, as for CFG's unconditional rows


def test_caption_cond_can_pool_a_table_of_its_own(request, examples):
    """With caption_embedding='own' the pooled caption reads its own table, not the LM's."""
    objective, model = _variant(request, "caption_own")
    ids = objective._captions([objective.tok.encode(examples[0]["caption"])])
    before = model.caption_features(ids)
    assert float(jnp.abs(before).mean()) > 1e-3
    saved = model.embed.embedding[...]
    model.embed.embedding[...] = saved + 1.0
    np.testing.assert_array_equal(model.caption_features(ids), before)
    model.embed.embedding[...] = saved
    model.caption_embed.embedding[...] = model.caption_embed.embedding[...] + 1.0
    assert not np.allclose(model.caption_features(ids), before)


def test_self_conditioning_reads_the_models_own_estimate_on_half_the_steps(request):
    """The trained pass reads, on a coin's heads, the x0 the same model predicts
    without help (no gradient through it), and zeros otherwise."""
    objective, model = _variant(request, "unet_self_cond")
    shape = (2, 1) + objective.s.image_shape
    x_t = jax.random.normal(jax.random.key(0), shape)
    t = jnp.array([[900], [100]])
    plain = []

    def call(x0_sc):
        assert x0_sc is None  # the estimating pass itself reads no estimate
        out = jnp.full(shape, 0.25)  # a fixed v prediction
        plain.append(out)
        return None, out, None

    estimates = {bool(jax.random.bernoulli(jax.random.key(i))):
                 objective._self_cond_estimate(call, x_t, t, jax.random.key(i)) for i in range(8)}
    assert set(estimates) == {True, False}
    np.testing.assert_array_equal(estimates[False], 0.0)
    acp = jnp.asarray(objective.acp)[t][..., None, None, None]
    expected = jnp.clip(jnp.sqrt(acp) * x_t - jnp.sqrt(1 - acp) * 0.25, -1, 1)  # x0 = sqrt(a) x_t - sqrt(1-a) v
    np.testing.assert_allclose(estimates[True], expected, atol=1e-5)
    # Training through it: a finite loss, and on heads a gradient for the weights that read the estimate.
    source = ShapesSource(resolution=objective.resolution)
    rows = [objective.encode([source[i]], np.random.default_rng(i)) for i in range(2)]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    heads = next(jax.random.key(i) for i in range(16) if jax.random.bernoulli(jax.random.fold_in(jax.random.key(i), 1)))
    graphdef, params = nnx.split(model)
    loss_fn = lambda p: objective.loss(nnx.merge(graphdef, p), batch, heads)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    assert np.isfinite(float(loss))
    reads_estimate = grads["image_io"]["conv_in"]["kernel"][...][:, :, objective.s.channels:]
    assert float(jnp.abs(reads_estimate).max()) > 0
    # The benchmark's FLOP count knows the image path reads 2C channels.
    assert objective.flops_per_batch({k: np.asarray(v) for k, v in batch.items()}) > 0
