"""A decoder-only language model whose sequences also hold continuous images
(pixels or autoencoder latents), each at its own noise level: the model of
Transfusion-style recipes (one transformer for text tokens and image patches).

    model = DiffusionLM(dcfg, vocab_size, image_io, num_patches=P, image_shape=(h, w, c), rngs=rngs)
    logits, prediction, cache = model(tokens, meta, images, t, image_start, image_valid)

`image_io` is any pair of image in/out layers (`unimm.nn.image_io`): it maps
an image at time t to P tokens, which replace the P placeholder tokens of the
image's span in the sequence, and the decoder's outputs there back to an image
(the prediction: noise, velocity, ...; what it means is the recipe's choice).
For sampling, `denoise` runs one image's tokens against a cached prefix
read-only, `append_image` adds a clean image to the cache and `text` is the
decoding step.

Optional conditioning of the image path, each measured on the scenes
(docs/transfusion.md): pooled caption features added to the timestep embedding
(`caption_cond`, as Imagen and SD3 add pooled text), DiT's adaLN in every block
(`adaln`; needs `dcfg.cond_dim`), an estimate of the clean image as extra input
channels (`self_cond`, Analog Bits' self-conditioning), 2D RoPE over the patch
grid (`rope_width` > 0).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from unimm.nn import spans
from unimm.nn.attention import KVCache, Meta
from unimm.nn.layers import Embed, Linear
from unimm.nn.transformer import Cond, Decoder, DecoderConfig


class DiffusionLM(nnx.Module):
    def __init__(self, dcfg: DecoderConfig, vocab_size: int, image_io: nnx.Module, *, num_patches: int,
                 image_shape: tuple, rngs: nnx.Rngs, self_cond: bool = False, caption_cond: bool = False,
                 caption_table: bool = False, rope_width: int = 0, autoencoder: Optional[nnx.Module] = None):
        """`caption_table`: caption_cond pools a token table of its own (free of what
        the LM loss asks of the token embeddings) instead of the LM's. `autoencoder`:
        a frozen image autoencoder, kept with the model for diffusion in its latent space."""
        dtype, d = dcfg.compute_dtype, dcfg.d_model
        self.embed = Embed(vocab_size, d, rngs=rngs, dtype=dtype)
        self.image_io = image_io
        self.self_cond = self_cond
        self.decoder = Decoder(dcfg, rngs=rngs)
        self.adaln = bool(dcfg.cond_dim)
        self.caption_in = Linear(d, d, ("embed", None), rngs=rngs, dtype=dtype, use_bias=True) if caption_cond else None
        # Starts at zero: a new model ignores the caption features until training says otherwise.
        self.caption_out = (Linear(d, d, (None, "embed"), rngs=rngs, dtype=dtype, use_bias=True, zero_init=True)
                            if caption_cond else None)
        self.caption_embed = Embed(vocab_size, d, rngs=rngs, dtype=dtype) if caption_cond and caption_table else None
        self.lm_head = Linear(d, vocab_size, ("embed", "vocab"), rngs=rngs, dtype=dtype, use_bias=dcfg.head_bias)
        self.num_patches, self.image_shape, self.rope_width = num_patches, tuple(image_shape), rope_width
        self.autoencoder = autoencoder

    def _image_rope(self, meta: Meta, patch_index) -> Meta:
        """With rope_width > 0, RoPE positions by row and column for the patches."""
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

        Returns (text logits (B, L, V), the image path's output (B, k, H, W, C),
        the cache). caption_ids (B, k, Lc): each image's caption for caption_cond
        (-1 padded; all -1: none). x0_sc (B, k, H, W, C): the self-conditioning
        estimate of the clean images (None: none)."""
        b, length = tokens.shape
        k = images.shape[1]
        extra = self.caption_features(caption_ids)
        extra = None if extra is None else extra.reshape(b * k, -1)
        inp = self.image_input(images, x0_sc)
        img_tokens, ctx = self.image_io.encode(inp.reshape((b * k,) + inp.shape[2:]), t.reshape(-1), extra)
        where = spans.slots(image_start, image_valid, self.num_patches, length)
        x = spans.place(self.embed(tokens), where, img_tokens.reshape(b, k * self.num_patches, -1))
        patch_index, image_index = spans.token_maps(where, self.num_patches, length)
        h, cache = self.decoder(x, self._image_rope(meta, patch_index), cache, update_cache,
                                self._cond(t, image_index, extra))
        logits = self.lm_head(h).astype(jnp.float32)
        h_img = spans.gather(h, where).reshape(b * k, self.num_patches, -1)
        out = self.image_io.decode(h_img, t.reshape(-1), ctx)
        return logits, out.reshape(images.shape), cache

    def denoise(self, x_t, t, meta: Meta, cache: KVCache, extra=None, x0_sc=None):
        """The image path's output for images alone (B, H, W, C) at t (B,), attending
        read-only to a cached prefix; `extra` (B, E): their caption_features, if any;
        x0_sc: the self-conditioning estimate of x0 (None: none)."""
        tokens, ctx = self.image_io.encode(self.image_input(x_t, x0_sc), t, extra)
        h, _ = self.decoder(tokens, self._patches_meta(meta), cache, update_cache=False,
                            cond=self._patches_cond(t, extra))
        return self.image_io.decode(h, t, ctx)

    def append_image(self, x0, meta: Meta, cache: KVCache, extra=None):
        """Add a clean image's tokens (noise level 0) to the cache."""
        t = jnp.zeros(x0.shape[:1], jnp.int32)
        tokens, _ = self.image_io.encode(self.image_input(x0), t, extra)
        return self.decoder(tokens, self._patches_meta(meta), cache, update_cache=True,
                            cond=self._patches_cond(t, extra))[1]

    def text(self, tokens, meta: Meta, cache: KVCache):
        """The decoding step: append text tokens to the cache; logits (B, T, V) at each of them."""
        h, cache = self.decoder(self.embed(tokens), meta, cache, update_cache=True)
        return self.lm_head(h).astype(jnp.float32), cache
