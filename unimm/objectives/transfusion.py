"""Transfusion (Zhou et al., 2024): one transformer, next-token prediction on text
and DDPM noise prediction on images, causal attention with bidirectional image spans.

Sequence layout of one pair (several pairs may share a sequence, each its own
document):

    caption-first:  BOS text... BOI patch x P EOI EOS
    image-first:    BOS BOI patch x P EOI text... EOS

Loss = L_LM + lambda * L_DDPM: cross-entropy on text targets (text, BOI, EOS),
and eps-prediction MSE with a cosine schedule over T steps, t uniform; image-first
pairs have their noise capped (t < noise_cap) with probability noise_cap_prob.
Captions of caption-first pairs are dropped with probability cond_dropout, for
classifier-free guidance.

Sampling: the text prefix is run once into a KV cache; every denoising step runs
only the image tokens against it (read-only), conditional and unconditional rows
batched together; then the clean image and EOI are appended and text continues.
With transfusion.self_cond the image path also reads the previous step's x0
estimate (trained on half the steps with the model's own estimate, else zeros).
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

from unimm.nn import diffusion as diff
from unimm.nn import flops as flops_lib
from unimm.nn.attention import KVCache, Meta
from unimm.nn.autoencoder import KLAutoencoder
from unimm.nn.decoding import decode, pad_rows, prefix_meta
from unimm.nn.image_io import make_image_io
from unimm.nn.layers import Embed, Linear
from unimm.nn.losses import cross_entropy
from unimm.nn.transformer import Cond, Decoder, DecoderConfig
from unimm.objectives.base import ArraySpec, Objective, Pretrained, Stream
from unimm.tokenizers import text as text_tok


@dataclasses.dataclass(frozen=True)
class Settings:
    """config.transfusion, config.image and config.sampling, checked."""

    resolution: int = 32  # pixels
    channels: int = 3
    patch_size: int = 4  # on the model's image space: pixels or latents
    latent: str = "pixels"  # pixels | kl_vae (the autoencoder's settings come from image.autoencoder)
    latent_scale: float = 0.0  # multiplies latents; 0: the 1/std the autoencoder run measured
    autoencoder_channels: tuple = (32, 64)
    latent_channels: int = 4
    autoencoder_blocks: int = 1
    io: str = "linear"
    unet_channels: tuple = (32, 64, 128)
    unet_blocks: int = 1
    unet_skips: bool = False
    unet_skip_max_t: int = 0  # > 0: skips only at timesteps below this (the noisier ones rely on the text)
    unet_token_skip: bool = False  # with unet_skips, also a skip at the token resolution (around the transformer)
    unet_mid_blocks: int = 0  # conv ResBlocks at the token resolution, ahead of the transformer
    unet_global_cond: bool = False  # condition every up-path block on the transformer's mean image output
    pos_embedding: str = "normal"  # patch positions: normal (N(0, 0.02) start) | sincos (2D sin-cos start)
    rope: str = "1d"  # RoPE over image patches: 1d (sequence order, the paper) | 2d (row and column)
    timestep_cond: str = "add"  # add (the paper: added to the patch embeddings) | adaln (also DiT's adaLN in every block)
    refine_channels: int = 0  # linear io: width of the conv refinement of its output (0: none)
    refine_blocks: int = 0  # linear io: 0: a conv pair on the prediction; > 0: ResBlocks on prediction + x_t
    diffusion_weight: float = 5.0
    prediction: str = "eps"  # what the model outputs: eps (the paper) | v
    loss_weighting: str = "none"  # none (the paper) | min_snr
    min_snr_gamma: float = 5.0
    num_timesteps: int = 1000
    schedule: str = "cosine"
    timestep_sampling: str = "uniform"  # uniform (the paper) | logit_normal
    timestep_mean: float = 0.0  # logit_normal: > 0 favours high noise
    timestep_std: float = 1.0
    caption_first_ratio: float = 0.8
    noise_cap: int = 500
    caption_cond: bool = False  # also add pooled caption embeddings to the timestep conditioning (Imagen, SD3)
    caption_embedding: str = "shared"  # caption_cond pools: shared (the LM's token table) | own (a table of its own)
    self_cond: bool = False  # the image path also reads its previous estimate of x0 (Analog Bits' self-conditioning)
    noise_cap_prob: float = 0.8
    cond_dropout: float = 0.1
    max_text_len: int = 24
    pairs_per_sequence: int = 1
    z_loss: float = 0.0
    sampler: str = "ddim"
    sample_steps: int = 50
    cfg_scale: float = 3.0
    ddim_eta: float = 0.0
    clip_x0: bool = True
    max_new_tokens: int = 24
    temperature: float = 0.0

    def __post_init__(self):
        if self.latent not in ("pixels", "kl_vae"):
            raise ValueError(f"image.latent={self.latent!r}; choose 'pixels' or 'kl_vae'")
        if self.latent_resolution * self.downsample != self.resolution:
            raise ValueError(f"image.resolution={self.resolution} is not divisible by the autoencoder's "
                             f"downsampling factor {self.downsample}")
        if self.latent_resolution % self.patch_size:
            raise ValueError(f"the model's image side {self.latent_resolution} is not divisible by "
                             f"image.patch_size={self.patch_size}")
        if not 0.0 <= self.caption_first_ratio <= 1.0:
            raise ValueError("transfusion.caption_first_ratio must be in [0, 1]")
        if not 0 < self.noise_cap <= self.num_timesteps:
            raise ValueError(f"transfusion.noise_cap must be in 1..{self.num_timesteps}")
        diff.alphas_cumprod(self.schedule, 2)
        if self.prediction not in diff.PREDICTIONS:
            raise ValueError(f"transfusion.prediction={self.prediction!r}; choose from {diff.PREDICTIONS}")
        diff.loss_weight(self.loss_weighting, self.prediction, jnp.array([0.5]))
        diff.eta_for(self.sampler)
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
        diff.sampling_timesteps(self.num_timesteps, self.sample_steps)
        if self.pairs_per_sequence < 1 or self.max_text_len < 1:
            raise ValueError("transfusion.pairs_per_sequence and max_text_len must be >= 1")

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
    def pixel_shape(self) -> tuple[int, int, int]:
        return (self.resolution, self.resolution, self.channels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The shape diffusion works on: pixels, or autoencoder latents."""
        if self.latent == "kl_vae":
            return (self.latent_resolution, self.latent_resolution, self.latent_channels)
        return self.pixel_shape


