"""Transfusion (Zhou et al., 2024): one transformer, next-token prediction on text
and DDPM noise prediction on images, causal attention with bidirectional image spans.

Documents (each its own segment of a row):

    caption-first:  BOS text... BOI patch x P EOI EOS
    image-first:    BOS BOI patch x P EOI text... EOS
    text only:      BOS text... EOS          (on the scenes: prose about a scene)

The streams mix in proportion (1 - text_ratio) * caption_first_ratio,
(1 - text_ratio) * (1 - caption_first_ratio) and text_ratio; the paper's half
text and half image-caption data is text_ratio 0.5. With `pack_length` > 0,
documents are packed into rows of that many tokens (at most `pack_images`
images a row), as the paper packs 4,096-token sequences; else a row is one
document.

Loss = L_LM + lambda * L_DDPM: cross-entropy on text targets (text, BOI, EOS),
and eps-prediction MSE with a cosine schedule over T steps, t uniform; image-first
pairs have their noise capped (t < noise_cap) with probability noise_cap_prob.
Captions of caption-first pairs are dropped with probability cond_dropout, for
classifier-free guidance.

Sampling: the text prefix runs once into a KV cache (the shared prefill); each
solver step (`unimm.nn.sampling`, DDPM or DDIM) runs only the image tokens
against it read-only, conditional and unconditional rows batched and guided in
the `cfg` convention. Interleaved generation (`generate`) decodes text until
BOI, draws the image there, appends it and EOI and goes on, for any number of
images (`unimm.nn.interleaved`). With transfusion.self_cond the image path also
reads the previous step's x0 estimate (trained on half the steps with the
model's own estimate, else zeros).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm.data import prose
from unimm.nn import decoding, guidance, interleaved, pixels, sampling, spans
from unimm.nn import diffusion as diff
from unimm.nn import flops as flops_lib
from unimm.nn.attention import KVCache, Meta
from unimm.nn.autoencoder import KLAutoencoder
from unimm.nn.diffusion_lm import DiffusionLM
from unimm.nn.image_io import make_image_io
from unimm.nn.losses import cross_entropy
from unimm.nn.transformer import DecoderConfig
from unimm.objectives.base import ArraySpec, Packing, SequenceObjective, Stream, pretrained_part
from unimm.objectives.settings import from_config, setting
from unimm.tokenizers import text as text_tok

KINDS = ("caption_first", "image_first", "text")


@dataclasses.dataclass(frozen=True)
class Settings:
    """config.image, config.transfusion and config.sampling: their defaults (the paper's) and checks."""

    resolution: int = setting(32, "image")  # pixels
    channels: int = setting(3, "image")
    patch_size: int = setting(4, "image")  # on the model's image space: pixels or latents
    io: str = setting("linear", "image")
    unet_channels: tuple = setting((32, 64, 128), "image")
    unet_blocks: int = setting(1, "image")
    unet_skips: bool = setting(False, "image")
    unet_skip_max_t: int = setting(0, "image")  # > 0: skips only at timesteps below this
    unet_token_skip: bool = setting(False, "image")  # with unet_skips, also a skip at the token resolution
    unet_mid_blocks: int = setting(0, "image")  # conv ResBlocks at the token resolution, ahead of the transformer
    unet_global_cond: bool = setting(False, "image")  # condition the up path on the transformer's mean image output
    pos_embedding: str = setting("normal", "image")  # patch positions: normal | sincos
    rope: str = setting("1d", "image")  # RoPE over image patches: 1d (sequence order, the paper) | 2d (row, column)
    timestep_cond: str = setting("add", "image")  # add (the paper) | adaln (also DiT's adaLN in every block)
    refine_channels: int = setting(0, "image")  # linear io: width of the conv refinement of its output (0: none)
    refine_blocks: int = setting(0, "image")  # linear io: 0: a conv pair on the prediction; > 0: ResBlocks
    latent: str = setting("pixels", "image")  # pixels | kl_vae (the autoencoder comes from image.autoencoder)
    latent_scale: float = setting(0.0, "image")  # multiplies latents; 0: 1/std as the autoencoder run measured
    latent_max: float = setting(0.0, "image")  # largest |latent| (unscaled); 0: as the autoencoder run measured
    diffusion_weight: float = setting(5.0, "transfusion")
    prediction: str = setting("eps", "transfusion")  # what the model outputs: eps (the paper) | v | x0
    loss_weighting: str = setting("none", "transfusion")  # none (the paper) | min_snr
    min_snr_gamma: float = setting(5.0, "transfusion")
    num_timesteps: int = setting(1000, "transfusion")
    schedule: str = setting("cosine", "transfusion")
    timestep_sampling: str = setting("uniform", "transfusion")  # uniform (the paper) | logit_normal
    timestep_mean: float = setting(0.0, "transfusion")  # logit_normal: > 0 favours high noise
    timestep_std: float = setting(1.0, "transfusion")
    caption_first_ratio: float = setting(0.8, "transfusion")
    text_ratio: float = setting(0.5, "transfusion")  # share of text-only documents (the paper: half the data)
    noise_cap: int = setting(500, "transfusion")
    noise_cap_prob: float = setting(0.8, "transfusion")
    cond_dropout: float = setting(0.1, "transfusion")
    caption_cond: bool = setting(False, "transfusion")  # also add pooled caption embeddings to the timestep cond
    caption_embedding: str = setting("shared", "transfusion")  # caption_cond pools: shared (LM table) | own
    self_cond: bool = setting(False, "transfusion")  # the image path also reads its previous estimate of x0
    max_text_len: int = setting(24, "transfusion")  # tokens of a caption
    pack_length: int = setting(0, "transfusion")  # > 0: pack documents into rows of this many tokens
    pack_images: int = setting(4, "transfusion")  # with packing: at most this many images a row
    z_loss: float = setting(0.0, "transfusion")
    sampler: str = setting("ddim", "sampling")  # ddpm | ddim
    sample_steps: int = setting(50, "sampling")
    timestep_spacing: str = setting("leading", "sampling")  # leading (DDIM's; avoids t = T-1) | linspace
    cfg_scale: float = setting(3.0, "sampling")  # the cfg convention: 1 is the conditional prediction
    ddim_eta: float = setting(0.0, "sampling")
    clip_x0: bool = setting(True, "sampling")  # bound each step's x0 estimate by the data's range
    max_new_tokens: int = setting(24, "sampling")
    max_images: int = setting(1, "sampling")  # images per sequence in interleaved generation
    temperature: float = setting(0.0, "sampling")
    autoencoder_channels: tuple = setting((32, 64))  # derived from image.autoencoder
    latent_channels: int = setting(4)
    autoencoder_blocks: int = setting(1)

    def __post_init__(self):
        if self.latent not in ("pixels", "kl_vae"):
            raise ValueError(f"image.latent={self.latent!r}; choose 'pixels' or 'kl_vae'")
        if self.latent_resolution * self.downsample != self.resolution:
            raise ValueError(f"image.resolution={self.resolution} is not divisible by the autoencoder's "
                             f"downsampling factor {self.downsample}")
        if self.latent_resolution % self.patch_size:
            raise ValueError(f"the model's image side {self.latent_resolution} is not divisible by "
                             f"image.patch_size={self.patch_size}")
        for name in ("caption_first_ratio", "text_ratio", "noise_cap_prob", "cond_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"transfusion.{name}={getattr(self, name)} must be in [0, 1]")
        if not 0 < self.noise_cap <= self.num_timesteps:
            raise ValueError(f"transfusion.noise_cap must be in 1..{self.num_timesteps}")
        diff.alphas_cumprod(self.schedule, 2)
        if self.prediction not in diff.PREDICTIONS:
            raise ValueError(f"transfusion.prediction={self.prediction!r}; choose from {diff.PREDICTIONS}")
        diff.loss_weight(self.loss_weighting, self.prediction, jnp.array([0.5]))
        if self.sampler not in sampling.DIFFUSION_SOLVERS:
            raise ValueError(f"sampling.sampler={self.sampler!r}; Transfusion samples with {sampling.DIFFUSION_SOLVERS}")
        if self.unet_mid_blocks < 0:
            raise ValueError(f"image.unet_mid_blocks={self.unet_mid_blocks}; it counts ResBlocks: 0 or more")
        unet_only = [k for k in ("unet_skips", "unet_skip_max_t", "unet_global_cond", "unet_token_skip",
                                 "unet_mid_blocks") if getattr(self, k)]
        if unet_only and self.io != "unet":
            raise ValueError(f"image.{', image.'.join(unet_only)} set, but U-Net settings apply only to "
                             f"image.io='unet' (it is {self.io!r}); set image.io='unet' or drop them")
        if self.caption_embedding not in ("shared", "own"):
            raise ValueError(f"transfusion.caption_embedding={self.caption_embedding!r}; choose 'shared' or 'own'")
        if self.rope not in ("1d", "2d"):
            raise ValueError(f"image.rope={self.rope!r}; choose '1d' or '2d'")
        if self.timestep_cond not in ("add", "adaln"):
            raise ValueError(f"image.timestep_cond={self.timestep_cond!r}; choose 'add' or 'adaln'")
        if self.refine_blocks and not self.refine_channels:
            raise ValueError("image.refine_blocks > 0 needs image.refine_channels > 0 (their width)")
        if self.timestep_sampling not in diff.TIMESTEP_SAMPLINGS:
            raise ValueError(f"unknown timestep sampling {self.timestep_sampling!r}; choose from "
                             f"{diff.TIMESTEP_SAMPLINGS}")
        diff.sampling_timesteps(self.num_timesteps, self.sample_steps, self.timestep_spacing)
        if self.max_text_len < 1 or self.max_images < 0:
            raise ValueError("transfusion.max_text_len must be >= 1 and sampling.max_images >= 0")
        if self.pack_length and (self.pack_length < self.pair_length or self.pack_images < 1):
            raise ValueError(f"transfusion.pack_length={self.pack_length} must hold a whole caption-image pair "
                             f"({self.pair_length} tokens) and pack_images >= 1; 0 turns packing off")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.autoencoder_channels) - 1) if self.latent == "kl_vae" else 1

    @property
    def latent_resolution(self) -> int:
        return self.resolution // self.downsample

    @property
    def num_patches(self) -> int:
        return (self.latent_resolution // self.patch_size) ** 2

    @property
    def pair_length(self) -> int:
        return self.max_text_len + self.num_patches + 4  # BOS BOI EOI EOS

    @property
    def row_length(self) -> int:
        return self.pack_length or self.pair_length

    @property
    def row_images(self) -> int:
        return self.pack_images if self.pack_length else 1

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        return (self.resolution, self.resolution, self.channels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The shape diffusion works on: pixels, or autoencoder latents."""
        if self.latent == "kl_vae":
            return (self.latent_resolution, self.latent_resolution, self.latent_channels)
        return self.pixel_shape


def settings_from_config(config) -> Settings:
    derived = {}
    if config.image.get("latent", "pixels") == "kl_vae":
        ae = config.image.get("autoencoder")
        if ae is None or "autoencoder" not in ae:
            raise ValueError("image.latent='kl_vae' needs image.autoencoder: the config of the kl_vae run whose "
                             "latent space to use (see unimm/configs/kl_vae.py)")
        if ae.image.resolution != config.image.get("resolution", Settings.resolution):
            raise ValueError(f"image.autoencoder.image.resolution={ae.image.resolution} differs from "
                             f"image.resolution={config.image.get('resolution')}")
        derived = dict(autoencoder_channels=tuple(ae.autoencoder.channels),
                       latent_channels=ae.autoencoder.latent_channels, autoencoder_blocks=ae.autoencoder.blocks)
    return from_config(Settings, config, skip=("autoencoder",), **derived)


# ---------------------------------------------------------------------------
# Sampling (pure functions of the split model, jitted once per shape)


@dataclasses.dataclass(frozen=True)
class _Draw:
    """What sampling needs besides the model (static under jit): the solver, the
    guidance scale, what the model predicts and the noise schedule."""

    solver: object
    scale: float
    prediction: str
    schedule: str
    num_timesteps: int


def guided_predict(model: DiffusionLM, cache: KVCache, start, captions, d: _Draw):
    """The sampler's prediction function for B images over a cache of 2B prefixes
    (B conditional rows, then their B unconditional ones), each image starting at
    `start` (2B,); `captions` (2B, Lc) are the rows' caption ids for caption_cond
    (-1 padded). predict(x (B, ...), t, x0_sc) -> (guided eps, x0_sc): with
    self_cond each row carries its own last estimate of x0 (2B, ...)."""
    b = start.shape[0] // 2
    extra = model.caption_features(captions)
    meta = spans.span_meta(start, model.num_patches, jnp.ones(start.shape, bool))
    acp = jnp.asarray(diff.alphas_cumprod(d.schedule, d.num_timesteps))

    def predict(x, t, x0_sc):
        xx = guidance.double(x)
        out = model.denoise(xx, jnp.full((2 * b,), t, jnp.int32), meta, cache, extra, x0_sc)
        both = diff.eps_from_prediction(d.prediction, out, xx, acp[t])
        if model.self_cond:
            x0_sc = diff.x0_from_eps(xx, both, acp[t], d.solver.clip)
        return guidance.combine(both, d.scale, "cfg"), x0_sc

    return predict


def _guided_images(model: DiffusionLM, cache: KVCache, start, captions, rng, d: _Draw):
    """Draw B images (x0 in model space) over a cache of 2B prefixes (see guided_predict)."""
    b = start.shape[0] // 2
    rng, sub = jax.random.split(rng)
    x = jax.random.normal(sub, (b,) + model.image_shape, jnp.float32)
    # Without self_cond the carried estimate is None: nothing extra in the loop.
    x0_sc = jnp.zeros((2 * b,) + model.image_shape, jnp.float32) if model.self_cond else None
    return sampling.sample(d.solver, guided_predict(model, cache, start, captions, d), x, rng, x0_sc)[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "d"))
def _sample_images(graphdef, params, prefix, lengths, captions, rng, *, d: _Draw):
    """prefix (2B, Lp): B conditional prompts then B unconditional ones, each ending in BOI."""
    model = nnx.merge(graphdef, params)
    cache = model.decoder.init_cache(prefix.shape[0], prefix.shape[1])
    _, cache = decoding.prefill(type(model).text, model, cache, prefix, lengths)
    return _guided_images(model, cache, lengths, captions, rng, d)


@functools.partial(jax.jit, static_argnames=("graphdef", "d", "boi", "eoi"))
def _draw_in_context(graphdef, params, cache, uncond, boi_position, active, captions, rng, *, d: _Draw, boi, eoi):
    """Feed BOI at `boi_position` (B,) of the active rows, draw an image there
    (guided against the unconditional prefixes `uncond`), append it and EOI.
    Returns (x0, logits after EOI, cache, the position after EOI)."""
    model = nnx.merge(graphdef, params)
    step = type(model).text
    _, cache = decoding.feed(step, model, cache, jnp.full_like(boi_position, boi), boi_position, active)
    start = boi_position + 1
    x0 = _guided_images(model, cache.stack_rows(uncond), jnp.concatenate([start, uncond.end]),
                        jnp.concatenate([captions, jnp.full_like(captions, -1)]), rng, d)
    cache = model.append_image(x0, spans.span_meta(start, model.num_patches, active), cache,
                               model.caption_features(captions))
    end = start + model.num_patches
    logits, cache = decoding.feed(step, model, cache, jnp.full_like(end, eoi), end, active)
    return x0, logits, cache, end + 1


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill_with_images(graphdef, params, tokens, span, images, image_start, *, cache_len):
    """Prefill prompts (B, T) that hold one clean image each (model space, at `image_start`)."""
    model = nnx.merge(graphdef, params)
    b = tokens.shape[0]
    t0, valid = jnp.zeros((b, 1), jnp.int32), jnp.ones((b, 1), bool)

    def step(m, tok, meta, cache):
        logits, _, cache = m(tok, meta, images[:, None], t0, image_start[:, None], valid, cache, update_cache=True)
        return logits, cache

    lengths = jnp.full((b,), tokens.shape[1], jnp.int32)
    return decoding.prefill(step, model, model.decoder.init_cache(b, cache_len), tokens, lengths, span)


def _image_io_forward(io, x, t):
    tokens, context = io.encode(x, t)
    return io.decode(tokens, t, context)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode_latents(graphdef, params, z):
    return nnx.merge(graphdef, params).decode(z)


@functools.partial(jax.jit, static_argnames=("objective", "graphdef"))
def _to_model_space(params, images, *, objective, graphdef):
    return objective.to_model_space(images, nnx.merge(graphdef, params))


# ---------------------------------------------------------------------------
# The objective


class Transfusion(SequenceObjective):
    name = "transfusion"
    max_text_setting = "transfusion.max_text_len"

    def __init__(self, config, shapes_only: bool = False):
        super().__init__(config, shapes_only)
        self.s = settings_from_config(config)
        self.dcfg = DecoderConfig.from_config(config.model)
        if self.s.timestep_cond == "adaln":
            self.dcfg = dataclasses.replace(self.dcfg, cond_dim=self.dcfg.d_model)
        self.tok = None if shapes_only else text_tok.load_checked(config.tokenizer)
        v = config.tokenizer.vocab_size if shapes_only else self.tok.vocab_size
        self.boi, self.eoi = v, v + 1
        self.vocab_size = v + 2
        self.tok_ids = (text_tok.BOS, text_tok.EOS) if shapes_only else (self.tok.bos_id, self.tok.eos_id)
        self.acp = diff.alphas_cumprod(self.s.schedule, self.s.num_timesteps)

    @property
    def resolution(self) -> int:
        return self.s.resolution

    # -- model -----------------------------------------------------------------
    def make_model(self, rngs: nnx.Rngs) -> DiffusionLM:
        s, dtype = self.s, self.dcfg.compute_dtype
        image_io = make_image_io(s.io, s.image_shape, s.patch_size, self.dcfg.d_model, rngs=rngs, dtype=dtype,
                                 channels=s.unet_channels, blocks=s.unet_blocks, skips=s.unet_skips,
                                 pos_embedding=s.pos_embedding, refine_channels=s.refine_channels,
                                 refine_blocks=s.refine_blocks, skip_max_t=s.unet_skip_max_t,
                                 global_cond=s.unet_global_cond, adaptive_out=s.timestep_cond == "adaln",
                                 in_channels=s.image_shape[-1] * (2 if s.self_cond else 1),
                                 token_skip=s.unet_token_skip, mid_blocks=s.unet_mid_blocks)
        # A frozen image autoencoder (loaded from its own run) when diffusing in latent space.
        autoencoder = (KLAutoencoder(s.autoencoder_channels, s.latent_channels, rngs=rngs, image_channels=s.channels,
                                     blocks=s.autoencoder_blocks) if s.latent == "kl_vae" else None)
        return DiffusionLM(self.dcfg, self.vocab_size, image_io, num_patches=s.num_patches, image_shape=s.image_shape,
                           rngs=rngs, self_cond=s.self_cond, caption_cond=s.caption_cond,
                           caption_table=s.caption_embedding == "own",
                           rope_width=s.latent_resolution // s.patch_size if s.rope == "2d" else 0,
                           autoencoder=autoencoder)

    def pretrained(self, workdir):
        """The frozen autoencoder, from image.autoencoder (its run's workdir, default <workdir>/autoencoder)."""
        return [pretrained_part("autoencoder", self.config.image.autoencoder, workdir)] if self.s.latent == "kl_vae" \
            else []

    def loaded(self, dep) -> None:
        """Read the latent scale and range the autoencoder run measured, unless the config sets them."""
        if dep.key != "autoencoder" or (self.s.latent_scale and self.s.latent_max):
            return
        records = pathlib.Path(dep.workdir) / "eval.jsonl" if dep.loader is None else None
        last = json.loads(records.read_text().splitlines()[-1]) if records and records.exists() else {}
        measured = {k: last.get(k) for k in ("latent_scale", "latent_max")}
        updates = {k: float(v) for k, v in measured.items() if v is not None and not getattr(self.s, k)}
        missing = [k for k in measured if not getattr(self.s, k) and k not in updates]
        if "latent_scale" in missing:
            raise ValueError(f"image.latent_scale=0 means 'measured by the autoencoder run', but {dep.workdir} has "
                             f"no evaluation with latent_scale; set image.latent_scale or evaluate that run")
        self.s = dataclasses.replace(self.s, **updates)

    def frozen(self) -> tuple[str, ...]:
        return ("^autoencoder/",) if self.s.latent == "kl_vae" else ()

    # -- data ------------------------------------------------------------------
    def example_spec(self) -> dict[str, ArraySpec]:
        L, k = self.s.row_length, self.s.row_images
        seq = lambda dt: ArraySpec((L,), dt, ("batch", "length"))
        per_image = lambda dt: ArraySpec((k,), dt, ("batch", None))
        return {
            "tokens": seq(np.int32), "segment": seq(np.int32), "span": seq(np.int32),
            "position": seq(np.int32), "lm_weight": seq(np.float32),
            "images": ArraySpec((k,) + self.s.pixel_shape, np.uint8, ("batch", None, None, None, None)),
            "image_start": per_image(np.int32), "image_valid": per_image(np.bool_),
            "noise_cap": per_image(np.bool_),
            # Each image's caption (caption-first pairs only; -1 padded), for caption_cond.
            "caption_ids": ArraySpec((k, self.s.max_text_len), np.int32, ("batch", None, None)),
        }

    def streams(self) -> list[Stream]:
        s = self.s
        weights = {"caption_first": (1 - s.text_ratio) * s.caption_first_ratio,
                   "image_first": (1 - s.text_ratio) * (1 - s.caption_first_ratio), "text": s.text_ratio}
        return [Stream(kind, w, functools.partial(self.encode, kind=kind)) for kind, w in weights.items() if w > 0]

    def packing(self) -> Optional[Packing]:
        if not self.s.pack_length:
            return None
        doc = {k: v for k, v in self.example_spec().items() if k not in ("segment", "position", "image_valid")}
        return Packing({k: v.shape[0] for k, v in doc.items()}, self.finish_packed)

    def encode(self, examples: list[dict], rng: np.random.Generator, kind: str = "caption_first"):
        """A stream example: one document (packing) or the row holding it."""
        doc = self.document(examples[0], rng, kind)
        return doc if self.s.pack_length else self.row([doc])

    def document(self, example: dict, rng: np.random.Generator, kind: str) -> dict[str, np.ndarray]:
        """One document of a scene example: a caption-image pair either way round, or prose about it."""
        if kind == "text":
            limit = self.s.row_length - 2  # BOS, EOS
            text = prose.document(example, rng, lambda t: len(self.tok.encode(t)) <= limit)
            return self.layout(self.text_ids(text, limit), None, kind)
        text = self.text_ids(example["caption"])
        if kind == "caption_first" and rng.random() < self.s.cond_dropout:
            text = []
        capped = kind == "image_first" and rng.random() < self.s.noise_cap_prob
        return self.layout(text, example["image"], kind, capped)

    def layout(self, text: Sequence[int], image, kind: str, capped: bool = False) -> dict[str, np.ndarray]:
        """The arrays of one document (each array's leading axis is its length)."""
        if kind not in KINDS:
            raise ValueError(f"unknown Transfusion document kind {kind!r}; choose from {KINDS}")
        P, (bos, eos) = self.s.num_patches, self.tok_ids
        text = list(text)
        image_part = [self.boi] + [0] * P + [self.eoi] if image is not None else []
        body = text + image_part if kind == "caption_first" else image_part + text
        seq = np.array([bos] + body + [eos], np.int32)
        span = np.zeros(len(seq), np.int32)
        m = 0 if image is None else 1
        start = 2 + (len(text) if kind == "caption_first" else 0)
        span[start:start + P * m] = 1
        # LM targets: text, BOI and EOS (not BOS, not patches, not EOI, which always follows them).
        lm_weight = ((span == 0) & (seq != bos) & (seq != self.eoi)).astype(np.float32)
        captions = np.full((m, self.s.max_text_len), -1, np.int32)
        if m and kind == "caption_first":  # an image-first caption comes after its image: it must not condition it
            captions[0, :len(text)] = text
        pixels_shape = (m,) + self.s.pixel_shape
        return {"tokens": seq, "span": span, "lm_weight": lm_weight,
                "images": np.asarray(image, np.uint8).reshape(pixels_shape) if m else np.zeros(pixels_shape, np.uint8),
                "image_start": np.full((m,), start, np.int32), "noise_cap": np.full((m,), capped, bool),
                "caption_ids": captions}

    def row(self, docs: Sequence[dict]) -> dict[str, np.ndarray]:
        """Documents laid end to end in one row, each its own segment (no packing search)."""
        out = {name: np.zeros(a.shape, a.dtype) for name, a in self.example_spec().items()}
        out["caption_ids"][:] = -1
        cur, j = 0, 0
        for d, doc in enumerate(docs):
            n, m = len(doc["tokens"]), len(doc["images"])
            if cur + n > self.s.row_length or j + m > self.s.row_images:
                raise ValueError(f"documents of {cur + n} tokens / {j + m} images exceed a row "
                                 f"({self.s.row_length} tokens, {self.s.row_images} images)")
            sl = slice(cur, cur + n)
            out["tokens"][sl], out["span"][sl], out["lm_weight"][sl] = doc["tokens"], doc["span"], doc["lm_weight"]
            out["segment"][sl], out["position"][sl] = d + 1, np.arange(n)
            for name in ("images", "noise_cap", "caption_ids"):
                out[name][j:j + m] = doc[name]
            out["image_start"][j:j + m] = doc["image_start"] + cur
            out["image_valid"][j:j + m] = True
            cur, j = cur + n, j + m
        return out

    def finish_packed(self, packed: dict) -> dict[str, np.ndarray]:
        """A row grain packed -> this recipe's layout: segments and positions from
        the packer, image starts shifted by their document's offset in the row."""
        out = {k: packed[k] for k in ("tokens", "span", "lm_weight", "images", "noise_cap", "caption_ids")}
        seg = packed["tokens_segment_ids"]
        out["segment"], out["position"] = seg, packed["tokens_positions"]
        image_seg = packed["images_segment_ids"]
        first = {int(d): int(np.argmax(seg == d)) for d in np.unique(image_seg[image_seg > 0])}
        offsets = np.array([first.get(int(d), 0) for d in image_seg], np.int32)
        out["image_start"] = np.where(image_seg > 0, packed["image_start"] + offsets, 0).astype(np.int32)
        out["image_valid"] = image_seg > 0
        out["caption_ids"] = np.where(image_seg[:, None] > 0, out["caption_ids"], -1).astype(np.int32)
        return out

    def synthetic_batch(self, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Rows of full-length caption-first pairs of random text and images, for
        benchmarks (every caption max_text_len tokens: no padding inside a document)."""
        import grain

        from unimm.data.pipeline import pack

        rng = np.random.default_rng(seed)
        doc = lambda: self.layout(rng.integers(4, self.boi, self.s.max_text_len),
                                  rng.integers(0, 256, self.s.pixel_shape, dtype=np.uint8), "caption_first")
        if not self.s.pack_length:
            rows = [self.row([doc()]) for _ in range(batch_size)]
        else:
            per_row = min(self.s.pack_length // self.s.pair_length, self.s.pack_images)
            docs = grain.MapDataset.source([doc() for _ in range(batch_size * per_row)]).to_iter_dataset()
            rows = list(pack(docs, self.packing()))[:batch_size]
        return {name: np.stack([r[name] for r in rows]) for name in rows[0]}

    # -- training --------------------------------------------------------------
    def to_model_space(self, images: jax.Array, model: Optional[DiffusionLM] = None) -> jax.Array:
        """uint8 pixels (..., H, W, C) -> what diffusion works on: pixels in [-1, 1],
        or scaled latents of the frozen autoencoder."""
        x = pixels.to_signed(images)
        if self.s.latent == "pixels":
            return x
        lead = x.shape[:-3]
        z = model.autoencoder.encode(x.reshape((-1,) + x.shape[-3:]))[0]
        return jax.lax.stop_gradient(z * self.s.latent_scale).reshape(lead + z.shape[1:])

    def draw_noise(self, rng, batch):
        """Each image slot's timestep (B, k) (capped where noise_cap) and noise (B, k, ...)."""
        s = self.s
        b, k = batch["image_valid"].shape
        r_t, r_cap, r_eps = jax.random.split(rng, 3)
        t = diff.sample_timesteps(r_t, (b, k), s.num_timesteps, s.timestep_sampling, s.timestep_mean,
                                  s.timestep_std)
        t = jnp.where(batch["noise_cap"], jax.random.randint(r_cap, (b, k), 0, s.noise_cap), t)
        return t, jax.random.normal(r_eps, (b, k) + s.image_shape, jnp.float32)

    def forward(self, model: DiffusionLM, batch, t, eps, rng):
        """The model on a batch with its images noised to t by eps: (text logits
        (B, L, V), each image's weighted diffusion loss (B, k))."""
        s = self.s
        x0 = self.to_model_space(batch["images"], model)
        x_t = diff.q_sample(x0, t, eps, jnp.asarray(self.acp))
        meta = Meta(batch["segment"], batch["span"], batch["position"])
        call = functools.partial(model, batch["tokens"], meta, x_t, t, batch["image_start"], batch["image_valid"],
                                 caption_ids=batch["caption_ids"])
        x0_sc = self._self_cond_estimate(call, x_t, t, rng) if s.self_cond else None
        logits, pred, _ = call(x0_sc=x0_sc)
        acp_t = jnp.asarray(self.acp)[t]
        target = diff.prediction_target(s.prediction, x0, eps, acp_t)
        per_image = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=(2, 3, 4))
        return logits, per_image * diff.loss_weight(s.loss_weighting, s.prediction, acp_t, s.min_snr_gamma)

    def loss(self, model: DiffusionLM, batch, rng):
        s = self.s
        t, eps = self.draw_noise(rng, batch)
        logits, per_image = self.forward(model, batch, t, eps, jax.random.fold_in(rng, 1))
        lm_loss, lm_metrics = cross_entropy(logits[:, :-1], batch["tokens"][:, 1:], batch["lm_weight"][:, 1:],
                                            s.z_loss)
        valid = batch["image_valid"].astype(jnp.float32)
        diffusion_loss = (per_image * valid).sum() / jnp.maximum(valid.sum(), 1.0)
        loss = lm_loss + s.diffusion_weight * diffusion_loss
        return loss, {"lm_loss": lm_metrics["ce"], "lm_accuracy": lm_metrics["accuracy"],
                      "diffusion_loss": diffusion_loss}

    def _self_cond_estimate(self, call, x_t, t, rng):
        """Self-conditioning (Chen et al., 2022, Analog Bits): on half the steps (one coin
        per batch, so the extra forward pass runs only then) the model first estimates
        x0 without help, and the trained pass reads that estimate (no gradient through
        it); on the others it reads zeros, as the first sampling step does."""
        s = self.s

        def estimate():
            pred = call(x0_sc=None)[1].astype(jnp.float32)
            acp_t = jnp.asarray(self.acp)[t]
            eps = diff.eps_from_prediction(s.prediction, pred, x_t, acp_t)
            return jax.lax.stop_gradient(diff.x0_from_eps(x_t, eps, acp_t, self.clip_bound if s.clip_x0 else None))

        return jax.lax.cond(jax.random.bernoulli(rng), estimate, lambda: jnp.zeros_like(x_t))

    def images_in(self, batch) -> int:
        return int(np.asarray(batch["image_valid"]).sum())

    @functools.cached_property
    def _image_flops(self) -> tuple[float, float]:
        make = lambda: self.make_model(nnx.Rngs(0))
        h, w, c = self.s.image_shape
        x = jax.ShapeDtypeStruct((1, h, w, c * (2 if self.s.self_cond else 1)), jnp.float32)
        io = flops_lib.module_flops(make, lambda m: m.image_io, _image_io_forward, x,
                                    jax.ShapeDtypeStruct((1,), jnp.int32))
        if self.s.latent == "pixels":
            return io, 0.0
        enc = flops_lib.module_flops(make, lambda m: m.autoencoder, lambda ae, x: ae.encode(x)[0],
                                     jax.ShapeDtypeStruct((1,) + self.s.pixel_shape, jnp.float32))
        return io, enc

    def image_flops(self) -> tuple[float, float]:
        """XLA's forward count of one image through the image in/out layers, and
        through the frozen autoencoder's encoder (latent space only)."""
        return self._image_flops

    # -- sampling --------------------------------------------------------------
    @property
    def clip_bound(self) -> float:
        """The data's range in model space: 1 for pixels, the largest scaled latent in latent space."""
        if self.s.latent == "pixels":
            return 1.0
        if not self.s.latent_max:
            raise ValueError("sampling.clip_x0 in latent space needs the latents' range: set image.latent_max, "
                             "evaluate the autoencoder run (it measures it), or set sampling.clip_x0=False")
        return self.s.latent_max * self.s.latent_scale

    def solver(self, steps: Optional[int] = None):
        s = self.s
        return sampling.make(s.sampler, int(steps or s.sample_steps), schedule=s.schedule,
                             num_timesteps=s.num_timesteps, ddim_eta=s.ddim_eta,
                             clip=self.clip_bound if s.clip_x0 else None, spacing=s.timestep_spacing)

    def _draw(self, cfg_scale=None, steps=None) -> _Draw:
        s = self.s
        return _Draw(self.solver(steps), float(s.cfg_scale if cfg_scale is None else cfg_scale), s.prediction,
                     s.schedule, s.num_timesteps)

    def _pad(self, seqs: Sequence[Sequence[int]]):
        return decoding.pad_rows(seqs, self.tok.pad_id)

    def from_model_space(self, x, model: Optional[DiffusionLM] = None) -> np.ndarray:
        if self.s.latent == "kl_vae":
            x = _decode_latents(*nnx.split(model.autoencoder), x / self.s.latent_scale)
        return np.asarray(pixels.to_uint8(x))

    def _captions(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """caption_ids rows (N, longest), -1 padded."""
        return decoding.pad_rows(ids, -1)[0]

    def generate_images(self, model, prompts, rng, cfg_scale=None, steps=None) -> np.ndarray:
        bos = self.tok.bos_id
        ids = [self.text_ids(p) for p in prompts]
        prefix, lengths = self._pad([[bos] + i + [self.boi] for i in ids] + [[bos, self.boi]] * len(prompts))
        captions = self._captions(ids + [[]] * len(prompts))
        graphdef, params = nnx.split(model)
        x = _sample_images(graphdef, params, prefix, lengths, captions, rng, d=self._draw(cfg_scale, steps))
        return self.from_model_space(x, model)

    def caption_images(self, model, images, rng) -> list[str]:
        s, P = self.s, self.s.num_patches
        b = len(images)
        seq = [self.tok.bos_id, self.boi] + [0] * P + [self.eoi]
        tokens = np.tile(np.array(seq, np.int32), (b, 1))
        span = np.zeros(tokens.shape, np.int32)
        span[:, 2:2 + P] = 1
        graphdef, params = nnx.split(model)
        images = _to_model_space(params, images, objective=self, graphdef=graphdef)
        logits, cache = _prefill_with_images(graphdef, params, tokens, span, images, np.full((b,), 2, np.int32),
                                             cache_len=len(seq) + s.max_new_tokens)
        out, _, _ = decoding.decode_jit(graphdef, params, cache, logits, np.full((b,), len(seq), np.int32), rng,
                                        step=type(model).text, max_new=s.max_new_tokens,
                                        stop_ids=(self.tok.eos_id,), pad_id=self.tok.pad_id,
                                        temperature=s.temperature)
        return [self.tok.decode(row) for row in np.asarray(out)]

    def generate_ids(self, model, prompts: Sequence[str], rng, max_text: Optional[int] = None,
                     max_images: Optional[int] = None) -> list[interleaved.Interleaved]:
        """Interleaved generation: continue each prompt's text; wherever the model
        emits BOI draw an image there, append it and EOI, and go on, up to
        `max_images` images (sampling.max_images) and `max_text` tokens
        (sampling.max_new_tokens) per text segment. Token ids and model-space images."""
        s, P = self.s, self.s.num_patches
        m = max_text or s.max_new_tokens
        k = s.max_images if max_images is None else max_images
        bos, eos, pad = self.tok.bos_id, self.tok.eos_id, self.tok.pad_id
        tokens, lengths = self._pad([[bos] + self.tok.encode(p) for p in prompts])
        cache_len = tokens.shape[1] + (k + 1) * m + k * (P + 2)
        graphdef, params = nnx.split(model)
        step, d = type(model).text, self._draw()
        uncond = decoding.prefill_jit(graphdef, params, *self._pad([[bos, self.boi]] * len(prompts)), step=step,
                                      cache_len=cache_len)[1]

        def prefill(tokens, lengths):
            return decoding.prefill_jit(graphdef, params, tokens, lengths, step=step, cache_len=cache_len)

        def decode(cache, logits, start, active, r, stop_ids):
            return decoding.decode_jit(graphdef, params, cache, logits, start, r, active, step=step, max_new=m,
                                       stop_ids=tuple(stop_ids), pad_id=pad, temperature=s.temperature)

        def draw(cache, position, active, context, r):
            captions = np.where((context == bos) | (context >= self.tok.vocab_size), -1, context)
            return _draw_in_context(graphdef, params, cache, uncond, position, active, captions, r, d=d, boi=self.boi,
                                    eoi=self.eoi)

        return interleaved.generate(prefill, decode, draw, tokens, lengths, rng, image_token=self.boi,
                                    end_token=eos, max_images=k)

    def generate(self, model, prompts: Sequence[str], rng, max_text: Optional[int] = None,
                 max_images: Optional[int] = None) -> list[list[tuple[str, object]]]:
        """`generate_ids`, readable: per prompt its parts in order, ("text", str) and ("image", uint8 (H, W, C))."""
        out = []
        for seq in self.generate_ids(model, prompts, rng, max_text, max_images):
            out.append([(kind, self.tok.decode(v) if kind == "text" else self.from_model_space(v[None], model)[0])
                        for kind, v in seq.parts])
        return out


OBJECTIVE = Transfusion
