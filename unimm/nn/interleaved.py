"""Interleaved text and image generation over one KV cache, for any recipe.

Each prompt's text is decoded until the model emits the image token (BOI) or
the end of text; where it emitted BOI the recipe draws an image over the cached
prefix, appends it (and its closing token) to the cache, and decoding goes on,
for any number of images per sequence. The recipe supplies three callables
(usually jitted functions of its split model):

    prefill(tokens (B, T), lengths (B,)) -> (logits (B, V), cache)
    decode(cache, logits, start (B,), active (B,), rng, stop_ids) -> (tokens (B, n), lengths (B,), cache)
    draw(cache, boi_position (B,), active (B,), context (B, Lc), rng)
        -> (images (B, ...), logits after the image (B, V), cache, next position (B,))

`draw` receives the image token unfed (decoding never feeds its stop token) at
`boi_position`, and `context`: each row's text since its previous image (the
prompt for the first), -1 padded, for recipes that condition on it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np

from unimm.nn.decoding import pad_rows


@dataclasses.dataclass
class Interleaved:
    """One generated sequence: alternating text (token lists) and images, in order."""

    parts: list = dataclasses.field(default_factory=list)

    @property
    def images(self) -> list:
        return [p for kind, p in self.parts if kind == "image"]

    def texts(self) -> list[list[int]]:
        return [p for kind, p in self.parts if kind == "text"]


def generate(prefill: Callable, decode: Callable, draw: Callable, tokens: np.ndarray, lengths: np.ndarray,
             rng: jax.Array, *, image_token: int, end_token: int, max_images: int) -> list[Interleaved]:
    """Decode the right-padded prompts `tokens` (B, T), drawing an image wherever
    BOI (`image_token`) is emitted, at most `max_images` per row; a row ends at
    `end_token`, when a text segment reaches decode's length limit, or at a BOI
    past its image budget."""
    b = tokens.shape[0]
    logits, cache = prefill(tokens, lengths)
    position = np.asarray(lengths, np.int32).copy()
    context = [list(row[:n]) for row, n in zip(np.asarray(tokens), lengths)]
    out = [Interleaved() for _ in range(b)]
    alive = np.ones(b, bool)
    for round_ in range(max_images + 1):
        rng, r_text, r_image = jax.random.split(rng, 3)
        new, n, cache = decode(cache, logits, position, alive, r_text, (image_token, end_token))
        new, n = np.asarray(new), np.asarray(n)
        wants = np.zeros(b, bool)
        for i in np.flatnonzero(alive):
            text = [int(t) for t in new[i, :n[i]]]
            last = text[-1] if text else None
            if last in (image_token, end_token):
                text = text[:-1]
            out[i].parts.append(("text", text))
            context[i] += text
            wants[i] = last == image_token and round_ < max_images
        position = position + n - 1  # the stop token's slot: it was emitted, not fed
        alive &= wants
        if not alive.any():
            break
        ctx, _ = pad_rows([c if a else [] for c, a in zip(context, alive)], -1, length=max(map(len, context)) or 1)
        images, logits, cache, position = draw(cache, position, alive, ctx, r_image)
        images, position = np.asarray(images), np.asarray(position)
        for i in np.flatnonzero(alive):
            out[i].parts.append(("image", images[i]))
            context[i] = []
    return out