_DERIVED = ("autoencoder_channels", "latent_channels", "autoencoder_blocks")


def settings_from_config(config) -> Settings:
    merged = {}
    for section in ("image", "transfusion", "sampling"):
        if section in config:
            merged.update({k: v for k, v in dict(config[section]).items() if k != "autoencoder"})
    known = {f.name for f in dataclasses.fields(Settings)} - set(_DERIVED)
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ValueError(f"unknown Transfusion settings {unknown} in config.image/transfusion/sampling; "
                         f"known: {sorted(known)}")
    if "unet_channels" in merged:
        merged["unet_channels"] = tuple(merged["unet_channels"])
    if merged.get("latent") == "kl_vae":
        ae = config.image.get("autoencoder")
        if ae is None or "autoencoder" not in ae:
            raise ValueError("image.latent='kl_vae' needs image.autoencoder: the config of the kl_vae run whose "
                             "latent space to use (see unimm/configs/kl_vae.py)")
        if ae.image.resolution != merged.get("resolution", Settings.resolution):
            raise ValueError(f"image.autoencoder.image.resolution={ae.image.resolution} differs from "
                             f"image.resolution={merged.get('resolution')}")
        merged.update(autoencoder_channels=tuple(ae.autoencoder.channels),
                      latent_channels=ae.autoencoder.latent_channels, autoencoder_blocks=ae.autoencoder.blocks)
    return Settings(**merged)


# ---------------------------------------------------------------------------
# Model


