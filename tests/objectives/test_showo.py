import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import randomize_zero_inits, tiny_showo_config
from unimm import objectives
from unimm.data.shapes import ShapesSource
from unimm.nn import maskgit
from unimm.nn.attention import Meta
from unimm.nn.decoding import prefix_meta
from unimm.nn.losses import masked_token_loss
from unimm.objectives import showo


@pytest.fixture(scope="module")
def objective():
    return objectives.build(tiny_showo_config())


@pytest.fixture(scope="module")
def model(objective):
    return randomize_zero_inits(objective.make_model(nnx.Rngs(0)))


@pytest.fixture(scope="module")
def example(objective):
    return ShapesSource(resolution=objective.resolution)[0]


def test_vocabulary_layout(objective):
    v, k = objective.text_vocab, objective.codebook_size
    assert objective.code_start == v
    assert sorted(objective.ids.values()) == list(range(v + k, v + k + len(showo.SPECIALS)))
    assert objective.vocab_size == v + k + 7


def test_t2i_layout(objective, example):
    i, N = objective.ids, objective.num_tokens
    text = objective.text_ids(example["caption"])
    row = objective.layout("t2i", example["image"], text)
    n = len(text)
    assert list(row["tokens"][:n + 4]) == [i["t2i"], i["sot"]] + text + [i["eot"], i["soi"]]
    assert row["image_start"] == n + 4 and row["tokens"][n + 4 + N] == i["eoi"]
    # [SOI] codes [EOI] is one bidirectional span, as in the reference's omni-attention.
    assert (row["span"] == 1).sum() == N + 2 and row["span"][n + 3:n + 5 + N].all()
    assert row["stream"] == 0 and not row["targets"].any()  # t2i trains only the masked codes
    assert (row["segment"][:n + 5 + N] == 1).all() and (row["segment"][n + 5 + N:] == 0).all()


def test_mmu_and_lm_layouts_train_only_the_answer(objective, example):
    i, N = objective.ids, objective.num_tokens
    q, a = objective.tok.encode("what color is the circle?"), objective.tok.encode("red")
    row = objective.layout("mmu", example["image"], q, a)
    assert row["image_start"] == 2 and row["tokens"][0] == i["mmu"] and row["tokens"][2 + N] == i["eoi"]
    assert row["stream"] == 1 and row["span"][1:3 + N].all() and not row["span"][3 + N:].any()
    end = 2 + N + 2 + len(q) + len(a) + 1
    targets = np.flatnonzero(row["targets"])
    assert list(targets) == list(range(end - len(a) - 1, end))  # the answer and [EOT]
    assert row["tokens"][end - 1] == i["eot"]
    lm = objective.layout("lm", None, [], a)
    assert list(lm["tokens"][:len(a) + 2]) == [i["sot"]] + a + [i["eot"]]
    assert lm["targets"][1:len(a) + 2].all() and lm["stream"] == 2 and not lm["has_image"]


def test_over_long_text_is_rejected_by_name(objective):
    with pytest.raises(ValueError, match="max_text_len"):
        objective.text_ids(" ".join(["red circle"] * 30))


def test_mask_counts_follow_the_cosine_schedule(objective):
    masked = np.asarray(maskgit.training_mask(jax.random.key(0), 512, objective.num_tokens))
    n = masked.sum(1)
    N = objective.num_tokens
    assert n.min() >= 1 and n.max() <= N
    # ratio = cos(pi/2 u), u uniform: E[ratio] = 2/pi.
    assert abs(n.mean() / N - 2 / np.pi) < 0.05


def test_only_masked_positions_contribute_to_the_image_loss():
    logits = jax.random.normal(jax.random.key(0), (2, 6, 5))
    codes = jnp.array([[0, 1, 2, 3, 4, 0], [1, 1, 1, 1, 1, 1]])
    masked = jnp.array([[True, False, True, False, False, False], [False] * 5 + [True]])
    grad = jax.grad(lambda l: masked_token_loss(l, codes, masked, jnp.ones(2))[0])(logits)
    assert np.abs(np.asarray(grad)[~np.asarray(masked)]).max() == 0.0
    assert np.abs(np.asarray(grad)[np.asarray(masked)]).min() > 0.0
    loss = masked_token_loss(logits, codes, masked, jnp.ones(2))[0]
    nll = -jax.nn.log_softmax(logits)[jnp.arange(2)[:, None], jnp.arange(6)[None], codes]
    np.testing.assert_allclose(loss, nll[masked].mean(), rtol=1e-6)


