"""Image in/out layers for a transformer over image patches (pixels or latents).

Two interchangeable pairs, both conditioned on a diffusion timestep:

- `LinearPatchIO`: linear patchify -> tokens, tokens -> linear unpatchify
  (Transfusion's simple variant).
- `UNetPatchIO`: U-Net down blocks (conv ResBlocks, strided downsampling by the
  patch size) -> tokens, and up blocks with skip connections from the down path
  -> output (Transfusion's U-Net variant).

Both expose `encode(x, t) -> (tokens (N, P, E), context)` and
`decode(h, t, context) -> (N, H, W, C)`; `context` carries the skips. With
`in_channels` > C, encode reads C + extra channels (e.g. a self-conditioning
estimate of the clean image) and decode still returns C.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unimm.nn import axes as ax
from unimm.nn.diffusion import timestep_embedding
from unimm.nn.layers import Linear, RMSNorm


def patchify(x: jax.Array, p: int) -> jax.Array:
    """(N, H, W, C) -> (N, H/p * W/p, p*p*C), row-major patches."""
    n, h, w, c = x.shape
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not divisible by patch size {p}")
    x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: jax.Array, p: int, h: int, w: int, c: int) -> jax.Array:
    n = x.shape[0]
    x = x.reshape(n, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h, w, c)


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> jax.Array:
    """Fixed 2D sine-cosine features (grid_h * grid_w, dim), row-major: half the
    channels encode the row, half the column (as in MAE and DiT)."""
    quarter = dim // 4
    freqs = 1.0 / 10000.0 ** (jnp.arange(quarter, dtype=jnp.float32) / max(quarter, 1))
    rows, cols = jnp.meshgrid(jnp.arange(grid_h, dtype=jnp.float32), jnp.arange(grid_w, dtype=jnp.float32),
                              indexing="ij")
    parts = [f(a.reshape(-1, 1) * freqs) for a in (rows, cols) for f in (jnp.sin, jnp.cos)]
    emb = jnp.concatenate(parts, axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim - emb.shape[-1])))


POS_EMBEDDINGS = ("sincos", "normal", "none")


def position_param(kind: str, grid_h: int, grid_w: int, dim: int, rngs: nnx.Rngs) -> Optional[nnx.Param]:
    """Learned patch-position embeddings (grid_h * grid_w, dim): 'sincos' starts
    from 2D sine-cosine features, so every patch knows its row and column from
    the first step; 'normal' starts from N(0, 0.02) and must learn them; 'none'
    gives None: no table (positions come from 2D RoPE instead)."""
    if kind == "none":
        return None
    if kind == "sincos":
        init = lambda key, shape, dtype: sincos_2d(grid_h, grid_w, dim).astype(dtype)
    elif kind == "normal":
        init = jax.nn.initializers.normal(0.02)
    else:
        raise ValueError(f"unknown position embedding {kind!r}; choose from {POS_EMBEDDINGS}")
    return ax.param(init, rngs.params(), (grid_h * grid_w, dim), (None, "embed"))


def with_positions(tokens: jax.Array, pos: Optional[nnx.Param]) -> jax.Array:
    return tokens if pos is None else tokens + pos[...].astype(tokens.dtype)


class TimestepMLP(nnx.Module):
    """Sinusoidal timestep features -> MLP -> (N, dim), plus `extra` (N, dim)
    conditioning if given (e.g. pooled caption features): what the image path
    is conditioned on."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, freq_dim: int = 128, dtype=jnp.float32):
        self.freq_dim = freq_dim
        self.fc1 = Linear(freq_dim, dim, (None, "embed"), rngs=rngs, dtype=dtype, use_bias=True)
        self.fc2 = Linear(dim, dim, ("embed", None), rngs=rngs, dtype=dtype, use_bias=True)

    def __call__(self, t: jax.Array, extra: Optional[jax.Array] = None) -> jax.Array:
        temb = self.fc2(jax.nn.silu(self.fc1(timestep_embedding(t, self.freq_dim))))
        return temb if extra is None else temb + extra.astype(temb.dtype)