class TransfusionModel(nnx.Module):
    def __init__(self, dcfg: DecoderConfig, vocab_size: int, s: Settings, *, rngs: nnx.Rngs):
        dtype = dcfg.compute_dtype
        self.embed = Embed(vocab_size, dcfg.d_model, rngs=rngs, dtype=dtype)
        self.image_io = make_image_io(s.io, s.image_shape, s.patch_size, dcfg.d_model, rngs=rngs, dtype=dtype,
                                      channels=s.unet_channels, blocks=s.unet_blocks, skips=s.unet_skips,
                                      pos_embedding=s.pos_embedding, refine_channels=s.refine_channels,
                                      refine_blocks=s.refine_blocks,
                                      skip_max_t=s.unet_skip_max_t, global_cond=s.unet_global_cond,
                                      adaptive_out=s.timestep_cond == "adaln",
                                      in_channels=s.image_shape[-1] * (2 if s.self_cond else 1),
                                      token_skip=s.unet_token_skip, mid_blocks=s.unet_mid_blocks)
        self.self_cond = s.self_cond
        self.decoder = Decoder(dcfg, rngs=rngs)
        self.adaln = s.timestep_cond == "adaln"
        # caption_cond: the mean embedding of an image's caption tokens, through an MLP whose output
        # starts at zero, joins the timestep embedding wherever the image path is conditioned.
        d = dcfg.d_model
        self.caption_in = Linear(d, d, ("embed", None), rngs=rngs, dtype=dtype, use_bias=True) if s.caption_cond else None
        self.caption_out = (Linear(d, d, (None, "embed"), rngs=rngs, dtype=dtype, use_bias=True, zero_init=True)
                            if s.caption_cond else None)
        # `own`: a table only the image path trains, free of what the LM loss asks of the token embeddings.
        self.caption_embed = (Embed(vocab_size, d, rngs=rngs, dtype=dtype)
                              if s.caption_cond and s.caption_embedding == "own" else None)
        self.lm_head = Linear(dcfg.d_model, vocab_size, ("embed", "vocab"), rngs=rngs, dtype=dtype)
        self.num_patches = s.num_patches
        self.rope_width = s.latent_resolution // s.patch_size if s.rope == "2d" else 0
        self.prediction = s.prediction
        self.schedule = (s.schedule, s.num_timesteps)
        # A frozen image autoencoder (loaded from its own run) when diffusing in latent space.
        self.autoencoder = (KLAutoencoder(s.autoencoder_channels, s.latent_channels, rngs=rngs,
                                          image_channels=s.channels, blocks=s.autoencoder_blocks)
                            if s.latent == "kl_vae" else None)

    def _patch_slots(self, image_start, image_valid, length):
        """Sequence positions (B, k*P) of every image patch; invalid images -> out of range."""
        start = jnp.where(image_valid, image_start, length)
        return (start[:, :, None] + jnp.arange(self.num_patches)[None, None, :]).reshape(start.shape[0], -1)

    def _image_rope(self, meta: Meta, patch_index) -> Meta:
        """With image.rope='2d', RoPE positions by row and column for the patches."""
        return meta.with_grid_rope(patch_index, self.rope_width) if self.rope_width else meta

    def _patches_meta(self, meta: Meta) -> Meta:
        """`meta` of a call whose tokens are exactly one image's patches."""
        idx = jnp.broadcast_to(jnp.arange(self.num_patches, dtype=jnp.int32), meta.position.shape)
        return self._image_rope(meta, idx)

    def caption_features(self, caption_ids) -> Optional[jax.Array]:
        """(..., E) pooled caption conditioning of caption ids (..., Lc) (-1: none); zero
        for an image without a caption; None unless caption_cond."""
        if self.caption_in is None or caption_ids is None:
            return None
        valid = caption_ids >= 0
        n = valid.sum(-1, keepdims=True)
        table = self.embed if self.caption_embed is None else self.caption_embed
        emb = table(jnp.maximum(caption_ids, 0)) * valid[..., None].astype(self.caption_in.dtype)
        pooled = emb.sum(-2) / jnp.maximum(n, 1).astype(emb.dtype)
        return self.caption_out(jax.nn.silu(self.caption_in(pooled))) * (n > 0).astype(emb.dtype)

    def image_input(self, x_t, x0_sc=None):
        """What the image path reads: x_t, and with self_cond also an estimate of x0
        (..., H, W, 2C); zeros stand for 'no estimate' (the first sampling step)."""
        if not self.self_cond:
            return x_t
        return jnp.concatenate([x_t, jnp.zeros_like(x_t) if x0_sc is None else x0_sc.astype(x_t.dtype)], -1)

    def _cond(self, t, index, extra=None) -> Optional[Cond]:
        """adaLN conditioning: features of images at t (B, k) (with `extra` (B * k, E)); index
        (B, T) names each token's image (-1: text)."""
        if not self.adaln:
            return None
        temb = self.image_io.temb(t.reshape(-1), extra)
        return Cond(temb.reshape(t.shape + temb.shape[-1:]), index)

    def _patches_cond(self, t, extra=None) -> Optional[Cond]:
        """adaLN conditioning of a call whose tokens are one image (B,) at noise t (B,)."""
        return self._cond(t[:, None], jnp.zeros((t.shape[0], self.num_patches), jnp.int32), extra)

    def __call__(self, tokens, meta: Meta, images, t, image_start, image_valid,
                 cache: Optional[KVCache] = None, update_cache: bool = False, caption_ids=None, x0_sc=None):
        """Text and images (B, k, H, W, C) at noise level t (B, k) in one sequence.

        Returns (text logits (B, L, V), the image prediction (B, k, H, W, C): eps
        or v, per `prediction`, and the cache). caption_ids (B, k, Lc): each image's
        caption for caption_cond (-1 padded; all -1: none). x0_sc (B, k, H, W, C):
        the self-conditioning estimate of the clean images (None: none)."""
        b, length = tokens.shape
        k = images.shape[1]
        x = self.embed(tokens)
        extra = self.caption_features(caption_ids)
        extra = None if extra is None else extra.reshape(b * k, -1)
        inp = self.image_input(images, x0_sc)
        img_tokens, ctx = self.image_io.encode(inp.reshape((b * k,) + inp.shape[2:]), t.reshape(-1), extra)
        slots = self._patch_slots(image_start, image_valid, length)
        rows = jnp.arange(b)[:, None]
        x = x.at[rows, slots].set(img_tokens.reshape(b, -1, x.shape[-1]).astype(x.dtype), mode="drop")
        patch_index = jnp.full((b, length), -1, jnp.int32).at[rows, slots].set(
            jnp.tile(jnp.arange(self.num_patches, dtype=jnp.int32), k)[None], mode="drop")
        image_index = jnp.full((b, length), -1, jnp.int32).at[rows, slots].set(
            jnp.repeat(jnp.arange(k, dtype=jnp.int32), self.num_patches)[None], mode="drop")
        h, cache = self.decoder(x, self._image_rope(meta, patch_index), cache, update_cache,
                                self._cond(t, image_index, extra))
        logits = self.lm_head(h).astype(jnp.float32)
        h_img = h[rows, jnp.minimum(slots, length - 1)].reshape(b * k, self.num_patches, -1)
        eps = self.image_io.decode(h_img, t.reshape(-1), ctx)
        return logits, eps.reshape(images.shape), cache

    def denoise(self, x_t, t, meta: Meta, cache: KVCache, extra=None, x0_sc=None):
        """Noise estimate (eps) for images alone (B, H, W, C), attending read-only to a cached
        prefix; `extra` (B, E): their caption_features, if any; x0_sc: the self-conditioning
        estimate of x0 (None: none)."""
        tokens, ctx = self.image_io.encode(self.image_input(x_t, x0_sc), t, extra)
        h, _ = self.decoder(tokens, self._patches_meta(meta), cache, update_cache=False,
                            cond=self._patches_cond(t, extra))
        out = self.image_io.decode(h, t, ctx)
        return diff.eps_from_prediction(self.prediction, out, x_t,
                                        jnp.asarray(diff.alphas_cumprod(*self.schedule))[t])

    def append_image(self, x0, meta: Meta, cache: KVCache, extra=None):
        """Add a clean image's tokens (noise level 0) to the cache."""
        t = jnp.zeros(x0.shape[:1], jnp.int32)
        tokens, _ = self.image_io.encode(self.image_input(x0), t, extra)
        return self.decoder(tokens, self._patches_meta(meta), cache, update_cache=True,
                            cond=self._patches_cond(t, extra))[1]

    def text(self, tokens, meta: Meta, cache: KVCache):
        """Append text tokens to the cache; logits (B, T, V) at each of them."""
        h, cache = self.decoder(self.embed(tokens), meta, cache, update_cache=True)
        return self.lm_head(h).astype(jnp.float32), cache


