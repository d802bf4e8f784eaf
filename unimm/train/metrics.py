"""Progress and metrics: a stdout line with rates and ETA, metrics.jsonl and
TensorBoard event files in the workdir (primary process only)."""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Mapping


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _fmt(v: float) -> str:
    if v == 0 or 1e-3 <= abs(v) < 1e4:
        return f"{v:.4g}"
    return f"{v:.3e}"


class MetricsLogger:
    def __init__(self, workdir, total_steps: int, enabled: bool = True, tensorboard: bool = True):
        self.total_steps, self.enabled = total_steps, enabled
        self.dir = pathlib.Path(workdir)
        self.writer = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter
                    self.writer = SummaryWriter(str(self.dir / "tensorboard"))
                except ImportError:
                    print("tensorboardX is not installed; TensorBoard event files are off")
        self._t0, self._step0 = None, None

    def start(self, step: int):
        self._t0, self._step0 = time.perf_counter(), step

    def rates(self, step: int) -> dict[str, float]:
        if self._t0 is None or step <= self._step0:
            return {}
        elapsed = time.perf_counter() - self._t0
        sps = (step - self._step0) / elapsed
        return {"steps_per_sec": sps, "eta_sec": (self.total_steps - step) / sps if sps > 0 else math.inf}

    def log(self, step: int, metrics: Mapping[str, float]):
        """Write one record; `metrics` should already hold rates (see `rates`)."""
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"train/{k}", float(v), step)
            self.writer.flush()
        shown = [f"{k} {_fmt(v)}" for k, v in metrics.items()
                 if k not in ("steps_per_sec", "eta_sec", "tokens_per_sec", "mfu", "learning_rate")]
        tail = []
        if "learning_rate" in metrics:
            tail.append(f"lr {_fmt(metrics['learning_rate'])}")
        if "steps_per_sec" in metrics:
            tail.append(f"{metrics['steps_per_sec']:.2f} steps/s")
        if "tokens_per_sec" in metrics:
            tail.append(f"{metrics['tokens_per_sec']:,.0f} tok/s")
        if "mfu" in metrics:
            tail.append(f"MFU {100 * metrics['mfu']:.1f}%")
        if "eta_sec" in metrics:
            tail.append(f"ETA {format_duration(metrics['eta_sec'])}")
        print(f"step {step}/{self.total_steps} | " + " ".join(shown) + (" | " + " | ".join(tail) if tail else ""),
              flush=True)

    def log_eval(self, step: int, flat: Mapping[str, float]):
        if self.enabled and self.writer is not None:
            for k, v in flat.items():
                self.writer.add_scalar(f"eval/{k}", float(v), step)
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
