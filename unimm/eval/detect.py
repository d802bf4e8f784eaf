"""Find the objects in an image from pixels alone: the checkers' stand-in for a detector.

0. A light Gaussian pre-filter tames pixel noise.
1. Colour: every pixel gets the palette colour nearest in hue, if its hue is
   close enough and its chroma is at least half that colour's chroma. Neutral
   backgrounds have no chroma and do not change hue when mixed in, so the
   chroma threshold keeps pixels the object covers by half or more, whatever the
   background, the anti-aliasing or the blur.
2. Objects: connected components of each colour, small specks dropped.
3. Shape: each component's soft coverage map (chroma / palette chroma, rim
   included) is compared (soft IoU) with every shape template, whose box is
   solved from the map's centroid and variances at a few assumed blur levels;
   the best match names it, or "unknown" if none fits well.
"""

from __future__ import annotations

import colorsys
import dataclasses

import numpy as np
from scipy import ndimage

from unimm.data import vocab
from unimm.data.scenes import Obj, shape_mask

# Templates: triangles in four orientations all count as "triangle".
TEMPLATES = ("circle", "square", "diamond", "triangle_up", "triangle_down", "triangle_left", "triangle_right")


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    hue_tolerance: float = 25.0  # degrees; at most half the gap to the neighbouring hue
    chroma_fraction: float = 0.5  # of the palette colour's chroma
    min_area: float = 0.012  # of the image area: half the smallest scene object (0.024); noise specks are smaller
    min_iou: float = 0.5  # below this a blob has no shape ("unknown")
    # Gaussian pre-filter (px) against pixel noise; the shape fit then assumes
    # at least this much blur. Measured: docs/checkers.md.
    smooth_sigma: float = 0.7
    blur_levels: tuple = (0.5, 0.7, 1.0, 1.25)  # total blur (Gaussian sigma, px) the fit may assume