# ---------------------------------------------------------------------------
# Sampling (pure functions of the split model, jitted once per shape)


@dataclasses.dataclass(frozen=True)
class _SampleStatic:
    image_shape: tuple
    num_patches: int
    timesteps: tuple
    eta: float
    clip: Optional[float]
    cfg_scale: float
    num_timesteps: int
    schedule: str


def _image_meta(start, num_patches, active):
    """Metadata of an image span starting at `start` (B,); inactive rows get segment 0."""
    b = start.shape[0]
    seg = jnp.broadcast_to(active.astype(jnp.int32)[:, None], (b, num_patches))
    pos = start[:, None] + jnp.arange(num_patches, dtype=jnp.int32)[None, :]
    return Meta(seg, seg, pos)


def cond_uncond_eps(model: TransfusionModel, x, t, meta: Meta, cache: KVCache, extra=None, x0_sc=None):
    """Noise estimates (2B, ...) for x (B, ...): the cache holds B conditional rows then
    B unconditional rows; `meta`, `extra` (caption features) and x0_sc cover all 2B rows."""
    b = x.shape[0]
    return model.denoise(jnp.concatenate([x, x]), jnp.full((2 * b,), t, jnp.int32), meta, cache, extra, x0_sc)


def guided_eps(model: TransfusionModel, x, t, meta: Meta, cache: KVCache, scale: float, extra=None, x0_sc=None):
    """CFG noise estimate for x (B, ...), from cond_uncond_eps."""
    eps = cond_uncond_eps(model, x, t, meta, cache, extra, x0_sc)
    b = x.shape[0]
    return diff.guide(eps[:b], eps[b:], scale)


def _denoise_loop(model, cache, start, st: _SampleStatic, rng, captions=None):
    """Run the sampler for B images; the cache holds 2B rows (cond then uncond), and
    `captions` (2B, Lc) are their caption ids for caption_cond (-1 padded)."""
    extra = model.caption_features(captions)
    b = cache.end.shape[0] // 2
    acp = jnp.asarray(diff.alphas_cumprod(st.schedule, st.num_timesteps))
    ts = jnp.asarray(st.timesteps, jnp.int32)
    meta = _image_meta(start, st.num_patches, jnp.ones(start.shape, bool))
    rng, sub = jax.random.split(rng)
    x = jax.random.normal(sub, (b,) + st.image_shape, jnp.float32)

    def body(i, carry):
        x, x0_sc, rng = carry
        t = ts[i]
        a_prev = jnp.where(i + 1 < ts.shape[0], acp[ts[jnp.minimum(i + 1, ts.shape[0] - 1)]], 1.0)
        both = cond_uncond_eps(model, x, t, meta, cache, extra, x0_sc)
        eps = diff.guide(both[:b], both[b:], st.cfg_scale)
        if model.self_cond:  # each row (conditional, unconditional) reads its own last estimate
            x0_sc = diff.x0_from_eps(jnp.concatenate([x, x]), both, acp[t], st.clip)
        rng, sub = jax.random.split(rng)
        noise = jax.random.normal(sub, x.shape, jnp.float32)
        a_t = jnp.full((b,), acp[t])
        return diff.step(x, eps, a_t, jnp.full((b,), a_prev), st.eta, noise, st.clip), x0_sc, rng

    # Without self_cond the carried estimate is None: nothing extra in the loop.
    x0_sc = jnp.zeros((2 * b,) + st.image_shape, jnp.float32) if model.self_cond else None
    x, _, _ = jax.lax.fori_loop(0, ts.shape[0], body, (x, x0_sc, rng))
    return x


