"""Test-session setup: 8 fake CPU devices (set before jax is imported) and
shared tiny configs, so sharding is tested without accelerators."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from helpers import tiny_tokenizer_config, tiny_transfusion_config  # noqa: E402


@pytest.fixture(scope="session")
def trained_tokenizer(tmp_path_factory):
    """(workdir, final eval record) of the tiny tokenizer trained for 300 steps (once per session)."""
    from unimm.train.trainer import Trainer

    workdir = tmp_path_factory.mktemp("image_tokenizer")
    cfg = tiny_tokenizer_config()
    cfg.train.final_eval = True
    out = Trainer(cfg, workdir, devices=jax.devices()[:1]).train()
    return workdir, out["eval"]


@pytest.fixture(scope="session")
def devices():
    assert len(jax.devices()) == 8, "tests expect 8 fake CPU devices (XLA_FLAGS set in conftest)"
    return jax.devices()


@pytest.fixture(scope="session")
def tiny_config():
    return tiny_transfusion_config()
