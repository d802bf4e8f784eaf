"""Evaluation with the scene checkers, for any recipe that draws and describes images.

Generation: the recipe draws images for the versioned prompt set (a balanced
plan of `eval.images_per_category` per GenEval category), scored from pixels.
Understanding: it captions eval-split scenes (caption truth, exact match,
attribute recall) and, if it answers questions, VQA accuracy and POPE.

Every evaluation writes <workdir>/eval/step_<N>.json, appends the same record
to <workdir>/eval.jsonl, and saves a PNG grid of samples with their prompts.
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional

import jax
import numpy as np

from unimm.data.grid import make_grid
from unimm.data.pipeline import EvalSet
from unimm.data.scenes import Obj
from unimm.eval import geneval, prompts as prompts_lib
from unimm.eval import understanding


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _objects(example) -> list[Obj]:
    return [Obj(o["shape"], o["color"], tuple(o["box"])) for o in example["scene"]["objects"]]


def evaluate_scenes(objective, model, config, step: int, rng: jax.Array, workdir: Optional[str] = None) -> dict:
    e = config.eval
    bs = e.batch_size
    r_gen, r_cap, r_vqa = jax.random.split(rng, 3)

    plan = prompts_lib.plan(e.images_per_category, e.get("prompt_version", prompts_lib.LATEST))
    images = []
    for i, chunk in enumerate(_batches(plan, bs)):
        images.append(objective.generate_images(model, [p["prompt"] for p, _ in chunk], jax.random.fold_in(r_gen, i)))
    images = np.concatenate(images)
    results = []
    for (entry, k), img in zip(plan, images):
        ok, reason = geneval.score_image(entry["spec"], img)
        results.append({"id": entry["id"], "sample": k, "category": entry["category"], "prompt": entry["prompt"],
                        "passed": ok, "reason": reason})
    record = {"step": step, "geneval": geneval.summarize(results)}

    evalset = EvalSet.make(config.data, objective.resolution, e.num_understanding)
    exs = evalset.examples
    if e.num_understanding:
        captions = []
        for i, chunk in enumerate(_batches(exs, bs)):
            captions += objective.caption_images(model, np.stack([x["image"] for x in chunk]),
                                                 jax.random.fold_in(r_cap, i))
        record["captions"] = understanding.caption_scores(captions, [x["caption"] for x in exs],
                                                          [_objects(x) for x in exs])
        record["caption_samples"] = [{"reference": x["caption"], "generated": c} for x, c in zip(exs[:8], captions)]
        qa = [(x, q) for x in exs for q in x["qa"]][: e.get("max_questions", 512)]
        answers = None
        for i, chunk in enumerate(_batches(qa, bs)):
            out = objective.answer_questions(model, np.stack([x["image"] for x, _ in chunk]),
                                             [q["question"] for _, q in chunk], jax.random.fold_in(r_vqa, i))
            if out is None:
                break
            answers = (answers or []) + list(out)
        if answers is not None:
            recs = [{"kind": q["kind"], "answer": q["answer"], "prediction": a} for (_, q), a in zip(qa, answers)]
            record["vqa"] = understanding.vqa_scores(recs)
            record["pope"] = understanding.pope_scores(recs)

    if workdir is not None and jax.process_index() == 0:
        write_record(pathlib.Path(workdir), step, record, images=results)
        _write_grid(results, images, pathlib.Path(workdir), step, e.get("grid_size", 36))
    return record


def flatten(record: dict) -> dict[str, float]:
    """Scalar view of an eval record, for logs and TensorBoard."""
    flat = {"geneval/overall": record["geneval"]["overall"]}
    flat.update({f"geneval/{c}": v["accuracy"] for c, v in record["geneval"]["categories"].items()})
    for section in ("captions", "vqa"):
        for k, v in record.get(section, {}).items():
            if isinstance(v, (int, float)) and k != "n":
                flat[f"{section}/{k}"] = v
    for split, v in record.get("pope", {}).items():
        if isinstance(v, dict):
            flat[f"pope/{split}_f1"], flat[f"pope/{split}_accuracy"] = v["f1"], v["accuracy"]
    return flat


def format_record(record: dict) -> str:
    lines = [geneval.format_table(record["geneval"])]
    if "captions" in record:
        c = record["captions"]
        lines.append(f"captions: true {c['true']:.3f}  exact {c['exact']:.3f}  attribute recall "
                     f"{c['attribute_recall']:.3f}  parsed {c['parsed']:.3f}  (n={c['n']})")
    if "vqa" in record:
        lines.append(f"vqa: accuracy {record['vqa']['accuracy']:.3f} " +
                     " ".join(f"{k} {v:.2f}" for k, v in record["vqa"]["kinds"].items()))
    if "pope" in record:
        p = record["pope"]
        lines.append("pope: " + " ".join(f"{k} F1 {v['f1']:.3f} acc {v['accuracy']:.3f}"
                                         for k, v in p.items() if isinstance(v, dict)))
    return "\n".join(lines)


def write_record(workdir: pathlib.Path, step: int, record: dict, **details) -> None:
    """<workdir>/eval/step_<N>.json (record plus details) and a line in <workdir>/eval.jsonl."""
    (workdir / "eval").mkdir(parents=True, exist_ok=True)
    (workdir / "eval" / f"step_{step:06d}.json").write_text(json.dumps(dict(record, **details), indent=1))
    with open(workdir / "eval.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _write_grid(results, images, workdir: pathlib.Path, step: int, grid_size: int):
    (workdir / "samples").mkdir(parents=True, exist_ok=True)
    # One row per category in the grid, so every category is visible.
    picks, per_cat = [], max(1, grid_size // 6)
    for cat in {r["category"]: None for r in results}:
        picks += [i for i, r in enumerate(results) if r["category"] == cat][:per_cat]
    captions = [("ok " if results[i]["passed"] else "X ") + results[i]["prompt"] for i in picks]
    make_grid([images[i] for i in picks], captions, cols=per_cat).save(
        workdir / "samples" / f"step_{step:06d}.png")
