"""Convolutional image autoencoder: encoder and decoder of ResBlocks with 2x
down/upsampling per level, and a bottleneck chosen by the user.

`channels[i]` is the width at level i; there are len(channels) - 1 downsamplings,
so the spatial factor is 2^(len(channels) - 1). The encoder outputs
`latent_channels` (or twice that for a diagonal Gaussian).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unimm.nn.image_io import Conv, GroupNorm, ResBlock
from unimm.nn.layers import RMSNorm


class Encoder(nnx.Module):
    def __init__(self, in_channels: int, channels: Sequence[int], out_channels: int, *, rngs: nnx.Rngs,
                 blocks: int = 1, dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype)
        self.conv_in = Conv(in_channels, channels[0], **kw)
        self.levels = nnx.List([nnx.List([ResBlock(channels[i], channels[i], **kw) for _ in range(blocks)])
                                for i in range(len(channels))])
        self.down = nnx.List([Conv(channels[i], channels[i + 1], 3, 2, **kw) for i in range(len(channels) - 1)])
        self.mid = ResBlock(channels[-1], channels[-1], **kw)
        self.norm_out = GroupNorm(channels[-1])
        self.conv_out = Conv(channels[-1], out_channels, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for i, blocks in enumerate(self.levels):
            for block in blocks:
                h = block(h)
            if i < len(self.down):
                h = self.down[i](h)
        h = self.mid(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h))).astype(jnp.float32)


class PatchEncoder(nnx.Module):
    """Each `patch` x `patch` tile -> one vector, from that tile's pixels alone: a
    strided conv (kernel = stride = patch) then pointwise residual MLP blocks with
    per-position RMSNorm. Equal tiles get equal vectors, so a discrete tokenizer
    gives a blank tile one code wherever it lies; a conv encoder's receptive
    field and GroupNorm (statistics over the whole image) make a tile's vector
    depend on its neighbours and on the rest of the image."""

    def __init__(self, in_channels: int, patch: int, width: int, out_channels: int, *, rngs: nnx.Rngs,
                 blocks: int = 1, dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype)
        self.conv_in = Conv(in_channels, width, patch, patch, **kw)
        self.norms = nnx.List([RMSNorm(width, axis_name="conv") for _ in range(blocks)])
        self.fc1 = nnx.List([Conv(width, 2 * width, 1, **kw) for _ in range(blocks)])
        self.fc2 = nnx.List([Conv(2 * width, width, 1, zero_init=True, **kw) for _ in range(blocks)])
        self.norm_out = RMSNorm(width, axis_name="conv")
        self.conv_out = Conv(width, out_channels, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for norm, fc1, fc2 in zip(self.norms, self.fc1, self.fc2):
            h = h + fc2(jax.nn.silu(fc1(norm(h))))
        return self.conv_out(jax.nn.silu(self.norm_out(h))).astype(jnp.float32)


class Decoder(nnx.Module):
    def __init__(self, latent_channels: int, channels: Sequence[int], out_channels: int, *, rngs: nnx.Rngs,
                 blocks: int = 1, dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype)
        self.conv_in = Conv(latent_channels, channels[-1], **kw)
        self.mid = ResBlock(channels[-1], channels[-1], **kw)
        self.levels = nnx.List([nnx.List([ResBlock(channels[i], channels[i], **kw) for _ in range(blocks)])
                                for i in range(len(channels))])
        self.up = nnx.List([Conv(channels[i + 1], channels[i], **kw) for i in range(len(channels) - 1)])
        self.norm_out = GroupNorm(channels[0])
        self.conv_out = Conv(channels[0], out_channels, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.levels))):
            for block in self.levels[i]:
                h = block(h)
            if i > 0:
                n, a, b, c = h.shape
                h = self.up[i - 1](jax.image.resize(h, (n, 2 * a, 2 * b, c), "nearest"))
        return self.conv_out(jax.nn.silu(self.norm_out(h))).astype(jnp.float32)


def gaussian_sample(moments: jax.Array, rng: jax.Array):
    """Split (..., 2C) into mean and log-variance; return (sample, mean, KL per example)."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    logvar = jnp.clip(logvar, -30.0, 20.0)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    kl = 0.5 * jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=tuple(range(1, mean.ndim)))
    return z, mean, kl


class KLAutoencoder(nnx.Module):
    """The KL-regularised autoencoder of latent diffusion (SD's VAE), small or large."""

    def __init__(self, channels: Sequence[int], latent_channels: int, *, rngs: nnx.Rngs, image_channels: int = 3,
                 blocks: int = 1, dtype=jnp.float32):
        self.encoder = Encoder(image_channels, channels, 2 * latent_channels, rngs=rngs, blocks=blocks, dtype=dtype)
        self.decoder = Decoder(latent_channels, channels, image_channels, rngs=rngs, blocks=blocks, dtype=dtype)
        self.downsample = 2 ** (len(channels) - 1)

    def encode(self, x: jax.Array, rng=None):
        """Images in [-1, 1] -> (latent, mean, KL); the latent is the mean without `rng`."""
        moments = self.encoder(x)
        if rng is None:
            mean = jnp.split(moments, 2, axis=-1)[0]
            return mean, mean, jnp.zeros(x.shape[:1])
        return gaussian_sample(moments, rng)

    def decode(self, z: jax.Array) -> jax.Array:
        return self.decoder(z)
