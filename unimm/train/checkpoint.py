"""Checkpoints with orbax: params, optimizer state, step, RNG seed and the grain
iterator state, saved asynchronously under <workdir>/checkpoints/<step>."""

from __future__ import annotations

import pathlib
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


class Checkpointer:
    def __init__(self, workdir: str | pathlib.Path, keep: int = 3, use_async: bool = True):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async,
                                                 create=True))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, params, opt_state, meta: dict, data_iterator=None, force: bool = False) -> bool:
        items = dict(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta))
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: Optional[int], params, param_shardings, opt_state=None, opt_shardings=None,
                data_iterator=None) -> tuple[Any, Any, dict]:
        """Restore into the structure and shardings of the given (possibly abstract) trees.

        `step` None means the latest. Returns (params, opt_state or None, meta)."""
        if step is None:
            step = self.latest_step()
        if step is None or step not in self.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint {'at step ' + str(step) if step is not None else ''} in "
                                    f"{self.directory}; available steps: {self.all_steps() or 'none'}")
        items = dict(params=ocp.args.StandardRestore(_abstract(params, param_shardings)),
                     meta=ocp.args.JsonRestore())
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state, opt_shardings))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError) as e:  # orbax's message dumps both whole trees: keep its first line
            raise ValueError(f"the checkpoint {self.directory}/{step} does not fit this model: its parameters differ "
                             f"in structure or shape (compare the architecture settings with that run's "
                             f"config.json): {str(e).strip().splitlines()[0]}") from None
        opt = None
        if opt_state is not None:  # orbax returns tuples where optax has named tuples
            opt = jax.tree.unflatten(jax.tree.structure(opt_state), jax.tree.leaves(restored["opt_state"]))
        return restored["params"], opt, restored["meta"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