def _batch(rows):
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def test_each_stream_is_averaged_on_its_own_and_weighted(objective, model, example):
    """Loss = 1 L_MTP + 1 L_mmu + 0.1 L_lm, each averaged over its own targets (the
    reference's coefficients): long text rows do not dilute captioning."""
    i = objective.ids
    q, a = objective.tok.encode("what color is the circle?"), objective.tok.encode("red")
    mmu = objective.layout("mmu", example["image"], q, a)
    t2i = objective.encode([example], np.random.default_rng(0), stream="t2i")
    short = objective.layout("lm", None, [], objective.tok.encode("a red circle"))
    long = objective.layout("lm", None, [], objective.tok.encode("a red circle and a blue square to the left of it"))
    rng = jax.random.key(0)
    loss1, m1 = objective.loss(model, _batch([t2i, mmu, short, short]), rng)
    loss2, m2 = objective.loss(model, _batch([t2i, mmu, long, long]), rng)
    assert np.isfinite(float(loss1)) and min(float(m1[k]) for k in ("mtp_loss", "mmu_loss", "lm_loss")) > 0
    np.testing.assert_allclose(m1["mmu_loss"], m2["mmu_loss"], rtol=1e-6)  # the lm rows leave captioning alone
    assert not np.isclose(float(m1["lm_loss"]), float(m2["lm_loss"]))
    for loss, m in ((loss1, m1), (loss2, m2)):
        np.testing.assert_allclose(loss, m["mtp_loss"] + m["mmu_loss"] + 0.1 * m["lm_loss"], rtol=1e-5)
    # The mmu loss is the mean over its targets (the answer and [EOT]) alone.
    codes = objective.tokenize(model, example["image"][None])[0] + objective.code_start
    tokens = np.array(mmu["tokens"])
    tokens[2:2 + objective.num_tokens] = codes
    logits, _ = model(jnp.asarray(tokens)[None], Meta(*(jnp.asarray(mmu[k])[None] for k in
                                                       ("segment", "span", "position"))))
    targets = np.flatnonzero(mmu["targets"])
    nll = -jax.nn.log_softmax(logits[0, targets - 1])[jnp.arange(len(targets)), tokens[targets]]
    assert tokens[targets[-1]] == i["eot"]
    np.testing.assert_allclose(m1["mmu_loss"], nll.mean(), rtol=1e-4)


def test_understanding_rows_ask_pope_probes_answered_yes_and_no_alike(objective):
    from unimm.data.shapes import ShapesSource

    source = ShapesSource(resolution=objective.resolution)
    rng = np.random.default_rng(0)
    asked = [objective.question(source[k], rng) for k in range(1500)]
    asked = [q for q in asked if q is not None]
    assert abs(len(asked) / 1500 - objective.s.qa_prob) < 0.05
    probes = [q for q in asked if q["kind"].startswith("pope")]
    assert abs(len(probes) / len(asked) - objective.s.probe_prob) < 0.05
    assert abs(np.mean([q["answer"] == "no" for q in probes]) - 0.5) < 0.05
    assert {q["kind"] for q in asked} >= {"color", "count_all", "pope_random", "pope_adversarial"}


def _uncached_code_logits(objective, model, prefix, codes, masked):
    """Code logits of one row: prefix + [SOI] image [EOI] (one span), a plain forward with no cache."""
    N, st = objective.num_tokens, objective._static()
    image = np.where(masked, st.mask_id, codes + objective.code_start)
    seq = np.concatenate([prefix, [st.soi], image, [st.eoi]])[None]
    n = seq.shape[1]
    span = np.zeros((1, n), np.int32)
    span[0, len(prefix):] = 1
    meta = Meta(jnp.ones((1, n), jnp.int32), jnp.asarray(span), jnp.arange(n, dtype=jnp.int32)[None])
    logits, _ = model(jnp.asarray(seq, jnp.int32), meta)
    logits = logits[0, len(prefix) + 1:len(prefix) + 1 + N]
    return np.asarray(logits[:, objective.code_start:objective.code_start + objective.codebook_size])


