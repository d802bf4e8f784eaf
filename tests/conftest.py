"""Test-session setup: 8 fake CPU devices (set before jax is imported) and
shared tiny configs, so sharding is tested without accelerators."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


def tiny_transfusion_config(**overrides):
    """A Transfusion config small enough to compile in seconds."""
    from unimm.configs.transfusion import tiny_config

    c = tiny_config()
    c.model.update(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, qk_norm=True)
    c.image.update(resolution=16, patch_size=4, io="linear")
    c.transfusion.update(max_text_len=16)
    c.sampling.update(sample_steps=4, max_new_tokens=6)
    c.data.update(batch_size=8, num_threads=1, prefetch=2)
    c.optim.update(learning_rate=3e-3, warmup_steps=2)
    c.train.update(steps=4, log_every=1, checkpoint_every=2, final_eval=False, tensorboard=False, mfu=False)
    c.eval.update(images_per_category=1, num_understanding=2, batch_size=8)
    c.mesh.shape.update(data=1, fsdp=1, tensor=1)
    for section, values in overrides.items():
        c[section].update(values)
    return c


@pytest.fixture(scope="session")
def devices():
    assert len(jax.devices()) == 8, "tests expect 8 fake CPU devices (XLA_FLAGS set in conftest)"
    return jax.devices()


@pytest.fixture(scope="session")
def tiny_config():
    return tiny_transfusion_config()
