"""Matmul peak measured in-process, the denominator of MFU.

Every device of the mesh multiplies square matrices of the training dtype at
once; the best of a few timed runs gives the FLOP/s the hardware actually
delivers to XLA here (on a CPU, fake devices share the same cores)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def matmul_peak(dtype, devices=None, size: int | None = None, repeats: int = 5) -> float:
    devices = list(devices if devices is not None else jax.devices())
    n = size or (1024 if devices[0].platform == "cpu" else 8192)
    mesh = Mesh(np.array(devices), ("d",))
    sh = NamedSharding(mesh, PartitionSpec("d"))
    a = jax.device_put(jnp.ones((len(devices), n, n), dtype), sh)
    f = jax.jit(lambda x, y: jnp.einsum("bij,bjk->bik", x, y, preferred_element_type=dtype), out_shardings=sh)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return len(devices) * 2.0 * n**3 / best
