"""Config sections every recipe shares: data, optimizer, training loop, evaluation, mesh."""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from unimm.data import spec as spec_lib
from unimm.nn.transformer import DecoderConfig

# Logical axis -> mesh axes (see unimm/nn/axes.py). Parameters shard their
# embed dim over fsdp and their heads/mlp/vocab dims over tensor; activations
# shard the batch over data and fsdp.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("cache_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("patch", None),
    ("conv", None),
    ("conv_in", None),
    ("codes", None),
    ("code_dim", None),
)


def model_section(**overrides) -> ml_collections.ConfigDict:
    """config.model: the decoder's settings, defaults from DecoderConfig (cond_dim is the recipe's to set)."""
    fields = {k: v for k, v in dataclasses.asdict(DecoderConfig()).items() if k != "cond_dim"}
    return ml_collections.ConfigDict(dict(fields, **overrides))


def nested_run(run_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config of a run whose model this one loads a part of (an autoencoder, an
    image tokenizer): workdir '' means <this run's workdir>/<part>, trained there
    first if it has no checkpoint; or loader='package.module:function' returns the
    part's parameters (e.g. converted released weights) instead of a unimm run."""
    run_config.workdir = ""
    run_config.loader = ""
    return run_config


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.objective = ""
    c.seed = 0
    c.distributed = "auto"  # auto | on | off: jax.distributed.initialize()

    # vocab_size: the text vocabulary, checked against the model file when it is
    # loaded; shape-only uses (AOT compilation, parameter counts) need no file.
    c.tokenizer = ml_collections.ConfigDict({"kind": "scenes", "path": "", "vocab_size": 128})

    c.data = ml_collections.ConfigDict()
    c.data.source = "shapes"
    c.data.seed = 0
    c.data.batch_size = 32  # global, over all processes
    c.data.categories = spec_lib.ALL_CATEGORIES
    c.data.weights = config_dict.placeholder(tuple)
    c.data.holdout = True
    c.data.backgrounds = ("white",)
    c.data.color_prob = 0.5
    c.data.size = 0  # 0: unbounded; N: only the first N scenes of each stream, repeated
    c.data.num_threads = 2
    c.data.prefetch = 4

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 3e-4
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"  # cosine | constant
    c.optim.final_lr_fraction = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    c.optim.freeze = ()  # regexes over parameter paths
    c.optim.ema_decay = 0.0  # > 0: evaluate and sample with an EMA of the params (kept in the optimizer state)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.log_every = 50
    c.train.eval_every = 0  # 0: only the final evaluation
    c.train.final_eval = True
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    c.train.max_nonfinite_steps = 100
    c.train.tensorboard = True
    c.train.mfu = True

    c.eval = ml_collections.ConfigDict()
    c.eval.images_per_category = 16
    c.eval.num_understanding = 64
    c.eval.max_questions = 512
    c.eval.batch_size = 32
    c.eval.grid_size = 36
    c.eval.prompt_version = "v1"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.mesh.rules = DEFAULT_RULES
    return c


def image_run_config(objective: str, resolution: int = 32) -> ml_collections.ConfigDict:
    """The base of runs that train on images alone (autoencoders, image tokenizers):
    batch 32, AdamW at 1e-3 (b2 0.99, no weight decay), 64 evaluation images."""
    c = base_config()
    c.objective = objective
    c.image = ml_collections.ConfigDict(dict(resolution=resolution))
    c.data.batch_size = 32
    c.optim.update(learning_rate=1e-3, warmup_steps=50, weight_decay=0.0, b2=0.99)
    c.eval.update(num_understanding=64)
    return c


ONE_OBJECT = ("single_object", "colors")  # the scene kinds with one object: what the CPU demos train on


def only_categories(data: ml_collections.ConfigDict, names=ONE_OBJECT) -> tuple:
    """data.weights that draw only the named categories (of data.categories)."""
    unknown = sorted(set(names) - set(data.categories))
    if unknown:
        raise ValueError(f"categories {unknown} are not in data.categories {tuple(data.categories)}")
    return tuple(int(k in names) for k in data.categories)
