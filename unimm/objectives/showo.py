"""Show-o (Xie et al., 2024): one transformer over text tokens and discrete image
codes; next-token prediction on text, masked-token prediction on images, and
omni-attention (causal for text, full inside each image).

Vocabulary: text ids [0, V), image codes [V, V + K), then [T2I] [MMU] [SOI]
[EOI] [SOT] [EOT] [MASK]. One example per row (right-padded):

    t2i (generation):     [T2I] [SOT] text [EOT] [SOI] code x N [EOI]
    mmu (understanding):  [MMU] [SOI] code x N [EOI] [SOT] question answer [EOT]
    lm (text only):       [SOT] text [EOT]

The frozen image tokenizer (its own run, configs/vq_tiny.py) turns images into
codes inside the training step. t2i rows mask a cosine-scheduled fraction of
their codes ([MASK]) and are trained to predict them (L_MTP over code logits);
mmu and lm rows are trained on their answer/text tokens (L_NTP). Loss = L_MTP +
alpha * L_NTP, each stream scaled by its loss weight (paper: t2i 1, mmu 1, lm
0.1); t2i captions are dropped with probability cond_dropout, for guidance.

Sampling (MaskGIT): the prompt prefix runs once into a KV cache (the image
never changes it: text cannot attend to later tokens); every unmasking step
runs only the N image tokens against it, conditional and unconditional rows
batched, guided as (1 + s) * cond - s * uncond; each step keeps the least
confident cosine-scheduled number of tokens masked. Inpainting unmasks only a
region. Understanding decodes text after the image with the KV cache.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm.nn import flops as flops_lib
from unimm.nn.attention import KVCache, Meta
from unimm.nn.decoding import decode, pad_rows, prefix_meta
from unimm.nn.layers import Embed, Linear
from unimm.nn.losses import cross_entropy
from unimm.nn.transformer import Decoder, DecoderConfig
from unimm.objectives.base import ArraySpec, Objective, Pretrained, Stream
from unimm.tokenizers import text as text_tok
from unimm.tokenizers.image import ImageTokenizer, ImageTokenizerSettings

SPECIALS = ("t2i", "mmu", "soi", "eoi", "sot", "eot", "mask")
STREAMS = ("t2i", "mmu", "lm")


@dataclasses.dataclass(frozen=True)
class Settings:
    """config.showo and config.sampling, checked."""

    max_text_len: int = 24  # text tokens of a row (mmu: question + answer)
    t2i_ratio: float = 0.5  # how often each stream is drawn (grain mixing)
    mmu_ratio: float = 0.4
    lm_ratio: float = 0.1
    t2i_loss_weight: float = 1.0
    mmu_loss_weight: float = 1.0
    lm_loss_weight: float = 0.1
    ntp_weight: float = 1.0  # alpha in L_MTP + alpha * L_NTP
    cond_dropout: float = 0.1
    qa_prob: float = 0.5  # mmu rows: a question and its answer, else a caption
    z_loss: float = 0.0
    # sampling
    sample_steps: int = 16
    guidance_scale: float = 1.75
    sample_temperature: float = 1.0  # MaskGIT code sampling (0: greedy)
    confidence_noise: float = 4.5  # Gumbel noise on confidences, annealed to 0 (MaskGIT's choice temperature)
    max_new_tokens: int = 24
    temperature: float = 0.0  # text decoding

    def __post_init__(self):
        ratios = (self.t2i_ratio, self.mmu_ratio, self.lm_ratio)
        if min(ratios) < 0 or sum(ratios) <= 0:
            raise ValueError(f"showo stream ratios {ratios} (t2i, mmu, lm) must be >= 0 and not all 0")
        if self.sample_steps < 1:
            raise ValueError(f"sampling.sample_steps={self.sample_steps} must be >= 1")


def settings_from_config(config) -> Settings:
    merged = {}
    for section in ("showo", "sampling"):
        if section in config:
            merged.update(dict(config[section]))
    known = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ValueError(f"unknown Show-o settings {unknown} in config.showo/sampling; known: {sorted(known)}")
    return Settings(**merged)


def tokenizer_settings(config) -> ImageTokenizerSettings:
    t = config.get("image_tokenizer")
    if t is None or "image_tokenizer" not in t:
        raise ValueError("Show-o needs config.image_tokenizer: the config of the image tokenizer run whose codes "
                         "it models (see unimm/configs/image_tokenizer.py)")
    if t.image.resolution != config.image.resolution:
        raise ValueError(f"image_tokenizer.image.resolution={t.image.resolution} differs from "
                         f"image.resolution={config.image.resolution}")
    return ImageTokenizerSettings.from_dict(dict(t.image_tokenizer), t.image.resolution)


# ---------------------------------------------------------------------------
# Mask schedule and losses (pure)


def mask_ratio(progress):
    """MaskGIT's cosine schedule: the fraction of image tokens masked at progress in [0, 1]."""
    return jnp.cos(0.5 * jnp.pi * progress)


