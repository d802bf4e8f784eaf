"""Recipe registry: a config's `objective` name -> its Objective class.

Adding a recipe: write `unimm/objectives/<name>.py` with a subclass of
`base.Objective`, and add its name and module below. Nothing else changes.
"""

from __future__ import annotations

import importlib

_MODULES = {
    "transfusion": "unimm.objectives.transfusion",
    "kl_vae": "unimm.objectives.kl_vae",
    "image_tokenizer": "unimm.objectives.image_tokenizer",
    "showo": "unimm.objectives.showo",
}


def names() -> list[str]:
    return sorted(_MODULES)


def get(name: str):
    """The Objective class registered as `name`."""
    if name not in _MODULES:
        raise ValueError(f"unknown objective {name!r}; registered: {names()}")
    module = importlib.import_module(_MODULES[name])
    return module.OBJECTIVE


def build(config, shapes_only: bool = False):
    """Instantiate the objective a full run config names (config.objective)."""
    return get(config.objective)(config, shapes_only=shapes_only)