def _hue_chroma(rgb: np.ndarray):
    """Hue in degrees and chroma in 0..255 of float RGB pixels (..., 3)."""
    mx, mn = rgb.max(-1), rgb.min(-1)
    chroma = mx - mn
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(chroma > 0, chroma, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return (h * 60.0) % 360.0, chroma


def _palette():
    names = list(vocab.COLORS)
    hues, chromas = [], []
    for name in names:
        r, g, b = (c / 255.0 for c in vocab.COLORS[name])
        hues.append(colorsys.rgb_to_hsv(r, g, b)[0] * 360.0)
        chromas.append((max(r, g, b) - min(r, g, b)) * 255.0)
    hues = np.array(hues)
    # Tolerance: half the gap to the nearest other palette hue, capped.
    gaps = np.abs((hues[:, None] - hues[None, :] + 180.0) % 360.0 - 180.0)
    np.fill_diagonal(gaps, 360.0)
    return names, hues, np.array(chromas), gaps.min(1) / 2


PALETTE_NAMES, PALETTE_HUES, PALETTE_CHROMAS, PALETTE_HALF_GAPS = _palette()


def color_labels(image: np.ndarray, cfg: DetectorConfig = DetectorConfig()):
    """Per-pixel palette index of object pixels (-1 for none), the same by hue
    alone (faint pixels included), and chroma."""
    rgb = np.asarray(image, np.float32)
    if cfg.smooth_sigma > 0:
        rgb = ndimage.gaussian_filter(rgb, sigma=(cfg.smooth_sigma, cfg.smooth_sigma, 0))
    hue, chroma = _hue_chroma(rgb)
    dist = np.abs((hue[..., None] - PALETTE_HUES + 180.0) % 360.0 - 180.0)
    label = dist.argmin(-1)
    tol = np.minimum(cfg.hue_tolerance, PALETTE_HALF_GAPS)[label]
    coverage = np.clip(chroma / PALETTE_CHROMAS[label], 0.0, 1.0)
    hue_ok = dist.min(-1) <= tol
    hue_label = np.where(hue_ok, label, -1)
    return np.where(hue_ok & (coverage >= cfg.chroma_fraction), label, -1), hue_label, chroma


def _coverage(shape: str, box, h: int, w: int, supersample: int = 4) -> np.ndarray:
    """Coverage of `shape` in box (x0, y0, x1, y1, pixel units) over an h x w pixel window."""
    x0, y0, x1, y1 = box
    n_y, n_x = h * supersample, w * supersample
    ys = (np.arange(n_y) + 0.5) / supersample
    xs = (np.arange(n_x) + 0.5) / supersample
    u = (xs[None, :] - (x0 + x1) / 2) / max((x1 - x0) / 2, 1e-6)
    v = (ys[:, None] - (y0 + y1) / 2) / max((y1 - y0) / 2, 1e-6)
    m = shape_mask(shape, u, v).astype(np.float32)
    return m.reshape(h, supersample, w, supersample).mean(axis=(1, 3))


def _moments(m: np.ndarray):
    """Mass, centroid (x, y) and variances (x, y) of a coverage map, pixel units."""
    ys, xs = np.mgrid[: m.shape[0], : m.shape[1]] + 0.5
    mass = m.sum()
    cx, cy = (m * xs).sum() / mass, (m * ys).sum() / mass
    # Pixel binning inflates a variance by 1/12 px^2 (Sheppard's correction).
    vx = max((m * (xs - cx) ** 2).sum() / mass - 1 / 12, 1e-3)
    vy = max((m * (ys - cy) ** 2).sum() / mass - 1 / 12, 1e-3)
    return mass, cx, cy, vx, vy


def _shape_constants():
    """Per template: centroid offset and variances in box-local units (box = [-1, 1]^2)."""
    n = 400
    m = {}
    for name in TEMPLATES:
        cov = _coverage(name, (0, 0, n, n), n, n, supersample=1)
        _, cx, cy, vx, vy = _moments(cov)
        half = n / 2
        m[name] = ((cx - half) / half, (cy - half) / half, vx / half**2, vy / half**2)
    return m


SHAPE_CONSTANTS = _shape_constants()


def fit_shape(m: np.ndarray, blur_levels=(0.0,)) -> tuple[str, float, tuple]:
    """Best template for a coverage map: (shape, soft IoU, box in the map's pixels).

    Each template's box is solved from the map's centroid and variances, so
    anti-aliased tips and blurred edges still give the right box size.
    """
    _, cx, cy, vx, vy = _moments(m)
    best = ("unknown", 0.0, (0.0, 0.0, 0.0, 0.0))
    for name in TEMPLATES:
        ox, oy, kx, ky = SHAPE_CONSTANTS[name]
        for sb in blur_levels:
            if min(vx, vy) <= sb * sb * 1.5:
                continue
            # Blur adds its variance to the shape's.
            hw, hh = np.sqrt((vx - sb * sb) / kx), np.sqrt((vy - sb * sb) / ky)
            bx, by = cx - ox * hw, cy - oy * hh
            box = (bx - hw, by - hh, bx + hw, by + hh)
            t = _coverage(name, box, *m.shape)
            if sb > 0:
                t = ndimage.gaussian_filter(t, sb, mode="constant")
            iou = float(np.minimum(t, m).sum() / np.maximum(t, m).sum())
            if iou > best[1]:
                best = (name.partition("_")[0], iou, box)
    return best


def detect(image: np.ndarray, cfg: DetectorConfig = DetectorConfig()) -> list[Obj]:
    """Objects in an RGB image (H, W, 3), uint8 or float in 0..255."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {image.shape}")
    h, w = image.shape[:2]
    labels, hue_label, chroma = color_labels(image, cfg)
    comps = []
    for k in range(len(PALETTE_NAMES)):
        comp, _ = ndimage.label(labels == k, structure=np.ones((3, 3)))
        for i, sl in enumerate(ndimage.find_objects(comp), start=1):
            if (comp[sl] == i).sum() >= cfg.min_area * h * w:
                comps.append((k, comp == i))
    taken = np.zeros((h, w), bool)
    for _, mask in comps:
        taken |= mask
    objects = []
    pad = 2
    for k, mask in comps:
        # The blob plus its faint anti-aliased/blurred rim of the same hue.
        rim = ndimage.binary_dilation(mask, iterations=pad) & ~(taken & ~mask) & (hue_label == k)
        ys, xs = np.nonzero(rim)
        y0, x0 = ys.min(), xs.min()
        window = (slice(y0, ys.max() + 1), slice(x0, xs.max() + 1))
        m = np.where(rim[window], np.clip(chroma[window] / PALETTE_CHROMAS[k], 0, 1), 0.0)
        m = np.where(mask[window], np.maximum(m, cfg.chroma_fraction), m)
        shape, iou, (bx0, by0, bx1, by1) = fit_shape(m, cfg.blur_levels)
        if iou < cfg.min_iou:
            shape = "unknown"
        box = ((bx0 + x0) / w, (by0 + y0) / h, (bx1 + x0) / w, (by1 + y0) / h)
        objects.append(Obj(shape, PALETTE_NAMES[k], tuple(float(v) for v in box)))
    return objects
