import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import randomize_zero_inits
from unimm import objectives
from unimm.data.shapes import ShapesSource
from unimm.nn import diffusion as diff
from unimm.nn import spans
from unimm.nn.attention import Meta
from unimm.nn.decoding import prefix_meta
from unimm.nn.flops import attention_pairs
from unimm.nn.diffusion_lm import DiffusionLM
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


def _row(objective, ex, kind="caption_first", seed=1):
    return objective.encode([ex], np.random.default_rng(seed), kind=kind)


def test_caption_first_layout(objective, examples):
    ex = examples[0]
    out = _row(objective, ex)
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
    out = _row(objective, ex, "image_first")
    P, n = objective.s.num_patches, len(objective.tok.encode(ex["caption"]))
    assert out["tokens"][1] == objective.boi and out["image_start"][0] == 2
    assert out["tokens"][2 + P] == objective.eoi
    assert list(out["tokens"][3 + P:3 + P + n]) == objective.tok.encode(ex["caption"])
    assert out["lm_weight"][1] == 1 and out["lm_weight"][2 + P] == 0 and out["lm_weight"][3 + P:4 + P + n].all()
    caps = [_row(objective, ex, "image_first", s)["noise_cap"][0] for s in range(200)]
    assert abs(np.mean(caps) - objective.s.noise_cap_prob) < 0.1


def test_text_documents_are_prose_about_the_scene(tiny_config, examples):
    cfg = tiny_config.copy_and_resolve_references()
    cfg.transfusion.text_ratio = 0.5
    obj = objectives.build(cfg)
    r = obj.s.caption_first_ratio
    assert {s.name: s.weight for s in obj.streams()} == pytest.approx(
        {"caption_first": 0.5 * r, "image_first": 0.5 * (1 - r), "text": 0.5})
    ex = examples[2]
    out = _row(obj, ex, "text", seed=3)
    n = int(out["segment"].sum())
    text = obj.tok.decode(out["tokens"][:n])
    assert text.startswith(ex["caption"] + ", ") and "?" in text  # the caption, then questions with answers
    assert out["tokens"][0] == obj.tok.bos_id and out["tokens"][n - 1] == obj.tok.eos_id
    assert not out["image_valid"].any() and not out["span"].any()
    np.testing.assert_array_equal(out["lm_weight"][:n], [0] + [1] * (n - 1))  # every token but BOS is a target
    assert n <= obj.s.row_length


def _packed(tiny_config, docs_of, **transfusion):
    """(objective, its documents, the rows grain packs them into)."""
    import grain

    from unimm.data.pipeline import pack

    cfg = tiny_config.copy_and_resolve_references()
    cfg.transfusion.update(text_ratio=0.3, **transfusion)
    obj = objectives.build(cfg)
    docs = docs_of(obj)
    return obj, docs, list(pack(grain.MapDataset.source(docs).to_iter_dataset(), obj.packing()))


def test_packed_rows_hold_several_documents_each_its_own(tiny_config, examples):
    kinds = ["caption_first", "text", "image_first", "caption_first"] * 2
    rng = np.random.default_rng(0)
    obj, docs, rows = _packed(tiny_config, lambda o: [o.document(ex, rng, k) for ex, k in zip(examples * 2, kinds)],
                              pack_length=3 * 36, pack_images=2)
    assert sum(int(r["image_valid"].sum()) for r in rows) == sum(len(d["images"]) for d in docs)
    assert sum(len(set(np.unique(r["segment"])) - {0}) for r in rows) == len(docs)
    assert any(len(set(np.unique(r["segment"])) - {0}) > 1 for r in rows)  # packing did pack
    for row in rows:
        assert row["image_valid"].sum() <= 2
        for j in np.flatnonzero(row["image_valid"]):  # each image sits after its BOI, inside its document
            start = row["image_start"][j]
            doc_start = np.flatnonzero(row["segment"] == row["segment"][start])[0]
            assert row["tokens"][start - 1] == obj.boi and row["span"][start] == 1
            assert row["position"][start] == start - doc_start


