"""The sharded train step on 8 fake devices equals the single-device step."""

import jax
import numpy as np
import pytest
from flax import nnx

from unimm.nn import axes as ax
from unimm.train.trainer import Trainer


def _loss_and_grads(config, devices, workdir):
    tr = Trainer(config, workdir, devices=devices)
    st = tr.init_state(with_optimizer=False)
    local = next(tr.data_iterator())
    batch = tr.global_batch(local)

    def f(params, batch, rng):
        with ax.sharding_context(tr.mesh, tr.rules):
            return jax.value_and_grad(lambda p: tr.objective.loss(nnx.merge(st.graphdef, p), batch, rng),
                                      has_aux=True)(params)

    fn = jax.jit(f, in_shardings=(st.param_shardings, tr.batch_shardings, tr.replicated),
                 out_shardings=((tr.replicated, tr.replicated), st.param_shardings))
    (loss, _), grads = fn(st.params, batch, tr.step_rng(0))
    return tr, st, float(loss), grads


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.fixture(scope="module")
def runs(tiny_config, devices, tmp_path_factory):
    single = tiny_config.copy_and_resolve_references()
    single.mesh.shape.update(data=1, fsdp=1, tensor=1)
    sharded = tiny_config.copy_and_resolve_references()
    sharded.mesh.shape.update(data=2, fsdp=2, tensor=2)
    one = _loss_and_grads(single, devices[:1], tmp_path_factory.mktemp("one"))
    eight = _loss_and_grads(sharded, devices, tmp_path_factory.mktemp("eight"))
    return one, eight


def test_parameters_are_really_sharded(runs):
    _, (tr, st, _, grads) = runs
    kernel = st.params["decoder"]["blocks"]["mlp"]["wi"]["kernel"]  # (layers, embed, 2, mlp)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor")
    assert kernel.addressable_shards[0].data.shape == (2, 16, 2, 32)
    assert len(tr.mesh.devices.flatten()) == 8


def test_same_loss_and_gradients_as_one_device(runs):
    (_, _, loss1, g1), (_, _, loss8, g8) = runs
    assert abs(loss8 - loss1) / abs(loss1) <= 1e-5
    flat1, flat8 = jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g8)
    for (path, a), b in zip(flat1, flat8):
        assert _rel(b, a) <= 1e-5, (jax.tree_util.keystr(path), _rel(b, a))


def test_full_steps_agree(tiny_config, devices, tmp_path):
    """Two optimizer steps with donation, on one device and on the 2x2x2 mesh."""
    out = []
    for shape, devs in (((1, 1, 1), devices[:1]), ((2, 2, 2), devices)):
        cfg = tiny_config.copy_and_resolve_references()
        cfg.mesh.shape.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
        tr = Trainer(cfg, tmp_path / str(shape), devices=devs)
        st = tr.init_state()
        step = tr.make_step(st)
        data = tr.data_iterator()
        params, opt = st.params, st.opt_state
        losses = []
        for i in range(2):
            params, opt, m = step(params, opt, tr.global_batch(next(data)), tr.step_rng(i))
            losses.append(float(m["loss"]))
        out.append((losses, params))
    (l1, p1), (l8, p8) = out
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_showo_sharded_step_equals_one_device(trained_tokenizer, devices, tmp_path_factory):
    """The second recipe on the same trainer: loss and gradients on the 2x2x2 mesh."""
    from helpers import tiny_showo_config

    out = []
    for shape, devs in (((1, 1, 1), devices[:1]), ((2, 2, 2), devices)):
        cfg = tiny_showo_config(trained_tokenizer[0])
        cfg.mesh.shape.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
        out.append(_loss_and_grads(cfg, devs, tmp_path_factory.mktemp("showo")))
    (_, _, loss1, g1), (_, _, loss8, g8) = out
    assert abs(loss8 - loss1) / abs(loss1) <= 1e-5
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g8)):
        assert _rel(b, a) <= 1e-5 or np.abs(np.asarray(a)).max() == 0, (jax.tree_util.keystr(path), _rel(b, a))


def test_packed_documents_shard_like_one_device(tiny_config, devices, tmp_path_factory):
    """Rows of packed text and caption-image documents: loss and gradients on the 2x2x2 mesh."""
    out = []
    for shape, devs in (((1, 1, 1), devices[:1]), ((2, 2, 2), devices)):
        cfg = tiny_config.copy_and_resolve_references()
        cfg.transfusion.update(text_ratio=0.4, pack_length=3 * 36, pack_images=2)
        cfg.mesh.shape.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
        out.append(_loss_and_grads(cfg, devs, tmp_path_factory.mktemp("packed")))
    (tr, _, loss1, g1), (_, _, loss8, g8) = out
    batch = next(tr.data_iterator())
    assert (batch["segment"].max(1) > 1).any() and batch["image_valid"].shape[1] == 2  # rows hold several documents
    assert abs(loss8 - loss1) / abs(loss1) <= 1e-5
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g8)):
        assert _rel(b, a) <= 1e-5, (jax.tree_util.keystr(path), _rel(b, a))
