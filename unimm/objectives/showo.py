"""Show-o (Xie et al., 2024): one transformer over text tokens and discrete image
codes; next-token prediction on text, masked-token prediction on images, and
omni-attention (causal for text, full inside each image).

Vocabulary: text ids [0, V), image codes [V, V + K), then [T2I] [MMU] [SOI]
[EOI] [SOT] [EOT] [MASK]. One example per row (right-padded):

    t2i (generation):     [T2I] [SOT] text [EOT] [SOI] code x N [EOI]
    mmu (understanding):  [MMU] [SOI] code x N [EOI] [SOT] question answer [EOT]
    lm (text only):       [SOT] text [EOT]

[SOI] code x N [EOI] is one bidirectional span, as in the reference's
omni-attention mask. The frozen image tokenizer (its own run,
configs/vq_tiny.py) turns images into codes inside the training step. t2i rows
mask a cosine-scheduled fraction of their codes ([MASK]) and are trained to
predict them (L_MTP over code logits, averaged over the masked codes); mmu rows
train next-token prediction on their answer (or caption) and lm rows on their
text, each stream's loss averaged over its own targets. Loss = w_t2i L_MTP +
w_mmu L_mmu + w_lm L_lm (the reference: 1, 1, 0.1). t2i captions are dropped
with probability cond_dropout, for guidance; mmu rows ask POPE existence probes
(half "yes", half "no") with probability probe_prob among their questions.

Sampling (MaskGIT, `unimm.nn.maskgit`): the prompt prefix runs once into a KV
cache (the shared prefill; the image never changes it: text cannot attend to
later tokens); every unmasking step runs only the image span against it,
conditional and unconditional rows batched, guided in the `muse` convention
((1 + s) cond - s uncond). Inpainting unmasks only a region. Understanding
decodes text after the image with the shared decoding loop.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm.nn import decoding, guidance, maskgit, pixels, spans
from unimm.nn import flops as flops_lib
from unimm.nn.attention import KVCache, Meta
from unimm.nn.layers import Embed, Linear
from unimm.nn.losses import cross_entropy, masked_token_loss
from unimm.nn.transformer import Decoder, DecoderConfig
from unimm.objectives.base import ArraySpec, SequenceObjective, Stream, pretrained_part
from unimm.objectives.settings import from_config, setting
from unimm.tokenizers import text as text_tok
from unimm.tokenizers.image import ImageTokenizer, ImageTokenizerSettings

SPECIALS = ("t2i", "mmu", "soi", "eoi", "sot", "eot", "mask")
STREAMS = ("t2i", "mmu", "lm")


@dataclasses.dataclass(frozen=True)
class Settings:
    """config.showo and config.sampling: their defaults (the reference's) and checks."""

    max_text_len: int = setting(24, "showo")  # text tokens of a row (mmu: question + answer)
    t2i_ratio: float = setting(0.5, "showo")  # how often each stream is drawn (grain mixing)
    mmu_ratio: float = setting(0.4, "showo")
    lm_ratio: float = setting(0.1, "showo")
    t2i_loss_weight: float = setting(1.0, "showo")  # each stream's loss is averaged over its own targets
    mmu_loss_weight: float = setting(1.0, "showo")
    lm_loss_weight: float = setting(0.1, "showo")
    cond_dropout: float = setting(0.1, "showo")
    qa_prob: float = setting(0.5, "showo")  # mmu rows: a question and its answer, else a caption
    probe_prob: float = setting(0.5, "showo")  # of those questions: a POPE probe, half answered yes, half no
    z_loss: float = setting(0.0, "showo")
    sample_steps: int = setting(16, "sampling")
    guidance_scale: float = setting(1.75, "sampling")  # the muse convention: 0 is the conditional prediction
    sample_temperature: float = setting(1.0, "sampling")  # MaskGIT code sampling (0: greedy)
    confidence_noise: float = setting(1.0, "sampling")  # Gumbel noise on confidences, annealed to 0 (the reference: 1)
    max_new_tokens: int = setting(24, "sampling")
    temperature: float = setting(0.0, "sampling")  # text decoding

    def __post_init__(self):
        ratios = (self.t2i_ratio, self.mmu_ratio, self.lm_ratio)
        if min(ratios) < 0 or sum(ratios) <= 0:
            raise ValueError(f"showo stream ratios {ratios} (t2i, mmu, lm) must be >= 0 and not all 0")
        for name in ("cond_dropout", "qa_prob", "probe_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"showo.{name}={getattr(self, name)} must be in [0, 1]")
        if self.sample_steps < 1:
            raise ValueError(f"sampling.sample_steps={self.sample_steps} must be >= 1")

    @property
    def loss_weights(self) -> tuple[float, float, float]:
        return (self.t2i_loss_weight, self.mmu_loss_weight, self.lm_loss_weight)


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
# Model


class ShowoModel(nnx.Module):
    def __init__(self, dcfg: DecoderConfig, vocab_size: int, tokenizer: ImageTokenizerSettings, *, rngs: nnx.Rngs):
        self.embed = Embed(vocab_size, dcfg.d_model, rngs=rngs, dtype=dcfg.compute_dtype)
        self.decoder = Decoder(dcfg, rngs=rngs)
        self.lm_head = Linear(dcfg.d_model, vocab_size, ("embed", "vocab"), rngs=rngs, dtype=dcfg.compute_dtype,
                              use_bias=dcfg.head_bias)
        self.image_tokenizer = ImageTokenizer(tokenizer, rngs=rngs)  # frozen; loaded from its own run

    def __call__(self, tokens, meta: Meta, cache: Optional[KVCache] = None, update_cache: bool = False):
        h, cache = self.decoder(self.embed(tokens), meta, cache, update_cache)
        return self.lm_head(h).astype(jnp.float32), cache

    def text(self, tokens, meta: Meta, cache: KVCache):
        """The decoding step: append tokens to the cache; logits (B, T, V) at each of them."""
        return self(tokens, meta, cache, update_cache=True)


# ---------------------------------------------------------------------------
# Sampling (pure functions of the split model, jitted once per shape)


@dataclasses.dataclass(frozen=True)
class _SampleStatic:
    num_tokens: int
    code_start: int
    codebook_size: int
    soi: int
    eoi: int
    mask_id: int
    steps: int
    guidance: float
    temperature: float
    confidence_noise: float


def image_block(codes, masked, st: _SampleStatic):
    """The tokens of an image span (R, N + 2): [SOI], each code or [MASK], [EOI]."""
    ids = jnp.where(masked, st.mask_id, codes + st.code_start)
    edge = lambda i: jnp.full(ids.shape[:1] + (1,), i, ids.dtype)
    return jnp.concatenate([edge(st.soi), ids, edge(st.eoi)], axis=1)


def code_logits(model: ShowoModel, codes, masked, start, cache: KVCache, st: _SampleStatic):
    """Code logits (R, N, K) of an image span whose [SOI] sits at `start` (R,), after a cached prefix (read-only)."""
    n = st.num_tokens
    logits, _ = model(image_block(codes, masked, st), spans.span_meta(start, n + 2, jnp.ones(start.shape, bool)),
                      cache, update_cache=False)
    return logits[:, 1:n + 1, st.code_start:st.code_start + st.codebook_size]


def guided_code_logits(model, codes, masked, start, cache, st: _SampleStatic):
    """Guided logits for B images; the cache holds B conditional rows then B
    unconditional ones, whose images start at `start` (2B,)."""
    both = code_logits(model, guidance.double(codes), guidance.double(masked), start, cache, st)
    return guidance.combine(both, st.guidance, "muse")


@functools.partial(jax.jit, static_argnames=("graphdef", "st"))
def _sample_codes(graphdef, params, prefix, lengths, codes, masked, rng, *, st: _SampleStatic):
    """prefix (2B, Lp): B conditional prompts then B unconditional ones, each ending in [EOT]."""
    model = nnx.merge(graphdef, params)
    cache = model.decoder.init_cache(prefix.shape[0], prefix.shape[1])
    _, cache = decoding.prefill(ShowoModel.text, model, cache, prefix, lengths)
    logits_fn = lambda c, m: guided_code_logits(model, c, m, lengths, cache, st)
    return maskgit.unmask(logits_fn, codes, masked, rng, st.steps, st.temperature, st.confidence_noise)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _tokenize(graphdef, params, images):
    return nnx.merge(graphdef, params).tokenize(images)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _detokenize(graphdef, params, codes):
    return pixels.to_uint8(nnx.merge(graphdef, params).detokenize(codes))


# ---------------------------------------------------------------------------
# The objective


class Showo(SequenceObjective):
    name = "showo"
    max_text_setting = "showo.max_text_len"

    def __init__(self, config, shapes_only: bool = False):
        super().__init__(config, shapes_only)
        self.s = from_config(Settings, config)
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

    # -- model -----------------------------------------------------------------
    def make_model(self, rngs: nnx.Rngs) -> ShowoModel:
        return ShowoModel(self.dcfg, self.vocab_size, self.ts, rngs=rngs)

    def pretrained(self, workdir):
        """The frozen image tokenizer, from image_tokenizer (its run's workdir, default <workdir>/image_tokenizer)."""
        return [pretrained_part("image_tokenizer", self.config.image_tokenizer, workdir)]

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
                "position": seq(np.int32), "targets": seq(np.bool_),
                "images": ArraySpec((self.resolution, self.resolution, 3), np.uint8, ("batch", None, None, None)),
                "image_start": row(np.int32), "has_image": row(np.bool_), "stream": row(np.int32)}

    def streams(self) -> list[Stream]:
        s = self.s
        return [Stream(name, ratio, functools.partial(self.encode, stream=name))
                for name, ratio in (("t2i", s.t2i_ratio), ("mmu", s.mmu_ratio), ("lm", s.lm_ratio)) if ratio > 0]

    def question(self, example: dict, rng: np.random.Generator) -> Optional[dict]:
        """An mmu row's question about the example (None: caption it instead): a POPE
        probe with probability probe_prob (yes or no, equally often), else another question."""
        qa = example.get("qa") or []
        if not qa or rng.random() >= self.s.qa_prob:
            return None
        probes = [q for q in qa if q["kind"].startswith("pope")]
        others = [q for q in qa if not q["kind"].startswith("pope")]
        if probes and (not others or rng.random() < self.s.probe_prob):
            answer = "yes" if rng.random() < 0.5 else "no"
            pool = [q for q in probes if q["answer"] == answer] or probes
        else:
            pool = others
        return pool[rng.integers(len(pool))]

    def encode(self, examples: list[dict], rng: np.random.Generator, stream: str) -> dict[str, np.ndarray]:
        ex = examples[0]
        if stream == "t2i":
            text = [] if rng.random() < self.s.cond_dropout else self.text_ids(ex["caption"])
            return self.layout("t2i", ex["image"], text)
        if stream == "mmu":
            q = self.question(ex, rng)
            if q is not None:
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
        out["targets"][targets] = True
        out["stream"] = STREAMS.index(stream)
        if image is not None:
            out["span"][start - 1:start + N + 1] = 1  # [SOI] codes [EOI]
            out["images"] = np.asarray(image, np.uint8)
            out["image_start"] = start
            out["has_image"] = True
        return out

    def synthetic_batch(self, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Full-length t2i rows with random text and images, for benchmarks."""
        rng = np.random.default_rng(seed)
        r = self.resolution
        rows = [self.layout("t2i", rng.integers(0, 256, (r, r, 3), dtype=np.uint8),
                            rng.integers(4, self.text_vocab, self.s.max_text_len)) for _ in range(batch_size)]
        return {name: np.stack([row[name] for row in rows]) for name in rows[0]}

    # -- training --------------------------------------------------------------
    def loss(self, model: ShowoModel, batch, rng):
        b, length = batch["tokens"].shape
        codes = jax.lax.stop_gradient(model.image_tokenizer.tokenize(batch["images"]))
        where = spans.slots(batch["image_start"][:, None], batch["has_image"][:, None], self.num_tokens, length)
        tokens = spans.place(batch["tokens"], where, codes + self.code_start)
        is_t2i = batch["stream"] == STREAMS.index("t2i")
        masked = maskgit.training_mask(rng, b, self.num_tokens) & (is_t2i & batch["has_image"])[:, None]
        inputs = spans.place(tokens, where, jnp.where(masked, self.ids["mask"], codes + self.code_start))
        logits, _ = model(inputs, Meta(batch["segment"], batch["span"], batch["position"]))
        img_logits = spans.gather(logits, where)[..., self.code_start:self.code_start + self.codebook_size]
        loss, metrics = 0.0, {}
        mtp, m = masked_token_loss(img_logits, codes, masked, jnp.ones((b,), jnp.float32))
        loss += self.s.t2i_loss_weight * mtp
        metrics.update(mtp_loss=m["ce"], mtp_accuracy=m["accuracy"])
        targets = batch["targets"][:, 1:]
        for name, weight in (("mmu", self.s.mmu_loss_weight), ("lm", self.s.lm_loss_weight)):
            w = targets & (batch["stream"] == STREAMS.index(name))[:, None]
            ntp, m = cross_entropy(logits[:, :-1], tokens[:, 1:], w, self.s.z_loss)
            loss += weight * ntp
            metrics.update({f"{name}_loss": m["ce"], f"{name}_accuracy": m["accuracy"]})
        return loss, metrics

    def images_in(self, batch) -> int:
        return int(np.asarray(batch["has_image"]).sum())

    @functools.cached_property
    def _image_flops(self) -> tuple[float, float]:
        r = self.resolution
        enc = flops_lib.module_flops(lambda: self.make_model(nnx.Rngs(0)), lambda m: m.image_tokenizer,
                                     lambda tok, x: tok.tokenize(x), jax.ShapeDtypeStruct((1, r, r, 3), jnp.uint8))
        return 0.0, enc

    def image_flops(self) -> tuple[float, float]:
        """The frozen tokenizer's encoder, once per image (forward only)."""
        return self._image_flops

    # -- sampling --------------------------------------------------------------
    def _static(self, guidance=None, steps=None, temperature=None, confidence_noise=None) -> _SampleStatic:
        s, i = self.s, self.ids
        return _SampleStatic(num_tokens=self.num_tokens, code_start=self.code_start,
                             codebook_size=self.codebook_size, soi=i["soi"], eoi=i["eoi"], mask_id=i["mask"],
                             steps=int(steps or s.sample_steps),
                             guidance=float(s.guidance_scale if guidance is None else guidance),
                             temperature=float(s.sample_temperature if temperature is None else temperature),
                             confidence_noise=float(s.confidence_noise if confidence_noise is None
                                                    else confidence_noise))

    def _pad(self, seqs):
        return decoding.pad_rows(seqs, self.pad_id)

    def t2i_prefixes(self, prompts: Sequence[str]):
        """Padded [T2I] [SOT] text [EOT] prefixes: the prompts', then as many unconditional ones."""
        i = self.ids
        cond = [[i["t2i"], i["sot"]] + self.text_ids(p) + [i["eot"]] for p in prompts]
        return self._pad(cond + [[i["t2i"], i["sot"], i["eot"]]] * len(prompts))

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
        span[:, 1:N + 3] = 1  # [SOI] codes [EOI]
        graphdef, params = nnx.split(model)
        logits, cache = decoding.prefill_jit(graphdef, params, tokens, lengths, span, step=ShowoModel.text,
                                             cache_len=tokens.shape[1] + s.max_new_tokens)
        out, _, _ = decoding.decode_jit(graphdef, params, cache, logits, lengths, rng, step=ShowoModel.text,
                                        max_new=s.max_new_tokens, stop_ids=(i["eot"],), pad_id=self.pad_id,
                                        temperature=s.temperature)
        return [self.tok.decode([t for t in row if t < self.text_vocab]) for row in np.asarray(out)]

    def caption_images(self, model, images, rng) -> list[str]:
        return self._understand(model, images, [[]] * len(images), rng)

    def answer_questions(self, model, images, questions, rng) -> list[str]:
        return self._understand(model, images, [self.tok.encode(q) for q in questions], rng)


OBJECTIVE = Showo