def num_still_masked(step: int, steps: int, total, masked_now):
    """Tokens left masked after unmasking step `step` of `steps` (0-based), for
    `total` maskable tokens of which `masked_now` are masked: the cosine schedule,
    at least one revealed per step, none left after the last."""
    n = jnp.floor(total * mask_ratio((step + 1) / steps)).astype(jnp.int32)
    n = jnp.clip(n, 1, jnp.maximum(masked_now - 1, 0))
    return jnp.where(step + 1 >= steps, 0, jnp.minimum(n, masked_now))


def keep_lowest(scores, n):
    """Boolean (B, N): the n[b] lowest-scoring positions of each row."""
    rank = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
    return rank < n[:, None]


def masked_token_loss(code_logits, codes, masked, row_weight):
    """L_MTP: cross-entropy over code logits (B, N, K) at masked positions only,
    scaled per row, averaged over masked positions."""
    w = masked.astype(jnp.float32) * row_weight[:, None]
    return cross_entropy(code_logits, codes, w, normalizer=masked.sum())


# ---------------------------------------------------------------------------
# Model


class ShowoModel(nnx.Module):
    def __init__(self, dcfg: DecoderConfig, vocab_size: int, tokenizer: ImageTokenizerSettings, *, rngs: nnx.Rngs):
        self.embed = Embed(vocab_size, dcfg.d_model, rngs=rngs, dtype=dcfg.compute_dtype)
        self.decoder = Decoder(dcfg, rngs=rngs)
        self.lm_head = Linear(dcfg.d_model, vocab_size, ("embed", "vocab"), rngs=rngs, dtype=dcfg.compute_dtype)
        self.image_tokenizer = ImageTokenizer(tokenizer, rngs=rngs)  # frozen; loaded from its own run

    def __call__(self, tokens, meta: Meta, cache: Optional[KVCache] = None, update_cache: bool = False):
        h, cache = self.decoder(self.embed(tokens), meta, cache, update_cache)
        return self.lm_head(h).astype(jnp.float32), cache


# ---------------------------------------------------------------------------
# Sampling (pure functions of the split model, jitted once per shape)


@dataclasses.dataclass(frozen=True)
class _SampleStatic:
    num_tokens: int
    code_start: int
    codebook_size: int
    mask_id: int
    steps: int
    guidance: float
    temperature: float
    confidence_noise: float


def _image_meta(start, n):
    b = start.shape[0]
    one = jnp.ones((b, n), jnp.int32)
    return Meta(one, one, start[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :])


def code_logits(model: ShowoModel, codes, masked, start, cache: KVCache, st: _SampleStatic):
    """Code logits (R, N, K) of an image span after a cached prefix (read-only)."""
    tokens = jnp.where(masked, st.mask_id, codes + st.code_start)
    logits, _ = model(tokens, _image_meta(start, st.num_tokens), cache, update_cache=False)
    return logits[..., st.code_start:st.code_start + st.codebook_size]


def guided_code_logits(model, codes, masked, start, cache, st: _SampleStatic):
    """Guided logits for B images; the cache holds B conditional rows then B
    unconditional ones, whose images start at `start` (2B,)."""
    two = lambda a: jnp.concatenate([a, a])
    logits = code_logits(model, two(codes), two(masked), start, cache, st)
    b = codes.shape[0]
    cond, uncond = logits[:b], logits[b:]
    return cond if st.guidance == 0 else (1 + st.guidance) * cond - st.guidance * uncond


