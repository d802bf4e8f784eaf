"""The command line, as a user runs it: train, sample, caption, and clear errors."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "--config=configs/transfusion_tiny.py", "--config.model.num_layers=1", "--config.model.d_model=32",
    "--config.model.num_heads=2", "--config.model.num_kv_heads=2", "--config.model.head_dim=16",
    "--config.model.mlp_dim=64", "--config.image.resolution=16", "--config.image.unet_channels=8,8,16",
    "--config.data.batch_size=8", "--config.train.steps=2", "--config.train.checkpoint_every=2",
    "--config.train.final_eval=False", "--config.train.mfu=False", "--config.sampling.sample_steps=2",
    "--config.sampling.max_new_tokens=4", "--config.mesh.shape.data=1",
]


def run(*args, check=True):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "unimm.main", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cli")
    p = run(*TINY, f"--workdir={workdir}")
    assert "step 2/2" in p.stdout
    return workdir


def test_train_writes_checkpoints_metrics_and_config(trained):
    assert (trained / "checkpoints" / "2").is_dir()
    assert (trained / "metrics.jsonl").read_text().count("\n") == 2
    assert (trained / "config.json").exists() and list((trained / "tensorboard").iterdir())


def test_sample_writes_pngs_and_captions(trained, tmp_path):
    out = tmp_path / "samples"
    p = run(*TINY, f"--workdir={trained}", "--mode=sample", "--prompt=a red circle", "--num_samples=2",
            f"--out={out}")
    assert sorted(x.name for x in out.iterdir()) == ["grid.png", "sample_000.png", "sample_001.png"]
    assert Image.open(out / "sample_000.png").size == (16, 16)
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(img)  # any size: resized to the model's
    p = run(*TINY, f"--workdir={trained}", "--mode=sample", f"--image={img}")
    assert p.stdout.strip().startswith(f"{img}:")


@pytest.mark.parametrize("args, message", [
    (["--config.model.depth=3"], "depth"),
    (["--config.model.num_layers=two"], "num_layers"),
    (["--config.mesh.shape.data=3"], "needs 3 devices"),
    (["--mode=eval"], "no checkpoint"),
    (["--mode=sample", "--image=/nonexistent.png"], "no checkpoint"),
    (["--config.optim.schedule=linear"], "optim.schedule"),
])
def test_bad_input_gets_a_clear_message(tmp_path, args, message):
    p = run(*TINY, f"--workdir={tmp_path}", *args, check=False)
    assert p.returncode != 0
    assert message in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_corrupt_image_is_named(trained, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    p = run(*TINY, f"--workdir={trained}", "--mode=sample", f"--image={bad}", check=False)
    assert p.returncode == 2 and "not a readable image" in p.stderr


SHOWO = [
    "--config=configs/showo_tiny.py", "--config.model.num_layers=1", "--config.model.d_model=32",
    "--config.model.num_heads=2", "--config.model.num_kv_heads=2", "--config.model.head_dim=16",
    "--config.model.mlp_dim=64", "--config.image.resolution=16", "--config.image_tokenizer.image.resolution=16",
    "--config.image_tokenizer.image_tokenizer.channels=8,16", "--config.image_tokenizer.train.steps=2",
    "--config.image_tokenizer.train.mfu=False", "--config.image_tokenizer.data.batch_size=8",
    "--config.data.batch_size=8", "--config.train.steps=2", "--config.train.checkpoint_every=2",
    "--config.train.final_eval=False", "--config.train.mfu=False", "--config.sampling.sample_steps=2",
    "--config.sampling.max_new_tokens=4", "--config.mesh.shape.data=1", "--config.image_tokenizer.mesh.shape.data=1",
]


def test_showo_trains_its_tokenizer_first_then_samples_answers_and_inpaints(tmp_path):
    workdir = tmp_path / "showo"
    p = run(*SHOWO, f"--workdir={workdir}")
    assert "training it first" in p.stdout and "step 2/2" in p.stdout
    assert (workdir / "image_tokenizer" / "checkpoints" / "2").is_dir() and (workdir / "checkpoints" / "2").is_dir()
    img = tmp_path / "x.png"
    Image.fromarray(np.full((16, 16, 3), 255, np.uint8)).save(img)
    out = tmp_path / "out"
    p = run(*SHOWO, f"--workdir={workdir}", "--mode=sample", f"--image={img}", "--question=how many objects are there?",
            f"--out={out}")
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith(f"{img}:") and lines[1].startswith(f"{img}: how many objects are there? ->")
    p = run(*SHOWO, f"--workdir={workdir}", "--mode=sample", f"--image={img}", "--prompt=a red square",
            "--inpaint_box=0,0,8,16", "--num_samples=2", f"--out={out}")
    assert sorted(x.name for x in out.iterdir()) == ["inpaint_000.png", "inpaint_001.png"]
    p = run(*SHOWO, f"--workdir={workdir}", "--mode=sample", f"--image={img}", "--prompt=a red square",
            "--inpaint_box=0,0,8,99", check=False)
    assert p.returncode != 0 and "--inpaint_box=0,0,8,99" in p.stderr


def test_transfusion_does_not_inpaint(trained, tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    p = run(*TINY, f"--workdir={trained}", "--mode=sample", f"--image={img}", "--prompt=a red square",
            "--inpaint_box=0,0,8,8", check=False)
    assert p.returncode != 0 and "does not inpaint" in p.stderr