@functools.partial(jax.jit, static_argnames=("graphdef", "st"))
def _sample_images(graphdef, params, prefix, lengths, captions, rng, *, st: _SampleStatic):
    """prefix (2B, Lp): B conditional prompts then B unconditional ones, each ending in BOI;
    captions (2B, Lc): their caption ids (-1 padded)."""
    model = nnx.merge(graphdef, params)
    cache = model.decoder.init_cache(prefix.shape[0], prefix.shape[1])
    _, cache = model.decoder(model.embed(prefix), prefix_meta(lengths, prefix.shape[1]), cache, True)
    return _denoise_loop(model, cache, lengths, st, rng, captions)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "stop_ids", "pad_id", "temperature"))
def _decode_text(graphdef, params, cache, first_logits, start, rng, *, max_new, stop_ids, pad_id, temperature):
    model = nnx.merge(graphdef, params)

    def step(cache, tok, pos, active):
        seg = active.astype(jnp.int32)[:, None]
        logits, cache = model.text(tok, Meta(seg, jnp.zeros_like(seg), pos), cache)
        return logits[:, -1], cache

    return decode(step, cache, first_logits, start, max_new, stop_ids, pad_id, rng, temperature)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill_text(graphdef, params, tokens, lengths, *, cache_len):
    model = nnx.merge(graphdef, params)
    cache = model.decoder.init_cache(tokens.shape[0], cache_len)
    logits, cache = model.text(tokens, prefix_meta(lengths, tokens.shape[1]), cache)
    return logits[jnp.arange(tokens.shape[0]), lengths - 1], cache


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _feed_text(graphdef, params, cache, tokens, meta):
    return nnx.merge(graphdef, params).text(tokens, meta, cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill_with_image(graphdef, params, tokens, meta, images, image_start, *, cache_len):
    model = nnx.merge(graphdef, params)
    b = tokens.shape[0]
    cache = model.decoder.init_cache(b, cache_len)
    t = jnp.zeros((b, 1), jnp.int32)
    logits, _, cache = model(tokens, meta, images[:, None], t, image_start[:, None], jnp.ones((b, 1), bool),
                             cache, update_cache=True)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode_latents(graphdef, params, z):
    return nnx.merge(graphdef, params).decode(z)


@functools.partial(jax.jit, static_argnames=("objective", "graphdef"))
def _to_model_space(params, images, *, objective, graphdef):
    return objective.to_model_space(images, nnx.merge(graphdef, params))


@functools.partial(jax.jit, static_argnames=("graphdef", "st"))
def _image_from_cache(graphdef, params, cache, uncond_cache, start, active, eoi, captions, rng, *,
                      st: _SampleStatic):
    """Sample an image after each active row's BOI, then append it and EOI to the cache.
    captions (B, Lc): each row's text before BOI (-1 padded), for caption_cond."""
    model = nnx.merge(graphdef, params)
    # Conditional rows then unconditional ones (k/v carry the batch on axis 1).
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1 if a.ndim == 5 else 0), cache, uncond_cache)
    starts = jnp.concatenate([start, jnp.full(uncond_cache.end.shape, 2, jnp.int32)])
    x0 = _denoise_loop(model, both, starts, st, rng, jnp.concatenate([captions, jnp.full_like(captions, -1)]))
    cache = model.append_image(x0, _image_meta(start, st.num_patches, active), cache,
                               model.caption_features(captions))
    seg = active.astype(jnp.int32)[:, None]
    pos = (start + st.num_patches)[:, None]
    logits, cache = model.text(jnp.full_like(seg, eoi), Meta(seg, jnp.zeros_like(seg), pos), cache)
    return x0, logits[:, -1], cache


# ---------------------------------------------------------------------------
# The objective


