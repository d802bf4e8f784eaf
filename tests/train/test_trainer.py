import json
import os
import signal
import threading
import time

import jax
import numpy as np
import pytest

from unimm.train import trainer as trainer_lib
from unimm.train.trainer import NonFiniteLoss, Trainer


def _losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_tiny_model_overfits_a_handful_of_examples(tiny_config, devices, tmp_path):
    cfg = tiny_config.copy_and_resolve_references()
    cfg.model.update(d_model=64, head_dim=16, mlp_dim=192)
    cfg.data.update(size=2, batch_size=4)
    cfg.transfusion.update(caption_first_ratio=1.0, cond_dropout=0.0)
    cfg.optim.update(learning_rate=3e-3, warmup_steps=10, schedule="constant", grad_clip=0.0)
    cfg.train.update(steps=200, log_every=10, checkpoint_every=1000)
    Trainer(cfg, tmp_path, devices=devices[:1]).train()
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    # Mean of the first and of the last three logs (the diffusion loss is noisy: random t and noise).
    early = {k: np.mean([rows[s][k] for s in (1, 10, 20)]) for k in ("loss", "lm_loss", "diffusion_loss")}
    late = {k: np.mean([rows[s][k] for s in (180, 190, 200)]) for k in early}
    # The two captions are memorised: what is left is the coin flip between them at their
    # first differing token (about ln 2 over ~20 targets).
    assert late["lm_loss"] < early["lm_loss"] / 10, (early, late)
    assert late["diffusion_loss"] < early["diffusion_loss"] / 3, (early, late)
    assert late["loss"] < early["loss"] / 5, (early, late)


def _sigterm_when(workdir, step):
    """Send SIGTERM to this process once `step` is logged (a preemption). Watches until
    the returned event is set, however long compilation takes on a busy machine."""
    done = threading.Event()

    def watch():
        while not done.is_set():
            path = workdir / "metrics.jsonl"
            if path.exists() and any(json.loads(l)["step"] >= step for l in path.read_text().splitlines()):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, done


def test_preempted_and_resumed_run_matches_an_uninterrupted_one(tiny_config, devices, tmp_path):
    cfg = tiny_config.copy_and_resolve_references()
    cfg.train.update(steps=8, checkpoint_every=100)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    Trainer(cfg, whole, devices=devices[:1]).train()
    watcher, done = _sigterm_when(parts, 3)
    first = Trainer(cfg, parts, devices=devices[:1]).train()
    done.set()
    watcher.join()
    assert first.get("interrupted") and first["step"] < 8
    assert (parts / "checkpoints" / str(first["step"])).exists()
    second = Trainer(cfg, parts, devices=devices[:1]).train()  # resumes from the SIGTERM checkpoint
    assert second["step"] == 8
    a, b = _losses(whole), _losses(parts)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6), step


def test_non_finite_losses_stop_the_run_without_losing_parameters(tiny_config, devices, tmp_path):
    cfg = tiny_config.copy_and_resolve_references()
    cfg.train.update(steps=10, max_nonfinite_steps=3, checkpoint_every=100)
    tr = Trainer(cfg, tmp_path, devices=devices[:1])
    loss = tr.objective.loss
    tr.objective.loss = lambda model, batch, rng: (lambda l, m: (l * np.nan, m))(*loss(model, batch, rng))
    init = tr.init_state(with_optimizer=False).params
    with pytest.raises(NonFiniteLoss, match="Lower optim.learning_rate"):
        tr.train()
    tr.objective.loss = loss
    restored = Trainer(cfg, tmp_path, devices=devices[:1]).load_params()
    for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(restored.params)):
        np.testing.assert_array_equal(a, b)  # every update was skipped


def test_missing_checkpoint_is_a_clear_error(tiny_config, devices, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(tiny_config, tmp_path, devices=devices[:1]).load_params()


def test_frozen_parameters_do_not_move(tiny_config, devices, tmp_path):
    cfg = tiny_config.copy_and_resolve_references()
    cfg.optim.freeze = (r"^embed/",)
    tr = Trainer(cfg, tmp_path, devices=devices[:1])
    st = tr.init_state()
    step = tr.make_step(st)
    before = np.asarray(st.params["embed"]["embedding"])
    decoder_before = np.asarray(st.params["lm_head"]["kernel"])
    params, opt_state = st.params, st.opt_state
    batch = tr.global_batch(next(tr.data_iterator()))
    for i in range(2):  # the warmup's first learning rate is 0
        params, opt_state, _ = step(params, opt_state, batch, tr.step_rng(i))
    np.testing.assert_array_equal(params["embed"]["embedding"], before)
    assert not np.array_equal(params["lm_head"]["kernel"], decoder_before)
    cfg.optim.freeze = ("^nothing_matches$",)
    with pytest.raises(ValueError, match="matches no parameter"):
        Trainer(cfg, tmp_path / "b", devices=devices[:1]).init_state()


def test_distributed_is_only_initialised_when_asked(monkeypatch, tiny_config):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(1))
    for var in trainer_lib._DISTRIBUTED_ENV:
        monkeypatch.delenv(var, raising=False)
    trainer_lib.maybe_initialize_distributed(tiny_config)
    assert not calls
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    trainer_lib.maybe_initialize_distributed(tiny_config)
    assert calls == [1]
