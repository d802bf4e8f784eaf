"""Scoring understanding: VQA answers, POPE probes and captions against scene truth.

- VQA: exact match after normalisation ("3" and "Three." both read "three"),
  per question kind and overall.
- POPE: accuracy, precision, recall, F1 and yes-ratio of yes/no answers, per
  negative-sampling split (random, adversarial), as in the POPE paper.
- Captions: a generated caption is parsed with the scene grammar; it is *true*
  if the ground-truth scene satisfies it (every object it names is there, counts
  exact), *exact* if it equals the reference, and its attribute recall is the
  fraction of the reference's attributes (shapes, colours, counts, relation) it
  states.
"""

from __future__ import annotations

import collections
import re
from typing import Iterable, Sequence

import numpy as np

from unimm.data import spec as spec_lib
from unimm.data import vocab
from unimm.data.scenes import Obj
from unimm.eval.rules import check

POPE_KINDS = ("pope_random", "pope_adversarial")
_DIGITS = {str(i): w for i, w in enumerate(vocab.NUMBER_WORDS)}


def normalize_answer(text: str) -> str:
    text = re.sub(r"[^a-z0-9 ]", " ", text.lower().replace("colour", "color"))
    words = [_DIGITS.get(w, w) for w in text.split() if w not in ("a", "an", "the")]
    return " ".join(words)


def vqa_scores(records: Iterable[dict]) -> dict:
    """Exact-match accuracy of dicts with 'kind', 'answer', 'prediction' (POPE kinds excluded)."""
    by_kind = collections.defaultdict(list)
    for r in records:
        if r["kind"] in POPE_KINDS:
            continue
        by_kind[r["kind"]].append(normalize_answer(r["prediction"]) == normalize_answer(r["answer"]))
    kinds = {k: float(np.mean(v)) for k, v in sorted(by_kind.items())}
    flat = [x for v in by_kind.values() for x in v]
    return {"accuracy": float(np.mean(flat)) if flat else float("nan"), "kinds": kinds, "n": len(flat)}


def _yes_no(text: str) -> str | None:
    words = normalize_answer(text).split()
    return words[0] if words and words[0] in ("yes", "no") else None


def pope_scores(records: Iterable[dict]) -> dict:
    """POPE metrics per split; an answer that is neither yes nor no counts as wrong
    (a 'no' for precision/recall, as POPE's evaluation script reads it)."""
    by_kind = collections.defaultdict(list)
    for r in records:
        if r["kind"] in POPE_KINDS:
            by_kind[r["kind"]].append((normalize_answer(r["answer"]) == "yes", _yes_no(r["prediction"])))
    out = {}
    for kind, pairs in sorted(by_kind.items()):
        truth = np.array([t for t, _ in pairs])
        said_yes = np.array([p == "yes" for _, p in pairs])
        correct = np.array([(p == "yes") == t and p is not None for t, p in pairs])
        tp = int((said_yes & truth).sum())
        precision = tp / max(int(said_yes.sum()), 1)
        recall = tp / max(int(truth.sum()), 1)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        out[kind.removeprefix("pope_")] = {
            "accuracy": float(correct.mean()), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": float(said_yes.mean()), "n": len(pairs),
        }
    if out:
        splits = list(out.values())
        out["mean_f1"] = float(np.mean([v["f1"] for v in splits]))
        out["mean_accuracy"] = float(np.mean([v["accuracy"] for v in splits]))
    return out


def _attributes(spec: spec_lib.Spec) -> collections.Counter:
    attrs = collections.Counter()
    for g in spec.groups:
        attrs[("shape", g.shape)] += 1
        attrs[("count", g.shape, g.count)] += g.count > 1
        if g.color:
            attrs[("color", g.color, g.shape)] += 1
    if spec.relation:
        attrs[("relation", spec.groups[0].shape, spec.relation, spec.groups[1].shape)] += 1
    return +attrs


def caption_scores(predictions: Sequence[str], references: Sequence[str],
                   scenes: Sequence[Sequence[Obj]]) -> dict:
    """Caption truth, exact match and attribute recall; see the module docstring."""
    if not len(predictions) == len(references) == len(scenes):
        raise ValueError("predictions, references and scenes must have the same length")
    parsed = true = exact = 0
    recalls = []
    for pred, ref, objs in zip(predictions, references, scenes):
        ref_attrs = _attributes(spec_lib.parse_caption(ref))
        exact += spec_lib.normalize_text(pred) == spec_lib.normalize_text(ref)
        try:
            spec = spec_lib.parse_caption(pred)
        except spec_lib.CaptionError:
            recalls.append(0.0)
            continue
        parsed += 1
        true += check(spec, objs)[0]
        recalls.append(sum((_attributes(spec) & ref_attrs).values()) / sum(ref_attrs.values()))
    n = max(len(predictions), 1)
    return {"parsed": parsed / n, "true": true / n, "exact": exact / n,
            "attribute_recall": float(np.mean(recalls)) if recalls else float("nan"), "n": len(predictions)}