def test_packed_documents_have_the_loss_they_have_alone(tiny_config, examples):
    """Two documents packed into one row give each token the loss and each image
    the diffusion loss they get in rows of their own (same timesteps and noise)."""
    from unimm.nn.losses import token_nll

    rng = np.random.default_rng(5)
    obj, docs, packed = _packed(tiny_config, lambda o: [o.document(examples[0], rng, "caption_first"),
                                                        o.document(examples[1], rng, "image_first")],
                                pack_length=2 * 36, pack_images=2)
    model = randomize_zero_inits(obj.make_model(nnx.Rngs(0)))
    assert len(packed) == 1 and set(np.unique(packed[0]["segment"])) == {0, 1, 2}
    t = jnp.array([[700, 200]])
    eps = jax.random.normal(jax.random.key(3), (1, 2) + obj.s.image_shape)
    batch = lambda rows: {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    logits, per_image = obj.forward(model, batch(packed), t, eps, jax.random.key(0))
    nll = token_nll(logits[:, :-1], jnp.asarray(packed[0]["tokens"])[None, 1:])[0][0]
    offset = 0
    for j, doc in enumerate(docs):
        row = obj.row([doc])
        one_logits, one_image = obj.forward(model, batch([row]), t[:, j:j + 1], eps[:, j:j + 1], jax.random.key(0))
        one_nll = token_nll(one_logits[:, :-1], jnp.asarray(row["tokens"])[None, 1:])[0][0]
        n = len(doc["tokens"])
        targets = np.flatnonzero(row["lm_weight"][1:n])
        assert len(targets) > 3
        np.testing.assert_allclose(nll[offset + targets], one_nll[targets], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(per_image[0, j], one_image[0, 0], rtol=1e-4)
        offset += n


def test_condition_dropout_removes_the_caption(tiny_config, examples):
    cfg = tiny_config.copy_and_resolve_references()
    cfg.transfusion.cond_dropout = 1.0
    obj = objectives.build(cfg)
    out = _row(obj, examples[0], seed=0)
    assert list(out["tokens"][:2]) == [obj.tok.bos_id, obj.boi]


def test_over_long_text_is_a_clear_error(objective):
    with pytest.raises(ValueError, match="longer than transfusion.max_text_len"):
        objective.text_ids("a red circle and " * 10)


def test_loss_and_flops(objective, model, examples):
    batch = {k: np.stack([_row(objective, e, seed=i)[k] for i, e in enumerate(examples)])
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


def _full_sequence_prediction(objective, model, prompt, x_t, t, x0_sc=None):
    """The image path's output (eps or v) from one uncached pass over [BOS prompt BOI image EOI]."""
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
    return out[0, 0], len(ids)


@pytest.mark.parametrize("variant", ["default", *VARIANTS])
def test_prefix_cached_denoising_equals_uncached(request, variant):
    objective, model = _variant(request, variant)
    x_t = jax.random.normal(jax.random.key(0), objective.s.image_shape)
    # With self-conditioning the image path also reads an estimate of x0; use a real one.
    x0_sc = jnp.tanh(jax.random.normal(jax.random.key(5), x_t.shape)) if objective.s.self_cond else None
    full, n = _full_sequence_prediction(objective, model, "a red circle", x_t, 700, x0_sc)
    assert float(jnp.abs(full).mean()) > 1e-2  # a real, non-trivial prediction
    if x0_sc is not None:  # the estimate is read: it changes the prediction
        assert not np.allclose(full, _full_sequence_prediction(objective, model, "a red circle", x_t, 700)[0],
                               atol=1e-3)
    ids = np.array([[objective.tok.bos_id] + objective.tok.encode("a red circle") + [objective.boi]], np.int32)
    cache = model.decoder.init_cache(1, n)
    _, cache = model.text(ids, Meta(np.ones_like(ids), np.zeros_like(ids), np.arange(n)[None]), cache)
    meta = spans.span_meta(jnp.array([n]), objective.s.num_patches, jnp.array([True]))
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
    captions = objective._captions([text, []])
    cache = model.decoder.init_cache(2, prefix.shape[1])
    _, cache = model.decoder(model.embed(prefix), prefix_meta(jnp.asarray(lengths), prefix.shape[1]), cache,
                             True)
    x = jax.random.normal(jax.random.key(1), (1,) + objective.s.image_shape)
    # Self-conditioning: each of the two rows reads its own estimate of x0.
    x0_sc = (jnp.tanh(jax.random.normal(jax.random.key(2), (2,) + objective.s.image_shape))
             if objective.s.self_cond else None)
    predict = lambda scale: tf.guided_predict(model, cache, jnp.asarray(lengths), captions, objective._draw(scale))
    guided, _ = predict(1.0)(x, 500, x0_sc)
    cond_meta = spans.span_meta(jnp.asarray(lengths[:1]), objective.s.num_patches, jnp.ones((1,), bool))
    cond_cache = jax.tree.map(lambda a: a[:, :1] if a.ndim == 5 else a[:1], cache)
    extra = model.caption_features(captions[:1])
    out = model.denoise(x, jnp.array([500]), cond_meta, cond_cache, extra, None if x0_sc is None else x0_sc[:1])
    cond = diff.eps_from_prediction(objective.s.prediction, out, x, jnp.asarray(objective.acp)[500])
    np.testing.assert_allclose(guided, cond, atol=1e-5)
    strong, _ = predict(3.0)(x, 500, x0_sc)
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


class _Scripted(DiffusionLM):
    """The real network with a script on top of its text logits: after token A
    comes BOI, and after an EOI placed before position LIMIT comes A; elsewhere
    the network decides (greedy)."""

    A, BOI, EOI, LIMIT = 0, 0, 0, 0

    def text(self, tokens, meta, cache):
        logits, cache = super().text(tokens, meta, cache)
        return logits + _script(tokens, meta.position, logits.shape[-1]), cache


def _script(tokens, position, vocab):
    s = _Scripted
    force = jnp.where(tokens == s.A, s.BOI, jnp.where((tokens == s.EOI) & (position < s.LIMIT), s.A, -1))
    return 1e4 * jax.nn.one_hot(force, vocab)


def test_interleaved_generation_of_two_images_equals_the_uncached_model(objective):
    """Text, an image, text, a second image, text: the tokens decoded after the
    images are the uncached model's greedy tokens over the whole sequence, and the
    second image is what the sampler draws over that prefix built afresh."""
    P = objective.s.num_patches
    prompt = objective.tok.encode("a red circle")
    _Scripted.A, _Scripted.BOI, _Scripted.EOI = prompt[-1], objective.boi, objective.eoi
    _Scripted.LIMIT = len(prompt) + 1 + 2 * P + 4  # the second EOI: from there on the network writes alone
    model = randomize_zero_inits(objective.make_model(nnx.Rngs(2)))
    model.__class__ = _Scripted
    rng = jax.random.key(4)
    (seq,) = objective.generate_ids(model, ["a red circle"], rng, max_text=5, max_images=2)
    kinds = [kind for kind, _ in seq.parts]
    assert kinds == ["text", "image", "text", "image", "text"]
    first, second, tail = seq.texts()
    assert first == [] and second == [_Scripted.A] and len(tail) >= 1
    # The whole sequence, uncached, with both images clean (t = 0).
    bos, boi, eoi = objective.tok.bos_id, objective.boi, objective.eoi
    seq_ids = [bos] + prompt + [boi] + [0] * P + [eoi, _Scripted.A, boi] + [0] * P + [eoi] + tail
    starts = [len(prompt) + 2, len(prompt) + P + 5]
    n = len(seq_ids)
    span = np.zeros((1, n), np.int32)
    for j, st in enumerate(starts):
        span[0, st:st + P] = j + 1
    tokens = jnp.asarray([seq_ids], jnp.int32)
    meta = Meta(np.ones((1, n), np.int32), span, np.arange(n, dtype=np.int32)[None])
    images = jnp.stack([jnp.asarray(x) for x in seq.images])[None]
    logits, _, _ = model(tokens, meta, images, jnp.zeros((1, 2), jnp.int32), jnp.asarray([starts]),
                         jnp.ones((1, 2), bool))
    logits = logits + _script(tokens, meta.position, logits.shape[-1])
    after = n - len(tail)
    greedy = np.asarray(jnp.argmax(logits[0, after - 1:n - 1], -1))
    np.testing.assert_array_equal(greedy, tail)
    # The second image: the sampler over [BOS prompt BOI image EOI A BOI] built by an uncached forward.
    prefix = seq_ids[:starts[1]]
    cache = model.decoder.init_cache(1, len(prefix))
    m = len(prefix)
    _, _, cache = model(jnp.asarray([prefix], jnp.int32), Meta(np.ones((1, m), np.int32), span[:, :m],
                                                               np.arange(m, dtype=np.int32)[None]),
                        images[:, :1], jnp.zeros((1, 1), jnp.int32), jnp.asarray([starts[:1]]), jnp.ones((1, 1), bool),
                        cache, update_cache=True)
    uncond = model.decoder.init_cache(1, len(prefix))
    _, uncond = model.text(jnp.asarray([[bos, boi]]), Meta(np.ones((1, 2), np.int32), np.zeros((1, 2), np.int32),
                                                           np.arange(2, dtype=np.int32)[None]), uncond)
    r_image = jax.random.split(jax.random.split(rng, 3)[0], 3)[2]  # the second round's image key
    x = tf._guided_images(model, cache.stack_rows(uncond), jnp.array([starts[1], 2]),
                          jnp.array([[_Scripted.A], [-1]]), r_image, objective._draw())
    np.testing.assert_allclose(x[0], seq.images[1], atol=1e-4)


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
    first = _row(objective, examples[0])
    text = objective.tok.encode(examples[0]["caption"])
    np.testing.assert_array_equal(first["caption_ids"][0, :len(text)], text)
    assert (first["caption_ids"][0, len(text):] == -1).all()
    # An image-first caption follows its image: conditioning on it would leak it to the LM.
    second = _row(objective, examples[0], "image_first")
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
