"""Benchmark the jitted train step of any config.

    python -m unimm.bench --config=configs/transfusion_tiny.py [--steps=10] [--json]

Compiles the step ahead of time (reporting compile time and the compiler's
memory analysis), then times `--steps` steps on one batch (data loading
excluded; real scenes, or random full-length sequences if data.source is
"synthetic") and prints step time, tokens/s, the analytic model FLOPs per step
(matmuls and attention over the pairs the mask allows) and MFU against a
matmul peak measured in this process for the training dtype.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from unimm.cli import parse_flags

from unimm.train.peak import matmul_peak
from unimm.train.trainer import Trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")


def benchmark(config, steps: int = 10) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(config, tmp)
        state = tr.init_state(load_pretrained=False)  # frozen parts (tokenizers) at their random init
        step_fn = tr.make_step(state)
        if config.data.source == "synthetic":
            local = tr.objective.synthetic_batch(config.data.batch_size // jax.process_count(), config.seed)
        else:
            local = next(tr.data_iterator())
        batch = tr.global_batch(local)
        rng = tr.step_rng(0)

        t = time.perf_counter()
        compiled = step_fn.lower(state.params, state.opt_state, batch, rng).compile()
        compile_s = time.perf_counter() - t
        mem = compiled.memory_analysis()

        params, opt = state.params, state.opt_state
        params, opt, metrics = compiled(params, opt, batch, rng)  # warm-up
        jax.block_until_ready(metrics)
        times = []
        for i in range(steps):
            t = time.perf_counter()
            params, opt, metrics = compiled(params, opt, batch, tr.step_rng(i + 1))
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)

        flops = tr.objective.flops_per_batch(local) * jax.process_count()
        tokens = tr.objective.tokens_per_batch(local) * jax.process_count()
        devices = tr.mesh.devices.flatten()
        peak = matmul_peak(tr.objective.compute_dtype, devices)
        step_s = float(np.median(times))
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        out = {
            "objective": tr.objective.name, "params": n_params, "dtype": jax.numpy.dtype(tr.objective.compute_dtype).name,
            "batch_size": int(config.data.batch_size), "mesh": dict(tr.mesh.shape), "devices": len(devices),
            "platform": devices[0].platform, "compile_s": compile_s, "step_s": step_s,
            "step_s_mean": float(np.mean(times)), "steps_per_s": 1 / step_s, "tokens_per_step": tokens,
            "tokens_per_s": tokens / step_s, "model_flops_per_step": flops, "achieved_flops_per_s": flops / step_s,
            "matmul_peak_flops_per_s": peak, "mfu": flops / step_s / peak, "loss": float(metrics["loss"]),
        }
        if mem is not None:
            out["memory_bytes"] = {k: int(getattr(mem, k)) for k in
                                   ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                                    "generated_code_size_in_bytes") if hasattr(mem, k)}
        return out


def format_report(r: dict) -> str:
    lines = [
        f"{r['objective']}: {r['params']:,} params, {r['dtype']}, batch {r['batch_size']}, "
        f"mesh {r['mesh']} ({r['devices']} {r['platform']} devices)",
        f"compile           {r['compile_s']:.1f} s",
        f"step time         {1000 * r['step_s']:.1f} ms (median; mean {1000 * r['step_s_mean']:.1f} ms)",
        f"tokens/s          {r['tokens_per_s']:,.0f}  ({r['tokens_per_step']:,} tokens/step)",
        f"model FLOPs/step  {r['model_flops_per_step'] / 1e9:,.1f} GFLOP",
        f"achieved          {r['achieved_flops_per_s'] / 1e9:,.1f} GFLOP/s",
        f"matmul peak       {r['matmul_peak_flops_per_s'] / 1e9:,.1f} GFLOP/s ({r['dtype']}, measured here)",
        f"MFU               {100 * r['mfu']:.1f}%",
    ]
    if "memory_bytes" in r:
        m = r["memory_bytes"]
        lines.append("memory (per device)  " + ", ".join(f"{k.replace('_size_in_bytes', '')} {v / 2**20:,.1f} MiB"
                                                        for k, v in m.items()))
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required")
    try:
        r = benchmark(_CONFIG.value, _STEPS.value)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r) if _JSON.value else format_report(r))
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
