import pytest
from jax.sharding import PartitionSpec as P

from unimm.configs.common import DEFAULT_RULES
from unimm.nn import axes as ax
from unimm.train import mesh as mesh_lib


def test_fill_axis_takes_the_remaining_devices(devices):
    m = mesh_lib.make_mesh({"data": 2, "fsdp": -1, "tensor": 2}, devices)
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("shape, match", [
    ({"data": 3, "fsdp": -1, "tensor": 1}, "do not divide"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, "needs 4 devices but 8"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one -1"),
    ({"data": 0, "fsdp": -1, "tensor": 1}, "positive"),
])
def test_impossible_meshes_are_explained(devices, shape, match):
    with pytest.raises(ValueError, match=match):
        mesh_lib.make_mesh(shape, devices)


def test_rules_map_logical_to_mesh_axes(devices):
    m = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices)
    rules = DEFAULT_RULES
    assert ax.spec(("batch", "length", "act_embed"), rules, (8, 4, 16), m) == P(("data", "fsdp"), None, None)
    assert ax.spec(("embed", "mlp"), rules, (16, 32), m) == P("fsdp", "tensor")
    assert ax.spec(("layers", "embed", "heads", "head_dim"), rules, (2, 16, 4, 8), m) == P(None, "fsdp", "tensor", None)
    # A dim the mesh axes do not divide is replicated rather than failing.
    assert ax.spec(("kv_heads",), rules, (1,), m) == P(None)
    with pytest.raises(KeyError, match="no entry in the sharding rules"):
        ax.spec(("experts",), rules, (4,), m)


def test_batch_must_divide_over_data_axes(devices):
    m = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices)
    with pytest.raises(ValueError, match="multiple of 4"):
        mesh_lib.batch_sharding(m, DEFAULT_RULES, ("batch", "length"), (6, 10))
