"""GenEval-style scoring of generated images, from pixels alone.

A prompt's spec and an image give pass/fail: `detect` finds the objects,
`rules.check` applies GenEval's rules. A run reports per-category accuracy and
their mean ("overall"), like GenEval's table.

Score a folder of PNGs named by prompt id ('color_attr-017.png', further
samples 'color_attr-017_1.png', ...):

    python -m unimm.eval.geneval --images DIR [--json] [--version v1]
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from unimm.data import spec as spec_lib
from unimm.data.spec import Spec
from unimm.eval import prompts as prompts_lib
from unimm.eval.detect import detect
from unimm.eval.rules import check


def score_image(spec: Spec | dict, image: np.ndarray) -> tuple[bool, str]:
    """(passed, reason) for one generated image (H, W, 3; uint8, or float in [0, 1])."""
    if isinstance(spec, dict):
        spec = Spec.from_dict(spec)
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(image.astype(np.float32) * 255.0, 0.0, 255.0)
    return check(spec, detect(image))


def summarize(results: Iterable[dict]) -> dict:
    """Per-category accuracy and overall mean from dicts with 'category' and 'passed'.

    The overall score is the mean of the category accuracies (GenEval's), over
    categories that have images.
    """
    by_cat = collections.defaultdict(list)
    for r in results:
        by_cat[r["category"]].append(bool(r["passed"]))
    cats = {c: {"accuracy": float(np.mean(v)), "n": len(v)} for c, v in by_cat.items()}
    ordered = {c: cats[c] for c in spec_lib.CATEGORIES if c in cats}
    ordered.update({c: v for c, v in cats.items() if c not in ordered})
    overall = float(np.mean([v["accuracy"] for v in ordered.values()])) if ordered else float("nan")
    return {"overall": overall, "categories": ordered, "n": sum(v["n"] for v in ordered.values())}


def format_table(summary: dict) -> str:
    lines = [f"{'category':<16}{'accuracy':>10}{'images':>8}"]
    for cat, v in summary["categories"].items():
        lines.append(f"{cat:<16}{v['accuracy']:>10.3f}{v['n']:>8d}")
    lines.append(f"{'overall':<16}{summary['overall']:>10.3f}{summary['n']:>8d}")
    return "\n".join(lines)


def _load_png(path: pathlib.Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e


def score_folder(folder: str | pathlib.Path, version: str = prompts_lib.LATEST) -> tuple[dict, list[dict]]:
    """Score every PNG in `folder` named by a prompt id of the prompt set.

    Returns (summary, per-image results). Files that name no prompt, and images
    that cannot be read, are reported in the results with an error and count
    as failures only if they name a prompt.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {folder}: no such directory")
    table = prompts_lib.by_id(version)
    results, skipped = [], []
    for p in sorted(folder.glob("*.png")):
        m = prompts_lib.ID_RE.match(p.stem)
        if not m or m.group("id") not in table:
            skipped.append(p.name)
            continue
        entry = table[m.group("id")]
        r = {"file": p.name, "id": entry["id"], "category": entry["category"], "prompt": entry["prompt"]}
        try:
            r["passed"], r["reason"] = score_image(entry["spec"], _load_png(p))
        except ValueError as e:
            r["passed"], r["reason"] = False, f"error: {e}"
        results.append(r)
    if not results:
        raise ValueError(
            f"{folder}: no PNG named by a prompt id of prompt set {version} "
            f"(expected names like 'colors-003.png' or 'colors-003_1.png'; {len(skipped)} other PNGs)"
        )
    summary = summarize(results)
    summary.update(version=version, skipped=skipped)
    return summary, results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score generated PNGs (named by prompt id) with the scene checker.")
    parser.add_argument("--images", required=True, help="folder of PNGs named <prompt id>[_<sample>].png")
    parser.add_argument("--version", default=prompts_lib.LATEST, help="prompt set version")
    parser.add_argument("--json", action="store_true", help="print a JSON result (summary and per-image)")
    parser.add_argument("--failures", action="store_true", help="also list failed images with the reason")
    args = parser.parse_args(argv)
    try:
        summary, results = score_folder(args.images, args.version)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"summary": summary, "results": results}, indent=1))
        return 0
    print(format_table(summary))
    if summary["skipped"]:
        print(f"({len(summary['skipped'])} PNGs named by no prompt id were skipped)")
    if args.failures:
        for r in results:
            if not r["passed"]:
                print(f"  {r['file']}: {r['prompt']!r}: {r['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
