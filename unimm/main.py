"""unimm's entry point: train, evaluate or sample any recipe from one config.

    python -m unimm.main --config=configs/transfusion_tiny.py                    # train
    python -m unimm.main --config=configs/transfusion_tiny.py --mode=eval         # evaluate the latest checkpoint
    python -m unimm.main --config=configs/transfusion_tiny.py --mode=sample \\
        --prompt="a red circle to the left of a blue square"                     # PNGs for prompts
    python -m unimm.main --config=configs/transfusion_tiny.py --mode=sample --image=x.png   # caption an image
    python -m unimm.main --config=configs/showo_tiny.py --mode=sample --image=x.png --question="what color is the circle?"
    python -m unimm.main --config=configs/showo_tiny.py --mode=sample --image=x.png --prompt="a red square" \\
        --inpaint_box=0,0,16,32                                                   # redraw the left half

Any config value can be overridden: --config.model.num_layers=2. The workdir
defaults to workdir/<config file name>; training resumes from it.
"""

from __future__ import annotations

import os
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from unimm.cli import parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<recipe>_<size>.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: workdir/<config name>).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to do.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Text prompt(s) to draw images for (sample mode).")
_IMAGE = flags.DEFINE_multi_string("image", [], "Image file(s) to caption (sample mode).")
_QUESTION = flags.DEFINE_multi_string("question", [], "Question(s) to answer about each --image (sample mode).")
_INPAINT = flags.DEFINE_string("inpaint_box", None, "x0,y0,x1,y1 (pixels): redraw this box of the --image to "
                               "fit the --prompt instead of captioning it (sample mode; recipes with inpainting).")
_NUM = flags.DEFINE_integer("num_samples", 4, "Images per prompt (sample mode).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step for eval/sample (default: latest).")
_OUT = flags.DEFINE_string("out", None, "Output folder for samples (default: <workdir>/cli_samples).")


def default_workdir(config_path: str) -> pathlib.Path:
    name = pathlib.Path(config_path.split(":")[0]).stem
    arg = config_path.partition(":")[2].replace("=", "_").replace(",", "_")
    return pathlib.Path("workdir") / (name + (f"_{arg}" if arg else ""))


def load_image(path: str, resolution: int):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"--image {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--image {path}: not a readable image ({e})") from None
    if im.size != (resolution, resolution):
        im = im.resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(im)


def sample(trainer, state, out_dir: pathlib.Path) -> None:
    import jax
    import numpy as np
    from flax import nnx
    from PIL import Image

    from unimm.data.grid import make_grid

    objective = trainer.objective
    model = nnx.merge(state.graphdef, state.params)
    rng = jax.random.key(trainer.config.seed + 7)
    out_dir.mkdir(parents=True, exist_ok=True)
    if _INPAINT.value:
        inpaint_cli(objective, model, rng, out_dir)
        return
    if _PROMPT.value:
        prompts = [p for p in _PROMPT.value for _ in range(_NUM.value)]
        images = objective.generate_images(model, prompts, rng)
        for i, img in enumerate(images):
            Image.fromarray(img).save(out_dir / f"sample_{i:03d}.png")
        make_grid(list(images), prompts, cols=_NUM.value).save(out_dir / "grid.png")
        print(f"wrote {len(images)} images and grid.png to {out_dir}")
    if _IMAGE.value:
        images = np.stack([load_image(p, objective.resolution) for p in _IMAGE.value])
        for path, caption in zip(_IMAGE.value, objective.caption_images(model, images, rng)):
            print(f"{path}: {caption}")
        for q in _QUESTION.value:
            answers = objective.answer_questions(model, images, [q] * len(images), rng)
            if answers is None:
                raise app.UsageError(f"{objective.name} does not answer questions; drop --question")
            for path, a in zip(_IMAGE.value, answers):
                print(f"{path}: {q} -> {a}")


def inpaint_cli(objective, model, rng, out_dir: pathlib.Path) -> None:
    import numpy as np
    from PIL import Image

    if not hasattr(objective, "inpaint"):
        raise app.UsageError(f"{objective.name} does not inpaint; drop --inpaint_box")
    if len(_IMAGE.value) != 1 or len(_PROMPT.value) != 1:
        raise app.UsageError("--inpaint_box needs exactly one --image and one --prompt")
    r = objective.resolution
    try:
        x0, y0, x1, y1 = (int(v) for v in _INPAINT.value.split(","))
    except ValueError:
        raise app.UsageError(f"--inpaint_box={_INPAINT.value!r}: expected four integers x0,y0,x1,y1") from None
    if not (0 <= x0 < x1 <= r and 0 <= y0 < y1 <= r):
        raise app.UsageError(f"--inpaint_box={_INPAINT.value}: needs 0 <= x0 < x1 <= {r} and 0 <= y0 < y1 <= {r} "
                             f"(pixels of the {r} px model input)")
    image = load_image(_IMAGE.value[0], r)
    region = np.zeros((_NUM.value, r, r), bool)
    region[:, y0:y1, x0:x1] = True
    out = objective.inpaint(model, _PROMPT.value * _NUM.value, np.stack([image] * _NUM.value), region, rng)
    for i, img in enumerate(out):
        Image.fromarray(img).save(out_dir / f"inpaint_{i:03d}.png")
    print(f"wrote {len(out)} inpainted images to {out_dir}")


def run(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/transfusion_tiny.py")
    workdir = pathlib.Path(_WORKDIR.value) if _WORKDIR.value else default_workdir(flags.FLAGS["config"].config_filename)

    from unimm.train.trainer import Trainer

    trainer = Trainer(config, workdir)
    if _MODE.value == "train":
        trainer.train()
    elif _MODE.value == "eval":
        state = trainer.load_params(_STEP.value)
        trainer.run_eval(state, trainer.loaded_step)
    else:
        if not _PROMPT.value and not _IMAGE.value:
            raise app.UsageError("sample mode needs --prompt and/or --image")
        state = trainer.load_params(_STEP.value)
        sample(trainer, state, pathlib.Path(_OUT.value) if _OUT.value else workdir / "cli_samples")
    return 0


def main(argv):
    try:
        return run(argv)
    except (ValueError, FileNotFoundError, KeyError) as e:
        # Configuration and input problems: say what and how to fix, without a traceback.
        if os.environ.get("UNIMM_DEBUG"):
            raise
        print(f"error: {e}\n(set UNIMM_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
