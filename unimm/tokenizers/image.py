"""Discrete image tokenizer: conv encoder -> quantizer (VQ or LFQ) -> conv decoder.

    tok = ImageTokenizer(ImageTokenizerSettings(quantizer="lfq", codebook_size=256), rngs=nnx.Rngs(0))
    codes = tok.tokenize(images)      # uint8 (N, H, W, 3) -> int32 (N, h*w), row-major
    images = tok.detokenize(codes)    # -> float (N, H, W, 3) in [-1, 1]

The spatial factor is 2^(len(channels) - 1); a recipe puts the codes into its
vocabulary. Trained by `unimm.objectives.image_tokenizer` (configs/vq_tiny.py).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from unimm.nn import pixels
from unimm.nn.autoencoder import Decoder, Encoder, PatchEncoder
from unimm.nn.quantizers import LookupFreeQuantizer, VectorQuantizer

QUANTIZERS = ("vq", "lfq")
ENCODERS = ("conv", "patch")


@dataclasses.dataclass(frozen=True)
class ImageTokenizerSettings:
    resolution: int = 32
    channels: tuple = (32, 64, 128)
    blocks: int = 1
    encoder: str = "conv"  # conv (ResBlock levels) | patch (each code sees only its own tile: PatchEncoder)
    quantizer: str = "vq"  # vq | lfq
    codebook_size: int = 256  # lfq: a power of two (2^bits codes)
    code_dim: int = 16  # vq only; LFQ's code dimension is its number of bits
    beta: float = 0.25  # commitment weight
    ema_decay: float = 0.99  # vq: 0 trains the codebook by gradient (straight-through), else EMA
    restart_threshold: float = 0.03  # vq: restart codes used less than this fraction of a uniform share
    usage_decay: float = 0.9  # of the running code shares: dead codes are found within tens of steps
    entropy_weight: float = 0.1  # lfq
    diversity_weight: float = 1.0  # lfq
    temperature: float = 0.1  # lfq

    def __post_init__(self):
        if self.encoder not in ENCODERS:
            raise ValueError(f"image tokenizer encoder={self.encoder!r}; choose from {ENCODERS}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer={self.quantizer!r}; choose from {QUANTIZERS}")
        if self.quantizer == "lfq" and (self.codebook_size < 2 or self.codebook_size & (self.codebook_size - 1)):
            raise ValueError(f"LFQ needs a power-of-two codebook_size (2^bits codes), got {self.codebook_size}")
        f = self.downsample
        if self.resolution % f:
            raise ValueError(f"image resolution {self.resolution} is not divisible by the tokenizer's "
                             f"downsampling factor {f} (2^(len(channels)-1))")

    @classmethod
    def from_dict(cls, d: dict, resolution: int) -> "ImageTokenizerSettings":
        known = {f.name for f in dataclasses.fields(cls)} - {"resolution"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown image tokenizer settings {unknown}; known: {sorted(known)}")
        d = dict(d)
        if "channels" in d:
            d["channels"] = tuple(d["channels"])
        return cls(resolution=resolution, **d)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def grid(self) -> int:
        """Tokens per image side."""
        return self.resolution // self.downsample

    @property
    def num_tokens(self) -> int:
        return self.grid**2

    @property
    def dim(self) -> int:
        return int(math.log2(self.codebook_size)) if self.quantizer == "lfq" else self.code_dim


class ImageTokenizer(nnx.Module):
    def __init__(self, s: ImageTokenizerSettings, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.s = s
        if s.encoder == "patch":
            # Its whole depth is pointwise blocks at the last level's width: one more than `blocks`.
            self.encoder = PatchEncoder(3, s.downsample, s.channels[-1], s.dim, rngs=rngs, blocks=s.blocks + 1,
                                        dtype=dtype)
        else:
            self.encoder = Encoder(3, s.channels, s.dim, rngs=rngs, blocks=s.blocks, dtype=dtype)
        self.decoder = Decoder(s.dim, s.channels, 3, rngs=rngs, blocks=s.blocks, dtype=dtype)
        if s.quantizer == "vq":
            self.quantizer = VectorQuantizer(s.codebook_size, s.dim, rngs=rngs, beta=s.beta, ema_decay=s.ema_decay,
                                             restart_threshold=s.restart_threshold, usage_decay=s.usage_decay)
        else:
            self.quantizer = LookupFreeQuantizer(s.dim, beta=s.beta, entropy_weight=s.entropy_weight,
                                                 diversity_weight=s.diversity_weight, temperature=s.temperature)

    def __call__(self, x: jax.Array, *, train: bool = False, rng=None):
        """Images in [-1, 1] (N, H, W, 3) -> (reconstruction, codes (N, h, w), quantizer aux)."""
        q, codes, aux = self.quantizer(self.encoder(x), train=train, rng=rng)
        return self.decoder(q), codes, aux

    def tokenize(self, images: jax.Array) -> jax.Array:
        """uint8 images (N, H, W, 3) -> codes (N, h*w), row-major."""
        x = pixels.to_signed(images)
        codes = self.quantizer.codes(self.encoder(x))
        return codes.reshape(codes.shape[0], -1)

    def detokenize(self, codes: jax.Array) -> jax.Array:
        """Codes (N, h*w) -> images in [-1, 1] (N, H, W, 3)."""
        g = self.s.grid
        return self.decoder(self.quantizer.lookup(codes.reshape(codes.shape[0], g, g)))