def test_maskgit_one_step_per_token_equals_greedy_sequential_unmasking(objective, model):
    prompts, s = ["a red circle", "two squares"], 1.5
    N = objective.num_tokens
    codes = np.asarray(objective.sample_codes(model, prompts, jax.random.key(0), steps=N, temperature=0.0,
                                              confidence_noise=0.0, guidance=s))
    prefix, lengths = objective.t2i_prefixes(prompts)
    b = len(prompts)
    for r in range(b):
        cond, uncond = prefix[r, :lengths[r]], prefix[b + r, :lengths[b + r]]
        ref, masked = np.zeros(N, np.int64), np.ones(N, bool)
        for _ in range(N):
            lc = _uncached_code_logits(objective, model, cond, ref, masked)
            lu = _uncached_code_logits(objective, model, uncond, ref, masked)
            logp = np.asarray(jax.nn.log_softmax((1 + s) * lc - s * lu))
            best = np.where(masked, logp.max(-1), -np.inf)
            j = int(np.argmax(best))
            ref[j], masked[j] = int(np.argmax(logp[j])), False
        np.testing.assert_array_equal(codes[r], ref)


def test_tokens_revealed_per_step_follow_the_schedule(objective, model):
    N, steps = objective.num_tokens, 5
    _, history = objective.sample_codes(model, ["a circle"], jax.random.key(1), steps=steps, return_history=True)
    left = np.asarray(history)[:, 0]
    expect, now = [], N
    for i in range(steps):
        n = 0 if i == steps - 1 else int(np.clip(np.floor(N * np.cos(np.pi / 2 * (i + 1) / steps)), 1, now - 1))
        expect.append(n)
        now = n
    assert list(left) == expect and left[-1] == 0


def test_guidance_zero_equals_the_conditional_prediction(objective, model):
    prompts = ["a blue square"]
    st = objective._static(guidance=0.0)
    prefix, lengths = objective.t2i_prefixes(prompts)
    graphdef, params = nnx.split(model)
    m = nnx.merge(graphdef, params)
    cache = m.decoder.init_cache(prefix.shape[0], prefix.shape[1])
    _, cache = m(jnp.asarray(prefix), prefix_meta(jnp.asarray(lengths), prefix.shape[1]), cache, True)
    N = objective.num_tokens
    codes = np.random.default_rng(0).integers(0, objective.codebook_size, (1, N))
    masked = np.random.default_rng(1).random((1, N)) < 0.5
    guided = showo.guided_code_logits(m, jnp.asarray(codes), jnp.asarray(masked), jnp.asarray(lengths), cache, st)
    cond = _uncached_code_logits(objective, model, prefix[0, :lengths[0]], codes[0], masked[0])
    np.testing.assert_allclose(np.asarray(guided)[0], cond, rtol=1e-4, atol=1e-5)
    strong = showo.guided_code_logits(m, jnp.asarray(codes), jnp.asarray(masked), jnp.asarray(lengths), cache,
                                      objective._static(guidance=3.0))
    assert not np.allclose(np.asarray(strong)[0], cond, atol=1e-3)


def test_inpainting_keeps_the_codes_outside_the_region(objective, model, example):
    images = np.stack([example["image"]] * 2)
    g = objective.ts.grid
    region = np.zeros((2, g, g), bool)
    region[:, : g // 2] = True  # top half
    known = objective.tokenize(model, images)
    prefix_rng = jax.random.key(3)
    codes = objective.sample_codes(model, ["a circle", "a square"], prefix_rng, codes=known,
                                   masked=region.reshape(2, -1))
    codes = np.asarray(codes)
    keep = ~region.reshape(2, -1)
    np.testing.assert_array_equal(codes[keep], known[keep])
    out = objective.inpaint(model, ["a circle", "a square"], images, region, prefix_rng)
    assert out.shape == images.shape and out.dtype == np.uint8


def test_understanding_decodes_text(objective, model, example):
    images = np.stack([example["image"]] * 2)
    caps = objective.caption_images(model, images, jax.random.key(0))
    answers = objective.answer_questions(model, images, ["what color is the circle?", "how many objects are there?"],
                                         jax.random.key(0))
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps) and len(answers) == 2