class Transfusion(Objective):
    name = "transfusion"

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

    @property
    def compute_dtype(self):
        return self.dcfg.compute_dtype

    # -- model -----------------------------------------------------------------
    def make_model(self, rngs: nnx.Rngs) -> TransfusionModel:
        return TransfusionModel(self.dcfg, self.vocab_size, self.s, rngs=rngs)

    def pretrained(self, workdir) -> list[Pretrained]:
        """The frozen autoencoder, from image.autoencoder.workdir (default <workdir>/autoencoder)."""
        if self.s.latent != "kl_vae":
            return []
        ae = self.config.image.autoencoder
        return [Pretrained("autoencoder", ae.get("workdir") or str(pathlib.Path(workdir) / "autoencoder"), ae)]

    def loaded(self, dep: Pretrained) -> None:
        if dep.key != "autoencoder" or self.s.latent_scale:
            return
        records = pathlib.Path(dep.workdir) / "eval.jsonl"
        scales = [json.loads(line).get("latent_scale") for line in records.read_text().splitlines()] \
            if records.exists() else []
        if not scales or scales[-1] is None:
            raise ValueError(f"image.latent_scale=0 means 'measured by the autoencoder run', but {dep.workdir} has no "
                             f"evaluation with latent_scale; set image.latent_scale or evaluate that run")
        self.s = dataclasses.replace(self.s, latent_scale=float(scales[-1]))

    def frozen(self) -> tuple[str, ...]:
        return ("^autoencoder/",) if self.s.latent == "kl_vae" else ()

    # -- data ------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.s.pairs_per_sequence * self.s.pair_length

    def example_spec(self) -> dict[str, ArraySpec]:
        L, k = self.seq_len, self.s.pairs_per_sequence
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
        r, k = self.s.caption_first_ratio, self.s.pairs_per_sequence
        out = []
        if r > 0:
            out.append(Stream("caption_first", r, functools.partial(self.encode, caption_first=True), k))
        if r < 1:
            out.append(Stream("image_first", 1 - r, functools.partial(self.encode, caption_first=False), k))
        return out

    def text_ids(self, text: str) -> list[int]:
        ids = self.tok.encode(text)
        if len(ids) > self.s.max_text_len:
            raise ValueError(f"text of {len(ids)} tokens is longer than transfusion.max_text_len="
                             f"{self.s.max_text_len}: {text!r}; raise the limit or shorten the text")
        return ids

    def encode(self, examples: list[dict], rng: np.random.Generator, caption_first: bool = True):
        """The sequence layout of scene examples (one document each), as numpy arrays."""
        pairs = []
        for ex in examples:
            text = self.text_ids(ex["caption"])
            if caption_first and rng.random() < self.s.cond_dropout:
                text = []
            capped = (not caption_first) and rng.random() < self.s.noise_cap_prob
            pairs.append((text, ex["image"], capped))
        return self.layout(pairs, caption_first)

    def layout(self, pairs, caption_first: bool) -> dict[str, np.ndarray]:
        """Arrays for (text ids, uint8 image, noise capped) pairs, each its own document."""
        P = self.s.num_patches
        bos, eos = self.tok_ids
        out = {name: np.zeros(a.shape, a.dtype) for name, a in self.example_spec().items()}
        out["caption_ids"][:] = -1
        cur = 0
        for j, (text, image, capped) in enumerate(pairs):
            image_part = [self.boi] + [0] * P + [self.eoi]
            seq = np.array([bos] + (list(text) + image_part if caption_first else image_part + list(text)) + [eos])
            n = len(seq)
            start = cur + 2 + (len(text) if caption_first else 0)
            sl = slice(cur, cur + n)
            out["tokens"][sl] = seq
            out["segment"][sl] = j + 1
            out["position"][sl] = np.arange(n)
            out["span"][start:start + P] = j + 1
            # LM targets: text, BOI and EOS (not BOS, not patches, not EOI, which always follows them).
            is_patch = np.zeros(n, bool)
            is_patch[start - cur:start - cur + P] = True
            out["lm_weight"][sl] = (~is_patch & (seq != bos) & (seq != self.eoi)).astype(np.float32)
            out["images"][j] = image
            out["image_start"][j] = start
            out["image_valid"][j] = True
            out["noise_cap"][j] = capped
            if caption_first:  # an image-first caption comes after its image: it must not condition it
                out["caption_ids"][j, :len(text)] = text
            cur += n
        return out

    def synthetic_batch(self, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Full-length sequences of random text and images, for benchmarks: every
        pair has max_text_len text tokens, so nothing is padding."""
        rng = np.random.default_rng(seed)
        k, v = self.s.pairs_per_sequence, self.boi
        rows = [self.layout([(rng.integers(4, v, self.s.max_text_len),
                              rng.integers(0, 256, self.s.pixel_shape, dtype=np.uint8), False) for _ in range(k)],
                            caption_first=True) for _ in range(batch_size)]
        return {name: np.stack([r[name] for r in rows]) for name in rows[0]}

    # -- training --------------------------------------------------------------
    def to_model_space(self, images: jax.Array, model: Optional[TransfusionModel] = None) -> jax.Array:
        """uint8 pixels (..., H, W, C) -> what diffusion works on: pixels in [-1, 1],
        or scaled latents of the frozen autoencoder."""
        x = images.astype(jnp.float32) / 127.5 - 1.0
        if self.s.latent == "pixels":
            return x
        lead = x.shape[:-3]
        z = model.autoencoder.encode(x.reshape((-1,) + x.shape[-3:]))[0]
        return jax.lax.stop_gradient(z * self.s.latent_scale).reshape(lead + z.shape[1:])

    def loss(self, model: TransfusionModel, batch, rng):
        s = self.s
        x0 = self.to_model_space(batch["images"], model)
        b, k = x0.shape[:2]
        r_t, r_cap, r_eps = jax.random.split(rng, 3)
        t = diff.sample_timesteps(r_t, (b, k), s.num_timesteps, s.timestep_sampling, s.timestep_mean,
                                  s.timestep_std)
        t = jnp.where(batch["noise_cap"], jax.random.randint(r_cap, (b, k), 0, s.noise_cap), t)
        eps = jax.random.normal(r_eps, x0.shape, jnp.float32)
        x_t = diff.q_sample(x0, t, eps, jnp.asarray(self.acp))
        meta = Meta(batch["segment"], batch["span"], batch["position"])
        call = functools.partial(model, batch["tokens"], meta, x_t, t, batch["image_start"], batch["image_valid"],
                                 caption_ids=batch["caption_ids"])
        x0_sc = self._self_cond_estimate(call, x_t, t, jax.random.fold_in(rng, 1)) if s.self_cond else None
        logits, eps_pred, _ = call(x0_sc=x0_sc)
        lm_loss, lm_metrics = cross_entropy(logits[:, :-1], batch["tokens"][:, 1:], batch["lm_weight"][:, 1:],
                                            s.z_loss)
        valid = batch["image_valid"].astype(jnp.float32)
        acp_t = jnp.asarray(self.acp)[t]
        target = diff.prediction_target(s.prediction, x0, eps, acp_t)
        per_image = jnp.mean((eps_pred.astype(jnp.float32) - target) ** 2, axis=(2, 3, 4))
        weight = diff.loss_weight(s.loss_weighting, s.prediction, acp_t, s.min_snr_gamma)
        diffusion_loss = (per_image * weight * valid).sum() / jnp.maximum(valid.sum(), 1.0)
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
            return jax.lax.stop_gradient(diff.x0_from_eps(x_t, eps, acp_t, 1.0 if s.clip_x0 else None))

        return jax.lax.cond(jax.random.bernoulli(rng), estimate, lambda: jnp.zeros_like(x_t))

    def tokens_per_batch(self, batch) -> int:
        return int((np.asarray(batch["segment"]) != 0).sum())

    def flops_per_batch(self, batch) -> float:
        tokens = self.tokens_per_batch(batch)
        pairs = flops_lib.attention_pairs(batch["segment"], batch["span"])
        fwd = flops_lib.decoder_forward_flops(self.dcfg, tokens, pairs)
        fwd += flops_lib.dense_flops(tokens, self.dcfg.d_model, self.vocab_size)  # LM head
        n_images = int(np.asarray(batch["image_valid"]).sum())
        fwd += n_images * self._image_io_flops
        # The frozen autoencoder only runs forward (encoding the training images).
        return flops_lib.TRAIN_MULTIPLIER * fwd + n_images * self._encoder_flops

    @functools.cached_property
    def _image_io_flops(self) -> float:
        """Forward FLOPs of the image in/out layers for one image (XLA's count)."""
        model = nnx.eval_shape(lambda: self.make_model(nnx.Rngs(0)))
        graphdef, state = nnx.split(model.image_io)

        def run(state, x, t):
            io = nnx.merge(graphdef, state)
            tokens, ctx = io.encode(x, t)
            return io.decode(tokens, t, ctx)

        h, w, c = self.s.image_shape
        inputs = jax.ShapeDtypeStruct((1, h, w, c * (2 if self.s.self_cond else 1)), jnp.float32)
        return flops_lib.xla_flops(run, state, inputs, jax.ShapeDtypeStruct((1,), jnp.int32))

    @functools.cached_property
    def _encoder_flops(self) -> float:
        if self.s.latent == "pixels":
            return 0.0
        model = nnx.eval_shape(lambda: self.make_model(nnx.Rngs(0)))
        graphdef, state = nnx.split(model.autoencoder)
        return flops_lib.xla_flops(lambda st, x: nnx.merge(graphdef, st).encode(x)[0], state,
                                   jax.ShapeDtypeStruct((1,) + self.s.pixel_shape, jnp.float32))

    # -- sampling --------------------------------------------------------------
    def _static(self, cfg_scale: Optional[float] = None, steps: Optional[int] = None) -> _SampleStatic:
        s = self.s
        return _SampleStatic(
            image_shape=s.image_shape, num_patches=s.num_patches,
            timesteps=tuple(int(t) for t in diff.sampling_timesteps(s.num_timesteps, steps or s.sample_steps)),
            eta=diff.eta_for(s.sampler, s.ddim_eta), clip=1.0 if s.clip_x0 else None,
            cfg_scale=float(s.cfg_scale if cfg_scale is None else cfg_scale),
            num_timesteps=s.num_timesteps, schedule=s.schedule)

    def _pad(self, seqs: Sequence[Sequence[int]]):
        return pad_rows(seqs, self.tok.pad_id)

    def from_model_space(self, x, model: Optional[TransfusionModel] = None) -> np.ndarray:
        if self.s.latent == "kl_vae":
            x = _decode_latents(*nnx.split(model.autoencoder), x / self.s.latent_scale)
        return np.asarray(jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255)).astype(np.uint8)

    def _captions(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """caption_ids rows (N, longest), -1 padded."""
        return pad_rows(ids, -1)[0]

    def generate_images(self, model, prompts, rng, cfg_scale=None, steps=None) -> np.ndarray:
        bos = self.tok.bos_id
        ids = [self.text_ids(p) for p in prompts]
        prefix, lengths = self._pad([[bos] + i + [self.boi] for i in ids] + [[bos, self.boi]] * len(prompts))
        captions = self._captions(ids + [[]] * len(prompts))
        graphdef, params = nnx.split(model)
        x = _sample_images(graphdef, params, prefix, lengths, captions, rng, st=self._static(cfg_scale, steps))
        return self.from_model_space(x, model)

    def caption_images(self, model, images, rng) -> list[str]:
        s, P = self.s, self.s.num_patches
        b = len(images)
        seq = [self.tok.bos_id, self.boi] + [0] * P + [self.eoi]
        n = len(seq)
        tokens = np.tile(np.array(seq, np.int32), (b, 1))
        span = np.zeros((b, n), np.int32)
        span[:, 2:2 + P] = 1
        meta = Meta(np.ones((b, n), np.int32), span, np.tile(np.arange(n, dtype=np.int32), (b, 1)))
        graphdef, params = nnx.split(model)
        images = _to_model_space(params, images, objective=self, graphdef=graphdef)
        logits, cache = _prefill_with_image(graphdef, params, tokens, meta, images, np.full((b,), 2, np.int32),
                                            cache_len=n + s.max_new_tokens)
        out, _, _ = _decode_text(graphdef, params, cache, logits, np.full((b,), n, np.int32), rng,
                                 max_new=s.max_new_tokens, stop_ids=(self.tok.eos_id,), pad_id=self.tok.pad_id,
                                 temperature=s.temperature)
        return [self.tok.decode(row) for row in np.asarray(out)]

    def generate(self, model, prompts: Sequence[str], rng, max_text: Optional[int] = None):
        """Interleaved generation: continue each prompt's text until BOI (or EOS),
        sample an image there, append it and EOI, and continue the text to EOS.

        Returns, per prompt, (text before the image, image or None, text after)."""
        s, P = self.s, self.s.num_patches
        m = max_text or s.max_new_tokens
        bos, eos, pad = self.tok.bos_id, self.tok.eos_id, self.tok.pad_id
        tokens, lengths = self._pad([[bos] + self.tok.encode(p) for p in prompts])
        cache_len = tokens.shape[1] + m + 1 + P + 1 + m
        graphdef, params = nnx.split(model)
        r1, r2, r3 = jax.random.split(rng, 3)
        kw = dict(pad_id=pad, temperature=s.temperature)
        logits, cache = _prefill_text(graphdef, params, tokens, lengths, cache_len=cache_len)
        first, n1, cache = _decode_text(graphdef, params, cache, logits, lengths, r1, max_new=m,
                                        stop_ids=(self.boi, eos), **kw)
        first, n1 = np.asarray(first), np.asarray(n1)
        last = first[np.arange(len(prompts)), n1 - 1]
        wants_image = last == self.boi
        # Feed BOI (the decode loop stops before feeding its stop token).
        boi_pos = lengths + n1 - 1
        seg = wants_image.astype(np.int32)[:, None]
        _, cache = _feed_text(graphdef, params, cache, np.full_like(seg, self.boi),
                              Meta(seg, np.zeros_like(seg), boi_pos[:, None]))
        uncond_prefix, uncond_len = self._pad([[bos, self.boi]] * len(prompts))
        _, uncond = _prefill_text(graphdef, params, uncond_prefix, uncond_len, cache_len=cache_len)
        captions = self._captions([list(tokens[i, 1:lengths[i]]) + list(first[i, :n1[i] - 1])
                                   for i in range(len(prompts))])
        x0, logits, cache = _image_from_cache(graphdef, params, cache, uncond, boi_pos + 1, wants_image,
                                              self.eoi, captions, r2, st=self._static())
        second, _, _ = _decode_text(graphdef, params, cache, logits, boi_pos + 1 + P + 1, r3, max_new=m,
                                    stop_ids=(eos,), **kw)
        images = self.from_model_space(x0, model)
        out = []
        for i in range(len(prompts)):
            before = self.tok.decode([t for t in first[i, :n1[i]] if t < self.tok.vocab_size])
            if wants_image[i]:
                out.append((before, images[i], self.tok.decode(np.asarray(second)[i])))
            else:
                out.append((before, None, ""))
        return out


OBJECTIVE = Transfusion
