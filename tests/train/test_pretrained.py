"""Pretrained parts from a loader instead of another unimm run."""

import jax
import numpy as np
import pytest

from helpers import tiny_showo_config
from unimm.train.trainer import Trainer


def test_a_pretrained_part_can_come_from_a_loader(devices, tmp_path):
    cfg = tiny_showo_config(tokenizer_workdir=str(tmp_path / "never_created"))
    cfg.image_tokenizer.loader = "helpers:constant_parameters"
    trainer = Trainer(cfg, tmp_path / "run", devices=devices[:1])
    state = trainer.init_state()
    leaves = jax.tree.leaves(state.params["image_tokenizer"])
    assert leaves and all(np.all(np.asarray(x) == 0.5) for x in leaves)
    assert not (tmp_path / "never_created").exists()  # no unimm run was looked for or trained
    assert any(not np.all(np.asarray(x) == 0.5) for x in jax.tree.leaves(state.params["decoder"]))


def test_a_loader_of_the_wrong_shapes_is_a_clear_error(devices, tmp_path):
    cfg = tiny_showo_config()
    cfg.image_tokenizer.loader = "helpers:wrongly_shaped_parameters"
    with pytest.raises(ValueError, match="the loader of 'image_tokenizer' gave .* shape"):
        Trainer(cfg, tmp_path, devices=devices[:1]).init_state()
    cfg.image_tokenizer.loader = "helpers:no_such_function"
    with pytest.raises(ValueError, match="cannot be imported"):
        Trainer(cfg, tmp_path, devices=devices[:1]).init_state()
