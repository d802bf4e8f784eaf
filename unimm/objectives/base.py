"""What the trainer, evaluator and CLI need from a recipe.

An Objective owns everything recipe-specific: the model it builds from the
generic blocks, the sequence layout of its training streams, its loss, its
FLOP count, and its samplers. The trainer only ever calls this interface.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """One per-example array of a batch: shape without the batch dim, dtype, logical axes."""

    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[Optional[str], ...]


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A part of the model that comes from elsewhere (e.g. a frozen image tokenizer).

    key: the top-level parameter key it fills. workdir: the unimm run whose
    latest checkpoint holds it. config: that run's config; the trainer trains it
    there first if the workdir has no checkpoint (None: it must already exist).
    loader: instead of a unimm run, a callable `loader(abstract_params) ->
    params` (a pytree of arrays with the abstract tree's structure, shapes and
    dtypes; e.g. converted released weights). Its config section names it as
    `loader = "package.module:function"`.
    """

    key: str
    workdir: str
    config: Any = None
    loader: Optional[Callable[[Any], Any]] = None


def resolve_loader(spec: str) -> Callable:
    """The callable a 'package.module:function' string names."""
    import importlib

    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"loader {spec!r}: expected 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"loader {spec!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise ValueError(f"loader {spec!r} is not callable")
    return fn


def pretrained_part(key: str, section, workdir) -> Pretrained:
    """The Pretrained a nested run-config section describes: its `loader` if set,
    else its run's `workdir` (default <this run's workdir>/<key>)."""
    import pathlib

    loader = section.get("loader") or None
    return Pretrained(key, section.get("workdir") or str(pathlib.Path(workdir) / key), section,
                      resolve_loader(loader) if loader else None)


@dataclasses.dataclass(frozen=True)
class Stream:
    """A training stream: examples of the data source, encoded into the recipe's layout.

    `encode(examples, rng)` gets `group` source examples (a list) and returns a
    dict of numpy arrays matching the objective's `example_spec()`.
    """

    name: str
    weight: float
    encode: Callable[[list[dict], np.random.Generator], dict[str, np.ndarray]]
    group: int = 1


@dataclasses.dataclass(frozen=True)
class Packing:
    """How a recipe packs its documents into rows (grain's first-fit packing).

    With packing, a stream's `encode` returns one document of variable length
    (every array's leading axis is its length: tokens, or images). `lengths`
    gives each array's length in a row; grain packs documents until one does
    not fit and adds `<name>_segment_ids` (1, 2, ... per document, 0 for
    padding) and `<name>_positions`; `finish(row)` turns that into the
    recipe's `example_spec` layout.
    """

    lengths: dict
    finish: Callable[[dict], dict]
    bins: int = 4


class Objective:
    name: str = ""

    def __init__(self, config, shapes_only: bool = False):
        """`shapes_only`: build what shape analysis needs (model, example_spec)
        without loading tokenizer or checkpoint files."""
        self.config, self.shapes_only = config, shapes_only

    @property
    def resolution(self) -> int:
        """Side in pixels of the images the recipe trains on (data and evaluation)."""
        raise NotImplementedError

    @property
    def compute_dtype(self):
        """The dtype of the model's matmuls (MFU is measured against this dtype's peak)."""
        return jnp.float32

    # -- model -----------------------------------------------------------------
    def make_model(self, rngs: nnx.Rngs) -> nnx.Module:
        raise NotImplementedError

    def pretrained(self, workdir) -> list[Pretrained]:
        """Parts of the model trained by other runs. After a fresh initialisation
        the trainer loads each from its run's latest checkpoint (training it first
        if needed and possible). `workdir` is this run's directory."""
        return []

    def loaded(self, dep: Pretrained) -> None:
        """Called once a dependency's checkpoint is known to exist (before any step
        is traced), e.g. to read what that run measured."""

    def frozen(self) -> tuple[str, ...]:
        """Parameter path patterns the recipe always freezes (added to optim.freeze)."""
        return ()

    # -- data ------------------------------------------------------------------
    def streams(self) -> Sequence[Stream]:
        raise NotImplementedError

    def example_spec(self) -> dict[str, ArraySpec]:
        raise NotImplementedError

    def packing(self) -> Optional[Packing]:
        """None: each stream example is one row. Else: documents packed into rows."""
        return None

    def synthetic_batch(self, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
        """A batch of the recipe's layout with random contents and no padding (benchmarks)."""
        raise NotImplementedError

    # -- training --------------------------------------------------------------
    def loss(self, model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array):
        """(scalar loss, dict of scalar metrics). Pure; runs inside jit."""
        raise NotImplementedError

    def flops_per_batch(self, batch: dict[str, np.ndarray]) -> float:
        """Analytic model FLOPs (forward + backward) of one training step on `batch`."""
        raise NotImplementedError

    def tokens_per_batch(self, batch: dict[str, np.ndarray]) -> int:
        """Non-padding sequence positions in `batch`."""
        raise NotImplementedError

    # -- evaluation ----------------------------------------------------------------
    def evaluate(self, model: nnx.Module, step: int, rng: jax.Array, workdir=None) -> dict:
        """An evaluation record (JSON-able). By default: the scene checkers on
        generated images, captions and (if supported) answers."""
        from unimm.eval import harness

        return harness.evaluate_scenes(self, model, self.config, step, rng, workdir)

    def format_eval(self, record: dict) -> str:
        from unimm.eval import harness

        return harness.format_record(record)

    def flatten_eval(self, record: dict) -> dict[str, float]:
        from unimm.eval import harness

        return harness.flatten(record)

    # -- sampling (numpy in, numpy out) --------------------------------------------
    def generate_images(self, model: nnx.Module, prompts: Sequence[str], rng: jax.Array) -> np.ndarray:
        """uint8 images (N, H, W, 3) for text prompts."""
        raise NotImplementedError

    def caption_images(self, model: nnx.Module, images: np.ndarray, rng: jax.Array) -> list[str]:
        """A caption per uint8 image (N, H, W, 3)."""
        raise NotImplementedError

    def answer_questions(self, model: nnx.Module, images: np.ndarray, questions: Sequence[str],
                         rng: jax.Array) -> Optional[list[str]]:
        """An answer per (image, question), or None if the recipe does not do VQA."""
        return None


class SequenceObjective(Objective):
    """Shared plumbing of recipes whose batches are token sequences through a
    decoder with an output head (`self.dcfg`, `self.vocab_size`): token counts,
    FLOPs, checked text encoding. Subclasses say how many images a batch holds
    and what one image costs outside the decoder."""

    max_text_setting = ""  # the config key that bounds text length, for error messages

    def images_in(self, batch) -> int:
        """Images in a batch (each runs the image path once)."""
        return 0

    def image_flops(self) -> tuple[float, float]:
        """Forward FLOPs of one image outside the decoder: (trained layers, frozen encoders)."""
        return 0.0, 0.0

    @property
    def compute_dtype(self):
        return self.dcfg.compute_dtype

    def tokens_per_batch(self, batch) -> int:
        return int((np.asarray(batch["segment"]) != 0).sum())

    def flops_per_batch(self, batch) -> float:
        from unimm.nn import flops as flops_lib

        trained, frozen = self.image_flops()
        n = self.images_in(batch)
        fwd = flops_lib.lm_forward_flops(self.dcfg, batch["segment"], batch["span"], self.vocab_size) + n * trained
        return flops_lib.TRAIN_MULTIPLIER * fwd + n * frozen  # frozen encoders run forward only

    def text_ids(self, text: str, limit: Optional[int] = None) -> list[int]:
        """Token ids of `text`, at most `limit` (default: the recipe's max_text_len) of them."""
        ids = self.tok.encode(text)
        limit = self.s.max_text_len if limit is None else limit
        if len(ids) > limit:
            raise ValueError(f"text of {len(ids)} tokens is longer than {self.max_text_setting}={limit}: "
                             f"{text!r}; raise the limit or shorten the text")
        return ids