def _unmask_loop(model, cache, start, codes, masked, rng, st: _SampleStatic):
    """MaskGIT: iteratively reveal `masked` codes (B, N). Returns (codes, number
    still masked after each step (steps, B))."""
    total = masked.sum(-1)

    def body(i, carry):
        codes, masked, rng, history = carry
        logits = guided_code_logits(model, codes, masked, start, cache, st)
        logp = jax.nn.log_softmax(logits, -1)
        rng, r_pick, r_conf = jax.random.split(rng, 3)
        if st.temperature > 0:
            sampled = jax.random.categorical(r_pick, logits / st.temperature).astype(jnp.int32)
        else:
            sampled = jnp.argmax(logits, -1).astype(jnp.int32)
        conf = jnp.take_along_axis(logp, sampled[..., None], -1)[..., 0]
        # MaskGIT's confidence noise, annealed to 0 over the steps.
        anneal = st.confidence_noise * (1.0 - (i + 1) / st.steps)
        conf = conf + anneal * jax.random.gumbel(r_conf, conf.shape)
        conf = jnp.where(masked, conf, jnp.inf)
        n_left = num_still_masked(i, st.steps, total, masked.sum(-1))
        still = masked & keep_lowest(conf, n_left)
        codes = jnp.where(masked & ~still, sampled, codes)
        return codes, still, rng, history.at[i].set(still.sum(-1))

    history = jnp.zeros((st.steps, codes.shape[0]), jnp.int32)
    codes, _, _, history = jax.lax.fori_loop(0, st.steps, body, (codes, masked, rng, history))
    return codes, history


@functools.partial(jax.jit, static_argnames=("graphdef", "st"))
def _sample_codes(graphdef, params, prefix, lengths, codes, masked, rng, *, st: _SampleStatic):
    """prefix (2B, Lp): B conditional prompts then B unconditional ones, each ending in [SOI]."""
    model = nnx.merge(graphdef, params)
    cache = model.decoder.init_cache(prefix.shape[0], prefix.shape[1])
    _, cache = model(prefix, prefix_meta(lengths, prefix.shape[1]), cache, update_cache=True)
    return _unmask_loop(model, cache, lengths, codes, masked, rng, st)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _tokenize(graphdef, params, images):
    return nnx.merge(graphdef, params).tokenize(images)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _detokenize(graphdef, params, codes):
    x = nnx.merge(graphdef, params).detokenize(codes)
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill(graphdef, params, tokens, lengths, span, *, cache_len):
    model = nnx.merge(graphdef, params)
    cache = model.decoder.init_cache(tokens.shape[0], cache_len)
    meta = prefix_meta(lengths, tokens.shape[1])
    logits, cache = model(tokens, Meta(meta.segment, span, meta.position), cache, update_cache=True)
    return logits[jnp.arange(tokens.shape[0]), lengths - 1], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "stop_ids", "pad_id", "temperature"))
def _decode_text(graphdef, params, cache, first_logits, start, rng, *, max_new, stop_ids, pad_id, temperature):
    model = nnx.merge(graphdef, params)

    def step(cache, tok, pos, active):
        seg = active.astype(jnp.int32)[:, None]
        logits, cache = model(tok, Meta(seg, jnp.zeros_like(seg), pos), cache, update_cache=True)
        return logits[:, -1], cache

    return decode(step, cache, first_logits, start, max_new, stop_ids, pad_id, rng, temperature)


# ---------------------------------------------------------------------------
# The objective


