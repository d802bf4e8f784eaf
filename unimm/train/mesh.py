"""Device mesh and sharding rules from the config.

config.mesh.shape maps mesh axis names to sizes, e.g. {"data": -1, "fsdp": 1,
"tensor": 1}; one axis may be -1 and takes the devices left over.
config.mesh.rules maps logical axis names to mesh axes (see unimm.nn.axes).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unimm.nn import axes as ax


def resolve_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    sizes = {k: int(v) for k, v in shape.items()}
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        raise ValueError(f"config.mesh.shape={sizes}: sizes must be positive, with at most one -1")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if num_devices % fixed:
            raise ValueError(f"config.mesh.shape={sizes}: the fixed axes ({fixed} devices) do not divide the "
                             f"{num_devices} available devices; choose sizes whose product divides {num_devices}")
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"config.mesh.shape={sizes} needs {fixed} devices but {num_devices} are available; "
                         f"make the product {num_devices}, or set one axis to -1 to take the rest")
    return sizes


def make_mesh(shape: Mapping[str, int], devices: Optional[Sequence] = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_shape(shape, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(tuple(sizes.values()), devices)
    except (ValueError, AssertionError, NotImplementedError):
        grid = np.array(devices).reshape(tuple(sizes.values()))
    return Mesh(grid, tuple(sizes))


def rules_from_config(rules) -> ax.Rules:
    out = []
    for entry in rules:
        name, target = entry
        out.append((name, tuple(target) if isinstance(target, (list, tuple)) else target))
    return tuple(out)


def batch_sharding(mesh: Mesh, rules: ax.Rules, axes: Sequence, shape: Sequence[int]) -> NamedSharding:
    """Sharding of a global batch array; its batch dim must divide evenly."""
    spec = ax.spec(axes, rules)
    first = spec[0] if len(spec) else None
    if first is not None:
        names = (first,) if isinstance(first, str) else first
        n = math.prod(mesh.shape[a] for a in names)
        if shape[0] % n:
            raise ValueError(f"global batch {shape[0]} is not divisible by the {n} devices on mesh axes {names}; "
                             f"set data.batch_size to a multiple of {n}")
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
