"""Text-only documents about a scene, in the scene grammar: its caption, then
questions about it with their answers ("a red circle, what color is the
circle? red, is there a blue square in the image? no").

Recipes that mix text-only documents into training (Transfusion's 50% text)
draw them here on the embedded data; every word is one the shipped scene
tokenizer knows (sentences are joined by commas: it has no full stop).
"""

from __future__ import annotations

import numpy as np


def sentences(example: dict, rng: np.random.Generator) -> list[str]:
    """The caption, then the scene's questions with their answers, in a random order."""
    qa = list(example.get("qa") or [])
    order = rng.permutation(len(qa))
    return [example["caption"]] + [f"{qa[i]['question']} {qa[i]['answer']}" for i in order]


def document(example: dict, rng: np.random.Generator, fits) -> str:
    """As many of `sentences` as `fits(text)` accepts, joined by commas (the caption always)."""
    parts = sentences(example, rng)
    text = parts[0]
    for part in parts[1:]:
        longer = f"{text}, {part}"
        if not fits(longer):
            break
        text = longer
    return text