class Conv(nnx.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, zero_init: bool = False):
        init = (jax.nn.initializers.zeros if zero_init
                else jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"))
        self.kernel = ax.param(init, rngs.params(), (kernel, kernel, cin, cout), (None, None, "conv_in", "conv"))
        self.bias = ax.param(jax.nn.initializers.zeros, rngs.params(), (cout,), ("conv",))
        self.stride, self.dtype = stride, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), (self.stride, self.stride), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
    def __init__(self, channels: int, groups: int = 8, eps: float = 1e-5):
        self.groups = math.gcd(groups, channels)
        self.scale = ax.param(jax.nn.initializers.ones, jax.random.key(0), (channels,), ("conv",))
        self.bias = ax.param(jax.nn.initializers.zeros, jax.random.key(0), (channels,), ("conv",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        xf = x.astype(jnp.float32).reshape(n, h, w, self.groups, c // self.groups)
        mean = xf.mean(axis=(1, 2, 4), keepdims=True)
        var = xf.var(axis=(1, 2, 4), keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(n, h, w, c)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class ResBlock(nnx.Module):
    """GroupNorm-SiLU-Conv twice; with `tdim`, a conditioning embedding (e.g. the
    timestep) scales and shifts the second norm's output (ADM's scale-shift norm).

    Not added before that norm, as DDPM does: a per-channel constant is exactly
    what GroupNorm removes, entirely when a group is one channel wide (8 groups
    of 8 channels) and mostly at 2 per group, so narrow blocks would never see it."""

    def __init__(self, cin: int, cout: int, tdim: Optional[int] = None, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.norm1, self.norm2 = GroupNorm(cin), GroupNorm(cout)
        self.conv1 = Conv(cin, cout, rngs=rngs, dtype=dtype)
        self.conv2 = Conv(cout, cout, rngs=rngs, dtype=dtype, zero_init=True)
        self.temb = (Linear(tdim, 2 * cout, ("embed", "conv"), rngs=rngs, dtype=dtype, use_bias=True)
                     if tdim else None)
        self.skip = Conv(cin, cout, 1, rngs=rngs, dtype=dtype) if cin != cout else None

    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
        h = self.norm2(self.conv1(jax.nn.silu(self.norm1(x))))
        if self.temb is not None:
            scale, shift = jnp.split(self.temb(jax.nn.silu(temb))[:, None, None, :].astype(h.dtype), 2, axis=-1)
            h = h * (1.0 + scale) + shift
        h = self.conv2(jax.nn.silu(h))
        return h + (x if self.skip is None else self.skip(x))


class LinearPatchIO(nnx.Module):
    """One linear map per patch in and out, plus an optional conv refinement of
    the unpatchified prediction (residual, zero-initialised, so it starts as
    the identity):

    - `refine_channels` > 0, `refine_blocks` = 0: a 3x3 conv pair on the
      prediction alone (U-ViT's final conv): smooths the seams between patches.
    - `refine_blocks` > 0: that many timestep-conditioned ResBlocks over the
      prediction and the noisy input x_t together, a one-level U-Net skip at
      full resolution: the transformer still decides what to draw (at high
      noise x_t holds nothing else), the convs draw its edges from x_t.
    """

    def __init__(self, image_shape: Sequence[int], patch: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 pos_embedding: str = "normal", refine_channels: int = 0, refine_blocks: int = 0,
                 adaptive_out: bool = False, in_channels: Optional[int] = None):
        h, w, c = image_shape
        if refine_blocks and not refine_channels:
            raise ValueError("refine_blocks > 0 needs refine_channels > 0 (their width)")
        self.image_shape, self.patch = (h, w, c), patch
        self.num_patches, self.patch_dim = (h // patch) * (w // patch), patch * patch * c
        self.inp = Linear(patch * patch * (in_channels or c), dim, ("patch", "embed"), rngs=rngs, dtype=dtype,
                          use_bias=True)
        self.pos = position_param(pos_embedding, h // patch, w // patch, dim, rngs)
        self.temb = TimestepMLP(dim, rngs=rngs, dtype=dtype)
        self.out_norm = RMSNorm(dim)
        # adaptive_out: the timestep scales and shifts the output norm (DiT's final adaLN layer).
        self.out_mod = (Linear(dim, (2, dim), ("embed", None, None), rngs=rngs, dtype=dtype, use_bias=True,
                               zero_init=True) if adaptive_out else None)
        self.out = Linear(dim, self.patch_dim, ("embed", "patch"), rngs=rngs, dtype=dtype, use_bias=True,
                          zero_init=True)
        kw = dict(rngs=rngs, dtype=dtype)
        self.refine_sees_input = bool(refine_blocks)
        if not refine_channels:
            layers = []
        elif not refine_blocks:
            layers = [Conv(c, refine_channels, **kw), Conv(refine_channels, c, zero_init=True, **kw)]
        else:
            layers = ([Conv(2 * c, refine_channels, **kw)] +
                      [ResBlock(refine_channels, refine_channels, dim, **kw) for _ in range(refine_blocks)] +
                      [GroupNorm(refine_channels), Conv(refine_channels, c, zero_init=True, **kw)])
        self.refine = nnx.List(layers)

    def encode(self, x: jax.Array, t: jax.Array, extra: Optional[jax.Array] = None):
        temb = self.temb(t, extra)
        tokens = with_positions(self.inp(patchify(x, self.patch)), self.pos)
        return tokens + temb[:, None, :], (x[..., :self.image_shape[-1]], temb)

    def decode(self, h: jax.Array, t: jax.Array, context) -> jax.Array:
        del t
        x_t, temb = context if context is not None else (None, None)  # context: what encode returned
        h = self.out_norm(h)
        if self.out_mod is not None:
            shift, scale = jnp.moveaxis(self.out_mod(jax.nn.silu(temb)), 1, 0)[:, :, None, :]
            h = h * (1 + scale.astype(h.dtype)) + shift.astype(h.dtype)
        x = unpatchify(self.out(h).astype(jnp.float32), self.patch, *self.image_shape)
        if not len(self.refine):
            return x
        if not self.refine_sees_input:
            return x + self.refine[1](jax.nn.silu(self.refine[0](x))).astype(jnp.float32)
        r = self.refine[0](jnp.concatenate([x, x_t.astype(jnp.float32)], axis=-1))
        for block in self.refine[1:-2]:
            r = block(r, temb)
        return x + self.refine[-1](jax.nn.silu(self.refine[-2](r))).astype(jnp.float32)


class UNetPatchIO(nnx.Module):
    """Conv down path to one token per patch, and a conv up path back to pixels.

    `channels[i]` is the width at resolution H / 2^i; there are log2(patch)
    downsamplings, so len(channels) = log2(patch) + 1. With `skips`, the up path
    also sees the down path's features at each resolution above the tokens' (a
    classic U-Net, minus the token-level skip, which would duplicate the
    transformer's input); `skip_max_t` > 0 withholds them at timesteps >=
    skip_max_t. Without skips (the default) everything passes through the
    transformer. With `global_cond`, every up-path block is also conditioned on
    the mean of the transformer's outputs over the image (added to the timestep
    embedding, as ADM adds its class embedding), so what the text says reaches
    every resolution, not only the token grid the skips can route around.
    Measured trade-offs on the scenes: docs/transfusion.md.
    """

    def __init__(self, image_shape: Sequence[int], patch: int, dim: int, channels: Sequence[int], *,
                 rngs: nnx.Rngs, blocks: int = 1, skips: bool = False, dtype=jnp.float32,
                 pos_embedding: str = "normal", skip_max_t: int = 0, global_cond: bool = False,
                 in_channels: Optional[int] = None, token_skip: bool = False, mid_blocks: int = 0):
        h, w, c = image_shape
        levels = int(round(math.log2(patch)))
        if 2**levels != patch:
            raise ValueError(f"U-Net patch size must be a power of 2, got {patch}")
        if len(channels) != levels + 1:
            raise ValueError(f"U-Net with patch {patch} needs {levels + 1} channel widths, got {list(channels)}")
        self.image_shape, self.patch = (h, w, c), patch
        self.num_patches = (h // patch) * (w // patch)
        kw = dict(rngs=rngs, dtype=dtype)
        self.temb = TimestepMLP(dim, **kw)
        self.conv_in = Conv(in_channels or c, channels[0], **kw)
        self.down = nnx.List([nnx.List([ResBlock(channels[i], channels[i], dim, **kw) for _ in range(blocks)])
                              for i in range(levels + 1)])
        self.downsample = nnx.List([Conv(channels[i], channels[i + 1], 3, 2, **kw) for i in range(levels)])
        # mid_blocks: conv ResBlocks at the token resolution ahead of the transformer (a classic
        # U-Net's middle), so the token-level skip and the tokens differ by more than a projection.
        self.mid = nnx.List([ResBlock(channels[-1], channels[-1], dim, **kw) for _ in range(mid_blocks)])
        self.to_model = Linear(channels[-1], dim, ("conv", "embed"), use_bias=True, **kw)
        self.pos = position_param(pos_embedding, h // patch, w // patch, dim, rngs)
        self.out_norm = RMSNorm(dim)
        self.from_model = Linear(dim, channels[-1], ("embed", "conv"), use_bias=True, **kw)
        self.global_cond = Linear(dim, dim, ("embed", None), use_bias=True, **kw) if global_cond else None
        self.skips, self.skip_max_t = skips, skip_max_t
        # By default no skip at the token resolution: it would hand the up path the
        # very features the transformer reads, and the model could ignore the text
        # (`token_skip` adds it, for a model that also gets the text by pooled conditioning).
        self.token_skip = bool(skips and token_skip)
        width = lambda i: 2 if skips and (i < levels or self.token_skip) else 1
        self.up = nnx.List([nnx.List([ResBlock(width(i) * channels[i], channels[i], dim, **kw)] +
                                     [ResBlock(channels[i], channels[i], dim, **kw) for _ in range(blocks - 1)])
                            for i in range(levels + 1)])
        self.upsample = nnx.List([Conv(channels[i + 1], channels[i], **kw) for i in range(levels)])
        self.norm_out = GroupNorm(channels[0])
        self.conv_out = Conv(channels[0], c, zero_init=True, **kw)

    def encode(self, x: jax.Array, t: jax.Array, extra: Optional[jax.Array] = None):
        temb = self.temb(t, extra)
        h = self.conv_in(x)
        skips = []
        for i, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, temb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        for block in self.mid:
            h = block(h, temb)
        n, gh, gw, ch = h.shape
        tokens = with_positions(self.to_model(h.reshape(n, gh * gw, ch)), self.pos)
        if self.skips and self.skip_max_t:
            # Above skip_max_t the up path gets no skips: the noisiest steps,
            # where only the text says what to draw, must go through the transformer.
            keep = (t < self.skip_max_t).astype(h.dtype)[:, None, None, None]
            skips = [s * keep for s in skips]
        return tokens + temb[:, None, :], (temb, skips if self.skips else None)

    def decode(self, h: jax.Array, t: jax.Array, context) -> jax.Array:
        del t
        temb, skips = context
        hh, ww, _ = self.image_shape
        g = self.patch
        h = self.out_norm(h)
        if self.global_cond is not None:
            temb = temb + self.global_cond(h.mean(axis=1))
        x = self.from_model(h)
        x = x.reshape(x.shape[0], hh // g, ww // g, x.shape[-1])
        for i in reversed(range(len(self.up))):
            blocks = self.up[i]
            if self.skips and (i < len(self.up) - 1 or self.token_skip):
                x = jnp.concatenate([x, skips[i].astype(x.dtype)], axis=-1)
            x = blocks[0](x, temb)
            for block in blocks[1:]:
                x = block(x, temb)
            if i > 0:
                n, a, b, ch = x.shape
                x = self.upsample[i - 1](jax.image.resize(x, (n, 2 * a, 2 * b, ch), "nearest"))
        return self.conv_out(jax.nn.silu(self.norm_out(x))).astype(jnp.float32)


def make_image_io(kind: str, image_shape, patch: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                  channels: Optional[Sequence[int]] = None, blocks: int = 1, skips: bool = False,
                  pos_embedding: str = "normal", refine_channels: int = 0, refine_blocks: int = 0,
                  skip_max_t: int = 0, global_cond: bool = False, adaptive_out: bool = False,
                  in_channels: Optional[int] = None, token_skip: bool = False, mid_blocks: int = 0):
    if kind == "linear":
        return LinearPatchIO(image_shape, patch, dim, rngs=rngs, dtype=dtype, pos_embedding=pos_embedding,
                             refine_channels=refine_channels, refine_blocks=refine_blocks,
                             adaptive_out=adaptive_out, in_channels=in_channels)
    if kind == "unet":
        return UNetPatchIO(image_shape, patch, dim, channels or [64] * (int(math.log2(patch)) + 1),
                           rngs=rngs, blocks=blocks, skips=skips, dtype=dtype, pos_embedding=pos_embedding,
                           skip_max_t=skip_max_t, global_cond=global_cond, in_channels=in_channels,
                           token_skip=token_skip, mid_blocks=mid_blocks)
    raise ValueError(f"unknown image in/out layers {kind!r}; choose 'linear' or 'unet'")
