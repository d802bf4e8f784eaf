"""The generic training loop. It knows the Objective interface, never a recipe.

- Mesh and logical-axis rules from config.mesh; parameters and optimizer state
  are created directly sharded by a jitted initialiser with explicit
  out_shardings (never whole on one device).
- The step is a pure function of (params, opt_state, batch, rng), jitted with
  explicit in/out shardings and buffer donation; params are pure dicts and the
  model is `nnx.merge`d inside.
- Per-process data shards become global arrays; `jax.distributed.initialize()`
  runs when the environment describes a multi-process job.
- orbax checkpoints (async) with automatic resume; SIGTERM saves and exits.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
import signal
import threading
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from unimm import objectives
from unimm.data import pipeline
from unimm.nn import axes as ax
from unimm.train import checkpoint as ckpt_lib
from unimm.train import mesh as mesh_lib
from unimm.train import optimizer as optim_lib
from unimm.train.metrics import MetricsLogger
from unimm.train.peak import matmul_peak

_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
                    "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def maybe_initialize_distributed(config) -> None:
    """Start multi-process JAX when asked: config.distributed 'auto' (the environment
    describes a cluster), 'on' or 'off'."""
    mode = config.get("distributed", "auto")
    if mode == "off" or jax.distributed.is_initialized():
        return
    if mode == "on" or any(v in os.environ for v in _DISTRIBUTED_ENV):
        jax.distributed.initialize()


def opt_state_shardings(opt_state, params, param_shardings, replicated):
    """Optimizer-state leaves that mirror a parameter (Adam's moments) take its
    sharding; counters and other scalars are replicated. Matching is by path:
    a moment's path ends with its parameter's path."""
    by_path = {}
    for (path, p), (_, sh) in zip(jax.tree_util.tree_leaves_with_path(params),
                                  jax.tree_util.tree_leaves_with_path(param_shardings)):
        by_path[jax.tree_util.keystr(path)] = (p.shape, sh)
    suffixes = sorted(by_path, key=len, reverse=True)

    def one(path, leaf):
        key = jax.tree_util.keystr(path)
        for suffix in suffixes:
            shape, sh = by_path[suffix]
            if key.endswith(suffix) and tuple(leaf.shape) == tuple(shape):
                return sh
        return replicated

    return jax.tree_util.tree_map_with_path(one, opt_state)


# What a model may hold: trained parameters and buffers its loss writes.
_VARIABLES = (nnx.Param, ax.Buffer)


def _written(before, after) -> dict:
    """{path: new value} of the variables the loss assigned (found at trace time:
    an untouched variable still holds the very array it was given)."""
    old = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(before)}
    return {key: x for key, x in ((jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(after))
            if x is not old[key]}


def _keep_writes(old, updated, written: dict):
    """The optimizer's update, except where the loss wrote a variable: there,
    elements the loss changed (e.g. restarted codebook rows) keep the loss's value."""
    def one(path, o, u):
        w = written.get(jax.tree_util.keystr(path))
        if w is None:
            return u
        w = w.astype(u.dtype)
        return jnp.where(w != o, w, u)
    return jax.tree_util.tree_map_with_path(one, old, updated)


class NonFiniteLoss(RuntimeError):
    pass


@dataclasses.dataclass
class TrainState:
    """Everything a step changes, plus what describes it."""

    graphdef: Any
    params: Any  # pure dict of arrays
    opt_state: Any
    param_shardings: Any
    opt_shardings: Any


def _pure_shardings(abstract_state, mesh, rules):
    shardings = ax.state_shardings(abstract_state, mesh, rules)
    return nnx.to_pure_dict(shardings) if isinstance(shardings, nnx.State) else shardings


class Trainer:
    def __init__(self, config, workdir: str | pathlib.Path, devices=None, shapes_only: bool = False):
        """`shapes_only`: for shape analysis and AOT compilation (no tokenizer or
        checkpoint files are read, no data flows)."""
        maybe_initialize_distributed(config)
        self.config, self.workdir = config, pathlib.Path(workdir)
        self.devices = devices
        self._dependencies = None
        self._buffer_paths = None
        self.primary = jax.process_index() == 0
        self.objective = objectives.build(config, shapes_only=shapes_only)
        self.mesh = mesh_lib.make_mesh(config.mesh.shape, devices)
        self.rules = mesh_lib.rules_from_config(config.mesh.rules)
        self.total_steps = int(config.train.steps)
        self.optimizer = None
        self.key = jax.random.key(config.seed)
        self.replicated = mesh_lib.replicated(self.mesh)
        self.batch_shardings = {
            name: mesh_lib.batch_sharding(self.mesh, self.rules, spec.axes,
                                          (config.data.batch_size,) + spec.shape)
            for name, spec in self.objective.example_spec().items()}

    # -- state -------------------------------------------------------------------
    def abstract_model(self):
        model = nnx.eval_shape(lambda: self.objective.make_model(nnx.Rngs(self.config.seed)))
        graphdef, params, rest = nnx.split(model, _VARIABLES, ...)
        if jax.tree.leaves(rest):
            raise ValueError("models may hold only nnx.Param and unimm.nn.axes.Buffer state; found other "
                             f"variables: {jax.tree.map(lambda x: x.shape, rest)}")
        return graphdef, params

    def buffer_paths(self) -> tuple[str, ...]:
        """Paths ('a/b/c') of the model's buffers: in the params tree, never trained."""
        if self._buffer_paths is None:
            model = nnx.eval_shape(lambda: self.objective.make_model(nnx.Rngs(self.config.seed)))
            flat = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, ax.Buffer)))
            self._buffer_paths = tuple(optim_lib.path_name(p) for p, _ in flat)
        return self._buffer_paths

    def abstract_state(self, with_optimizer: bool = True) -> TrainState:
        """Shapes, dtypes and shardings of params (and optimizer state); no arrays."""
        graphdef, abstract = self.abstract_model()
        param_sh = _pure_shardings(abstract, self.mesh, self.rules)
        params = nnx.to_pure_dict(abstract)
        opt_state = opt_sh = None
        if with_optimizer:
            frozen = tuple(self.objective.frozen()) + tuple(f"^{re.escape(b)}$" for b in self.buffer_paths())
            self.optimizer = optim_lib.make(self.config.optim, self.total_steps, params, frozen)
            opt_state = jax.eval_shape(self.optimizer.init, params)
            opt_sh = opt_state_shardings(opt_state, params, param_sh, self.replicated)
        return TrainState(graphdef, params, opt_state, param_sh, opt_sh)

    def init_state(self, with_optimizer: bool = True, load_pretrained: bool = True) -> TrainState:
        """Freshly initialised params (and optimizer state), created sharded; the
        objective's pretrained parts are loaded unless `load_pretrained` is False
        (benchmarks: timing needs no trained weights)."""
        state = self.abstract_state(with_optimizer)
        seed = self.config.seed

        def init():
            return nnx.to_pure_dict(nnx.state(self.objective.make_model(nnx.Rngs(seed)), _VARIABLES))

        with ax.sharding_context(self.mesh, self.rules):
            state.params = jax.jit(init, out_shardings=state.param_shardings)()
        for dep in self.dependencies() if load_pretrained else ():
            state.params[dep.key] = self.load_subtree(dep, state)
        if with_optimizer:
            state.opt_state = jax.jit(self.optimizer.init, out_shardings=state.opt_shardings)(state.params)
        return state

    def dependencies(self, train_missing: bool = False):
        """The objective's pretrained parts, their checkpoints made sure of (once).

        A dependency without a checkpoint is trained first with its own config
        when `train_missing` (the train mode), else it is an error."""
        if self._dependencies is None:
            deps = [] if self.objective.shapes_only else self.objective.pretrained(self.workdir)
            for dep in deps:
                if dep.loader is not None:  # weights from elsewhere: nothing to train or find here
                    self.objective.loaded(dep)
                    continue
                checkpointer = ckpt_lib.Checkpointer(dep.workdir, use_async=False)
                missing = checkpointer.latest_step() is None
                checkpointer.close()
                if missing:
                    if not train_missing or dep.config is None:
                        raise FileNotFoundError(
                            f"'{dep.key}' needs a checkpoint in {dep.workdir}; none is there. Train it (its config "
                            f"is part of this run's config) or point this run at an existing one.")
                    self._log(f"'{dep.key}' has no checkpoint in {dep.workdir}: training it first "
                              f"({dep.config.objective}, {dep.config.train.steps} steps)")
                    Trainer(dep.config, dep.workdir, devices=self.devices).train()
                self.objective.loaded(dep)
            self._dependencies = deps
        return self._dependencies

    def load_subtree(self, dep, state: TrainState):
        """params[dep.key]: from the dependency's loader, or else the latest checkpoint
        of its run (that run's model's root params), placed with this run's shardings."""
        abstract, shardings = state.params[dep.key], state.param_shardings[dep.key]
        if dep.loader is not None:
            params = dep.loader(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract))
            want = jax.tree_util.tree_structure(abstract)
            if jax.tree_util.tree_structure(params) != want:
                raise ValueError(f"the loader of '{dep.key}' returned a tree of another structure than the model's "
                                 f"{dep.key} parameters ({len(jax.tree.leaves(params))} arrays against "
                                 f"{want.num_leaves})")
            for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(abstract), jax.tree.leaves(params)):
                if tuple(a.shape) != tuple(np.shape(b)):
                    raise ValueError(f"the loader of '{dep.key}' gave {optim_lib.path_name(path)} shape "
                                     f"{tuple(np.shape(b))}; the model has {tuple(a.shape)}")
            params = jax.tree.map(lambda a, b, sh: jax.device_put(jnp.asarray(b, a.dtype), sh), abstract, params,
                                  shardings)
            self._log(f"loaded '{dep.key}' from its loader")
            return params
        checkpointer = ckpt_lib.Checkpointer(dep.workdir, use_async=False)
        try:
            params, _, meta = checkpointer.restore(None, abstract, shardings)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"cannot load '{dep.key}' for {self.objective.name}: {e}") from None
        finally:
            checkpointer.close()
        self._log(f"loaded '{dep.key}' from {dep.workdir} (step {meta['step']})")
        return params

    # -- step ----------------------------------------------------------------------
    def make_step(self, state: TrainState) -> Callable:
        objective, optimizer, graphdef = self.objective, self.optimizer, state.graphdef
        buffers = set(self.buffer_paths())

        def step(params, opt_state, batch, rng):
            def loss_fn(p):
                p = jax.tree_util.tree_map_with_path(
                    lambda path, x: jax.lax.stop_gradient(x) if optim_lib.path_name(path) in buffers else x, p)
                model = nnx.merge(graphdef, p)
                loss, metrics = objective.loss(model, batch, rng)
                return loss, (metrics, _written(p, nnx.to_pure_dict(nnx.state(model, _VARIABLES))))

            (loss, (metrics, written)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = _keep_writes(params, optax.apply_updates(params, updates), written)
            metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
            return params, opt_state, metrics

        def traced(*args):
            with ax.sharding_context(self.mesh, self.rules):
                return step(*args)

        return jax.jit(traced,
                       in_shardings=(state.param_shardings, state.opt_shardings, self.batch_shardings,
                                     self.replicated),
                       out_shardings=(state.param_shardings, state.opt_shardings, self.replicated),
                       donate_argnums=(0, 1))

    def global_batch(self, local: dict) -> dict:
        return {k: jax.make_array_from_process_local_data(self.batch_shardings[k], v) for k, v in local.items()}

    def step_rng(self, step: int) -> jax.Array:
        return jax.random.fold_in(self.key, step)

    def data_iterator(self):
        d = self.config.data
        it = pipeline.batches(d, self.objective.resolution, self.objective.streams(), d.batch_size,
                              jax.process_index(), jax.process_count(), packing=self.objective.packing())
        return iter(it)

    # -- loop ----------------------------------------------------------------------
    def train(self) -> dict:
        cfg, tc = self.config, self.config.train
        if self.primary:
            self.workdir.mkdir(parents=True, exist_ok=True)
            (self.workdir / "config.json").write_text(cfg.to_json_best_effort(indent=1))
        self.dependencies(train_missing=True)
        data = self.data_iterator()
        checkpointer = ckpt_lib.Checkpointer(self.workdir, keep=tc.keep_checkpoints)
        start = 0
        if checkpointer.latest_step() is not None:
            state = self.abstract_state()
            state.params, state.opt_state, meta = checkpointer.restore(
                None, state.params, state.param_shardings, state.opt_state, state.opt_shardings, data)
            start = int(meta["step"])
            self._log(f"resumed from {checkpointer.directory}/{start}")
        else:
            state = self.init_state()
        step_fn = self.make_step(state)
        lr_fn = optim_lib.schedule(cfg.optim, self.total_steps)
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
        self._log(f"{self.objective.name}: {n_params:,} parameters; mesh {dict(self.mesh.shape)}; "
                  f"{self.total_steps} steps of batch {cfg.data.batch_size}; workdir {self.workdir}")

        logger = MetricsLogger(self.workdir, self.total_steps, enabled=self.primary,
                               tensorboard=tc.get("tensorboard", True))
        peak = matmul_peak(self.objective.compute_dtype, self.mesh.devices.flatten()) if tc.get("mfu", True) else 0.0
        stop = {"signal": None}
        previous = None
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
        flops = tokens = None
        last_eval, nonfinite = None, 0
        try:
            step = start
            logger.start(step)
            while step < self.total_steps:
                local = next(data)
                if flops is None:
                    flops = self.objective.flops_per_batch(local) * jax.process_count()
                    tokens = self.objective.tokens_per_batch(local) * jax.process_count()
                    t_compile = time.perf_counter()
                state.params, state.opt_state, metrics = step_fn(
                    state.params, state.opt_state, self.global_batch(local), self.step_rng(step))
                step += 1
                if step == start + 1:
                    jax.block_until_ready(metrics)
                    self._log(f"first step (compilation included) took {time.perf_counter() - t_compile:.1f}s")
                    logger.start(step)
                if step % tc.log_every == 0 or step == self.total_steps or step == start + 1:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    nonfinite = 0 if math.isfinite(m["loss"]) else nonfinite + tc.log_every
                    m["learning_rate"] = float(lr_fn(step - 1))
                    m.update(logger.rates(step))
                    if "steps_per_sec" in m:
                        m["tokens_per_sec"] = tokens * m["steps_per_sec"]
                        if peak:
                            m["mfu"] = flops * m["steps_per_sec"] / peak
                    logger.log(step, m)
                    if nonfinite >= tc.max_nonfinite_steps:
                        checkpointer.save(step, state.params, state.opt_state, self._meta(step), data, force=True)
                        raise NonFiniteLoss(
                            f"loss has been non-finite for {nonfinite} steps (up to step {step}); updates were "
                            f"skipped, so the saved checkpoint {checkpointer.directory}/{step} holds the last "
                            "finite parameters. Lower optim.learning_rate or raise optim.warmup_steps and resume.")
                if tc.eval_every and step % tc.eval_every == 0 and step < self.total_steps:
                    last_eval = self.run_eval(state, step, logger)
                    logger.start(step)
                if step % tc.checkpoint_every == 0 or stop["signal"] is not None:
                    checkpointer.save(step, state.params, state.opt_state, self._meta(step), data,
                                      force=stop["signal"] is not None)
                if stop["signal"] is not None:
                    checkpointer.wait()
                    self._log(f"SIGTERM: saved checkpoint at step {step}; exiting")
                    return {"step": step, "interrupted": True}
            if step not in checkpointer.all_steps():
                checkpointer.save(step, state.params, state.opt_state, self._meta(step), data, force=True)
            if tc.get("final_eval", True):
                last_eval = self.run_eval(state, step, logger)
            checkpointer.wait()
            return {"step": step, "eval": last_eval}
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            checkpointer.close()
            logger.close()

    def _meta(self, step: int) -> dict:
        return {"step": step, "seed": int(self.config.seed), "objective": self.objective.name}

    def _log(self, msg: str):
        if self.primary:
            print(msg, flush=True)

    def run_eval(self, state: TrainState, step: int, logger: Optional[MetricsLogger] = None) -> dict:
        t = time.perf_counter()
        model = nnx.merge(state.graphdef, self.eval_params(state))
        record = self.objective.evaluate(model, step, jax.random.fold_in(jax.random.key(self.config.seed + 1), step),
                                         self.workdir if self.primary else None)
        self._log(f"eval at step {step} ({time.perf_counter() - t:.0f}s):\n{self.objective.format_eval(record)}")
        if logger is not None:
            logger.log_eval(step, self.objective.flatten_eval(record))
        return record

    def eval_params(self, state: TrainState):
        """The params evaluation and sampling use: the optimizer's parameter EMA where
        it keeps one (optim.ema_decay > 0), else the live params. Buffers (statistics
        the loss writes, which the optimizer never moves) always come live."""
        ema = optim_lib.ema_params(state.opt_state) if state.opt_state is not None else None
        if ema is None:
            return state.params
        buffers = set(self.buffer_paths())
        return jax.tree_util.tree_map_with_path(
            lambda p, e, live: live if optim_lib.path_name(p) in buffers else e, ema, state.params)

    # -- restore for eval/sample -------------------------------------------------------
    def load_params(self, step: Optional[int] = None) -> TrainState:
        """Params of a checkpoint in the workdir (the latest if `step` is None): its
        parameter EMA where the config keeps one."""
        self.dependencies()
        use_ema = bool(self.config.optim.get("ema_decay", 0.0))
        state = self.abstract_state(with_optimizer=use_ema)
        checkpointer = ckpt_lib.Checkpointer(self.workdir, use_async=False)
        try:
            if checkpointer.latest_step() is None:
                raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}: train first "
                                        f"(--mode=train) or point --workdir at a run")
            state.params, state.opt_state, meta = checkpointer.restore(
                step, state.params, state.param_shardings, state.opt_state, state.opt_shardings)
        finally:
            checkpointer.close()
        state.params, state.opt_state = self.eval_params(state), None
        self.loaded_step = int(meta["step"])
        return state
