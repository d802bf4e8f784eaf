"""Image grids with captions, as PNG: for looking at data and at samples."""

from __future__ import annotations

import math
import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def make_grid(
    images: Sequence[np.ndarray],
    captions: Sequence[str] | None = None,
    cols: int | None = None,
    tile: int = 128,
    font_size: int = 11,
    caption_lines: int = 4,
) -> Image.Image:
    """Tile RGB images (H, W, 3; uint8, or float in [0, 1]) scaled to `tile` px, each
    with its caption underneath, wrapped to `caption_lines` lines."""
    if len(images) == 0:
        raise ValueError("make_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    font = _font(font_size)
    line_h = font_size + 2
    text_h = (caption_lines * line_h + 4) if captions else 0
    pad = 4
    cell_w, cell_h = tile + pad, tile + text_h + pad
    canvas = Image.new("RGB", (cols * cell_w + pad, rows * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    chars = max(8, int(tile / (font_size * 0.55)))
    for i, img in enumerate(images):
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            arr = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
        x, y = pad + (i % cols) * cell_w, pad + (i // cols) * cell_h
        canvas.paste(Image.fromarray(arr).resize((tile, tile), Image.NEAREST), (x, y))
        if captions:
            lines = textwrap.wrap(captions[i], chars)[:caption_lines]
            for j, line in enumerate(lines):
                draw.text((x, y + tile + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
    return canvas