class Showo(Objective):
    name = "showo"

    def __init__(self, config, shapes_only: bool = False):
        super().__init__(config, shapes_only)
        self.s = settings_from_config(config)
        self.ts = tokenizer_settings(config)
        self.dcfg = DecoderConfig.from_config(config.model)
        self.tok = None if shapes_only else text_tok.load_checked(config.tokenizer)
        v = config.tokenizer.vocab_size if shapes_only else self.tok.vocab_size
        self.text_vocab, self.code_start, self.codebook_size = v, v, self.ts.codebook_size
        self.ids = {name: v + self.codebook_size + i for i, name in enumerate(SPECIALS)}
        self.vocab_size = v + self.codebook_size + len(SPECIALS)
        self.pad_id = text_tok.PAD if shapes_only else self.tok.pad_id
        self.num_tokens = self.ts.num_tokens

    @property
    def resolution(self) -> int:
        return self.ts.resolution

    @property
    def compute_dtype(self):
        return self.dcfg.compute_dtype

    # -- model -----------------------------------------------------------------
    def make_model(self, rngs: nnx.Rngs) -> ShowoModel:
        return ShowoModel(self.dcfg, self.vocab_size, self.ts, rngs=rngs)

    def pretrained(self, workdir) -> list[Pretrained]:
        """The frozen image tokenizer, from image_tokenizer.workdir (default <workdir>/image_tokenizer)."""
        t = self.config.image_tokenizer
        return [Pretrained("image_tokenizer", t.get("workdir") or str(pathlib.Path(workdir) / "image_tokenizer"), t)]

    def frozen(self) -> tuple[str, ...]:
        return ("^image_tokenizer/",)

    # -- data ------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.num_tokens + self.s.max_text_len + 5

    def example_spec(self) -> dict[str, ArraySpec]:
        seq = lambda dt: ArraySpec((self.seq_len,), dt, ("batch", "length"))
        row = lambda dt: ArraySpec((), dt, ("batch",))
        return {"tokens": seq(np.int32), "segment": seq(np.int32), "span": seq(np.int32),
                "position": seq(np.int32), "ntp_weight": seq(np.float32),
                "images": ArraySpec((self.resolution, self.resolution, 3), np.uint8, ("batch", None, None, None)),
                "image_start": row(np.int32), "has_image": row(np.bool_), "mtp_weight": row(np.float32)}

    def streams(self) -> list[Stream]:
        s = self.s
        out = [Stream(name, ratio, functools.partial(self.encode, stream=name))
               for name, ratio in (("t2i", s.t2i_ratio), ("mmu", s.mmu_ratio), ("lm", s.lm_ratio)) if ratio > 0]
        return out

    def text_ids(self, text: str) -> list[int]:
        ids = self.tok.encode(text)
        if len(ids) > self.s.max_text_len:
            raise ValueError(f"text of {len(ids)} tokens is longer than showo.max_text_len={self.s.max_text_len}: "
                             f"{text!r}; raise the limit or shorten the text")
        return ids

    def encode(self, examples: list[dict], rng: np.random.Generator, stream: str) -> dict[str, np.ndarray]:
        ex = examples[0]
        if stream == "t2i":
            text = [] if rng.random() < self.s.cond_dropout else self.text_ids(ex["caption"])
            return self.layout("t2i", ex["image"], text)
        if stream == "mmu":
            qa = ex.get("qa") or []
            if qa and rng.random() < self.s.qa_prob:
                q = qa[rng.integers(len(qa))]
                return self.layout("mmu", ex["image"], self.tok.encode(q["question"]), self.tok.encode(q["answer"]))
            return self.layout("mmu", ex["image"], [], self.text_ids(ex["caption"]))
        return self.layout("lm", None, [], self.text_ids(ex["caption"]))

    def layout(self, stream: str, image, prompt: Sequence[int], answer: Sequence[int] = ()) -> dict[str, np.ndarray]:
        """One row: t2i (prompt = caption), mmu (prompt = question, answer = the
        trained text) or lm (answer = the text)."""
        i, N = self.ids, self.num_tokens
        prompt, answer = list(prompt), list(answer)
        if len(prompt) + len(answer) > self.s.max_text_len:
            raise ValueError(f"{len(prompt) + len(answer)} text tokens exceed showo.max_text_len="
                             f"{self.s.max_text_len}")
        out = {name: np.zeros(a.shape, a.dtype) for name, a in self.example_spec().items()}
        image_part = [i["soi"]] + [0] * N + [i["eoi"]]
        if stream == "t2i":
            seq = [i["t2i"], i["sot"]] + prompt + [i["eot"]] + image_part
            start = len(prompt) + 4
            targets = []
        elif stream == "mmu":
            seq = [i["mmu"]] + image_part + [i["sot"]] + prompt + answer + [i["eot"]]
            start = 2
            targets = list(range(len(seq) - len(answer) - 1, len(seq)))
        elif stream == "lm":
            seq = [i["sot"]] + answer + [i["eot"]]
            start, targets = 0, list(range(1, len(seq)))
        else:
            raise ValueError(f"unknown Show-o stream {stream!r}; choose from {STREAMS}")
        n = len(seq)
        out["tokens"][:n] = seq
        out["tokens"][n:] = self.pad_id
        out["segment"][:n] = 1
        out["position"][:n] = np.arange(n)
        weight = {"t2i": self.s.t2i_loss_weight, "mmu": self.s.mmu_loss_weight, "lm": self.s.lm_loss_weight}[stream]
        out["ntp_weight"][targets] = weight
        if image is not None:
            out["span"][start:start + N] = 1
            out["images"] = np.asarray(image, np.uint8)
            out["image_start"] = start
            out["has_image"] = True
        out["mtp_weight"] = weight if stream == "t2i" else 0.0
        return out

    def synthetic_batch(self, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Full-length t2i rows with random text and images, for benchmarks."""
        rng = np.random.default_rng(seed)
        r = self.resolution
        rows = [self.layout("t2i", rng.integers(0, 256, (r, r, 3), dtype=np.uint8),
                            rng.integers(4, self.text_vocab, self.s.max_text_len)) for _ in range(batch_size)]
        return {name: np.stack([row[name] for row in rows]) for name in rows[0]}

    # -- training --------------------------------------------------------------
    def image_slots(self, batch):
        """Sequence positions (B, N) of each row's image codes (out of range if it has none)."""
        length = batch["tokens"].shape[1]
        start = jnp.where(batch["has_image"], batch["image_start"], length)
        return start[:, None] + jnp.arange(self.num_tokens)[None, :]

    def mask_codes(self, rng, batch_size: int):
        """Which codes (B, N) a training row masks: a cosine-scheduled fraction, at least one."""
        r_ratio, r_pick = jax.random.split(rng)
        ratio = mask_ratio(jax.random.uniform(r_ratio, (batch_size,)))
        n = jnp.maximum(jnp.ceil(ratio * self.num_tokens), 1).astype(jnp.int32)
        return keep_lowest(jax.random.uniform(r_pick, (batch_size, self.num_tokens)), n)

    def loss(self, model: ShowoModel, batch, rng):
        b = batch["tokens"].shape[0]
        codes = jax.lax.stop_gradient(model.image_tokenizer.tokenize(batch["images"]))
        slots = self.image_slots(batch)
        rows = jnp.arange(b)[:, None]
        tokens = batch["tokens"].at[rows, slots].set(codes + self.code_start, mode="drop")
        masked = self.mask_codes(rng, b) & (batch["mtp_weight"] > 0)[:, None]
        inputs = tokens.at[rows, slots].set(jnp.where(masked, self.ids["mask"], codes + self.code_start),
                                            mode="drop")
        logits, _ = model(inputs, Meta(batch["segment"], batch["span"], batch["position"]))
        length = tokens.shape[1]
        img_logits = logits[rows, jnp.minimum(slots, length - 1)][..., self.code_start:self.code_start + self.codebook_size]
        mtp, mtp_m = masked_token_loss(img_logits, codes, masked, batch["mtp_weight"])
        w = batch["ntp_weight"][:, 1:]
        ntp, ntp_m = cross_entropy(logits[:, :-1], tokens[:, 1:], w, self.s.z_loss, normalizer=(w > 0).sum())
        loss = mtp + self.s.ntp_weight * ntp
        return loss, {"mtp_loss": mtp_m["ce"], "mtp_accuracy": mtp_m["accuracy"], "ntp_loss": ntp_m["ce"],
                      "ntp_accuracy": ntp_m["accuracy"]}

    def tokens_per_batch(self, batch) -> int:
        return int((np.asarray(batch["segment"]) != 0).sum())

    def flops_per_batch(self, batch) -> float:
        tokens = self.tokens_per_batch(batch)
        pairs = flops_lib.attention_pairs(batch["segment"], batch["span"])
        fwd = flops_lib.decoder_forward_flops(self.dcfg, tokens, pairs)
        fwd += flops_lib.dense_flops(tokens, self.dcfg.d_model, self.vocab_size)
        # The frozen tokenizer only encodes (forward) each batch's images.
        return flops_lib.TRAIN_MULTIPLIER * fwd + int(np.asarray(batch["has_image"]).sum()) * self._encoder_flops

    @functools.cached_property
    def _encoder_flops(self) -> float:
        model = nnx.eval_shape(lambda: self.make_model(nnx.Rngs(0)))
        graphdef, state = nnx.split(model.image_tokenizer)
        r = self.resolution
        return flops_lib.xla_flops(lambda st, x: nnx.merge(graphdef, st).tokenize(x), state,
                                   jax.ShapeDtypeStruct((1, r, r, 3), jnp.uint8))

    # -- sampling --------------------------------------------------------------
    def _static(self, guidance=None, steps=None, temperature=None, confidence_noise=None) -> _SampleStatic:
        s = self.s
        return _SampleStatic(num_tokens=self.num_tokens, code_start=self.code_start,
                             codebook_size=self.codebook_size, mask_id=self.ids["mask"],
                             steps=int(steps or s.sample_steps),
                             guidance=float(s.guidance_scale if guidance is None else guidance),
                             temperature=float(s.sample_temperature if temperature is None else temperature),
                             confidence_noise=float(s.confidence_noise if confidence_noise is None
                                                    else confidence_noise))

    def _pad(self, seqs):
        return pad_rows(seqs, self.pad_id)

    def t2i_prefixes(self, prompts: Sequence[str]):
        """Padded [T2I] [SOT] text [EOT] [SOI] prefixes: the prompts', then as many unconditional ones."""
        i = self.ids
        cond = [[i["t2i"], i["sot"]] + self.text_ids(p) + [i["eot"], i["soi"]] for p in prompts]
        return self._pad(cond + [[i["t2i"], i["sot"], i["eot"], i["soi"]]] * len(prompts))

    def sample_codes(self, model, prompts, rng, codes=None, masked=None, return_history=False, **kw):
        """MaskGIT codes (B, N) for prompts; `codes`/`masked` fix known codes (inpainting)."""
        b = len(prompts)
        if codes is None:
            codes = np.zeros((b, self.num_tokens), np.int32)
            masked = np.ones((b, self.num_tokens), bool)
        prefix, lengths = self.t2i_prefixes(prompts)
        graphdef, params = nnx.split(model)
        out, history = _sample_codes(graphdef, params, prefix, lengths, jnp.asarray(codes, jnp.int32),
                                     jnp.asarray(masked, bool), rng, st=self._static(**kw))
        return (out, history) if return_history else out

    def tokenize(self, model, images) -> np.ndarray:
        return np.asarray(_tokenize(*nnx.split(model.image_tokenizer), jnp.asarray(images, jnp.uint8)))

    def detokenize(self, model, codes) -> np.ndarray:
        return np.asarray(_detokenize(*nnx.split(model.image_tokenizer), jnp.asarray(codes, jnp.int32)))

    def generate_images(self, model, prompts, rng, **kw) -> np.ndarray:
        return self.detokenize(model, self.sample_codes(model, prompts, rng, **kw))

    def inpaint(self, model, prompts, images, region, rng, **kw) -> np.ndarray:
        """Regenerate only `region` of each image: a boolean token grid (B, g, g) or
        pixel mask (B, H, W) (a token is regenerated if any of its pixels is in it)."""
        region = np.asarray(region, bool)
        g = self.ts.grid
        if region.shape[1:] != (g, g):
            f = self.ts.downsample
            region = region.reshape(len(region), g, f, g, f).any(axis=(2, 4))
        codes = self.tokenize(model, images)
        out = self.sample_codes(model, prompts, rng, codes=codes, masked=region.reshape(len(region), -1), **kw)
        return self.detokenize(model, out)

    def _understand(self, model, images, prompts: Sequence[Sequence[int]], rng) -> list[str]:
        """Decode text after [MMU] [SOI] image [EOI] [SOT] prompt, until [EOT]."""
        i, N, s = self.ids, self.num_tokens, self.s
        codes = self.tokenize(model, images) + self.code_start
        seqs = [[i["mmu"], i["soi"]] + list(c) + [i["eoi"], i["sot"]] + list(p) for c, p in zip(codes, prompts)]
        tokens, lengths = self._pad(seqs)
        span = np.zeros(tokens.shape, np.int32)
        span[:, 2:2 + N] = 1
        graphdef, params = nnx.split(model)
        logits, cache = _prefill(graphdef, params, tokens, lengths, span, cache_len=tokens.shape[1] + s.max_new_tokens)
        out, _, _ = _decode_text(graphdef, params, cache, logits, lengths, rng, max_new=s.max_new_tokens,
                                 stop_ids=(i["eot"],), pad_id=self.pad_id, temperature=s.temperature)
        return [self.tok.decode([t for t in row if t < self.text_vocab]) for row in np.asarray(out)]

    def caption_images(self, model, images, rng) -> list[str]:
        return self._understand(model, images, [[]] * len(images), rng)

    def answer_questions(self, model, images, questions, rng) -> list[str]:
        return self._understand(model, images, [self.tok.encode(q) for q in questions], rng)


OBJECTIVE = Showo
