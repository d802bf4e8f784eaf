import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from unimm.train import checkpoint as ckpt_lib
from unimm.train import optimizer as optim_lib
from unimm.train.trainer import Trainer


def test_param_ema_averages_the_updated_params_with_a_warming_decay():
    params = {"w": jnp.array([1.0, -2.0])}
    tx = optim_lib.param_ema(optax.sgd(0.5), decay=0.9)
    state = tx.init(params)
    expected = np.asarray(params["w"])
    for n in range(30):
        grads = {"w": jnp.array([1.0, 3.0]) * (n + 1)}
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * np.asarray(params["w"])
    np.testing.assert_allclose(optim_lib.ema_params(state)["w"], expected, rtol=1e-5)
    assert not np.allclose(expected, params["w"])  # the average lags the moving params
    with pytest.raises(ValueError, match="ema_decay"):
        optim_lib.param_ema(optax.sgd(0.1), decay=1.0)


def test_ema_is_found_inside_the_full_optimizer_chain():
    o = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=2, schedule="cosine", final_lr_fraction=0.1,
                                       b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0, freeze=(),
                                       ema_decay=0.99))
    params = {"a": {"w": jnp.ones((2, 2))}}
    state = optim_lib.make(o, 10, params).init(params)
    np.testing.assert_array_equal(optim_lib.ema_params(state)["a"]["w"], params["a"]["w"])
    o.ema_decay = 0.0
    assert optim_lib.ema_params(optim_lib.make(o, 10, params).init(params)) is None


def test_trainer_evaluates_checkpoints_and_resumes_with_the_ema(tiny_config, devices, tmp_path):
    cfg = tiny_config.copy_and_resolve_references()
    cfg.optim.ema_decay = 0.9
    cfg.train.update(steps=6, checkpoint_every=3, final_eval=False)
    tr = Trainer(cfg, tmp_path, devices=devices[:1])
    tr.train()
    loaded = Trainer(cfg, tmp_path, devices=devices[:1]).load_params()
    assert loaded.opt_state is None
    # What eval/sample get is the EMA stored in the checkpoint, not the live params.
    full = Trainer(cfg, tmp_path, devices=devices[:1])
    state = full.abstract_state()
    ck = ckpt_lib.Checkpointer(tmp_path, use_async=False)
    live, opt, _ = ck.restore(None, state.params, state.param_shardings, state.opt_state, state.opt_shardings)
    ck.close()
    ema = optim_lib.ema_params(opt)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(ema)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(b, c) for b, c in zip(jax.tree.leaves(ema), jax.tree.leaves(live)))
    # Resuming picks the EMA up from the checkpoint and keeps averaging.
    cfg.train.steps = 8
    assert Trainer(cfg, tmp_path, devices=devices[:1]).train()["step"] == 8


def test_weight_decay_touches_kernels_only_even_in_a_scanned_decoder():
    """Scanned layers stack norm scales into (layers, d) arrays: decay is decided by
    parameter kind, so norm scales, QK-norm scales, biases and the embedding table keep
    their values under zero gradients while every kernel decays."""
    from flax import nnx

    from unimm.nn.layers import Embed
    from unimm.nn.transformer import Decoder, DecoderConfig

    cfg = DecoderConfig(num_layers=2, d_model=16, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=32, qk_norm=True)

    class Tiny(nnx.Module):
        def __init__(self):
            self.embed = Embed(50, 16, rngs=nnx.Rngs(0))
            self.decoder = Decoder(cfg, rngs=nnx.Rngs(1))

    params = nnx.to_pure_dict(nnx.state(Tiny(), nnx.Param))
    assert params["decoder"]["blocks"]["attn_norm"]["scale"].ndim == 2  # stacked: the rank says nothing
    o = ml_collections.ConfigDict(dict(learning_rate=0.1, warmup_steps=0, schedule="constant", final_lr_fraction=1.0,
                                       b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.5, grad_clip=0.0, freeze=(),
                                       ema_decay=0.0))
    tx = optim_lib.make(o, 10, params)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    moved = {optim_lib.path_name(p): bool(jnp.any(u != 0)) for p, u in jax.tree_util.tree_leaves_with_path(updates)}
    assert all(v for k, v in moved.items() if k.endswith("kernel")), moved
    still = [k for k, v in moved.items() if not k.endswith("kernel")]
    assert set(still) >= {"embed/embedding", "decoder/blocks/attn_norm/scale", "decoder/blocks/mlp_norm/scale",
                          "decoder/blocks/attn/q_norm/scale", "decoder/blocks/attn/k_norm/scale",
                          "decoder/final_norm/scale"}
    assert not any(moved[k] for k in still)
