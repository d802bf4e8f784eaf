"""Recipe settings: one frozen dataclass per recipe owns the defaults of its config sections.

Each field names the config section it lives in:

    @dataclasses.dataclass(frozen=True)
    class Settings:
        resolution: int = setting(32, "image")
        cfg_scale: float = setting(3.0, "sampling")
        latent_channels: int = setting(4)          # derived, not in any section

`sections(Settings)` gives the default ConfigDicts a config file starts from,
and `from_config(Settings, config)` reads them back, checked: a key no field
owns is an error that names the known ones. The defaults are written once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import ml_collections


def setting(default: Any, section: Optional[str] = None):
    """A dataclass field with a default, kept in config section `section` (None: derived, not configurable)."""
    return dataclasses.field(default=default, metadata={"section": section})


def _fields(cls, section: Optional[str] = None):
    return [f for f in dataclasses.fields(cls)
            if f.metadata.get("section") is not None and (section is None or f.metadata["section"] == section)]


def section_names(cls) -> tuple[str, ...]:
    return tuple(dict.fromkeys(f.metadata["section"] for f in _fields(cls)))


def sections(cls) -> dict[str, ml_collections.ConfigDict]:
    """The default config sections of a settings class: {section: ConfigDict of its fields}."""
    return {name: ml_collections.ConfigDict({f.name: f.default for f in _fields(cls, name)})
            for name in section_names(cls)}


def defaults(cls, exclude=()) -> ml_collections.ConfigDict:
    """Every field of a plain settings dataclass (no section metadata) as one ConfigDict."""
    return ml_collections.ConfigDict({f.name: f.default for f in dataclasses.fields(cls) if f.name not in exclude})


def from_config(cls, config, skip=(), **derived):
    """An instance of `cls` from the config's sections (unknown keys are errors);
    `skip` names keys of those sections that are not settings (nested configs),
    `derived` sets the fields no section holds."""
    merged, names = {}, section_names(cls)
    for name in names:
        if name in config:
            merged.update({k: v for k, v in dict(config[name]).items() if k not in skip})
    known = {f.name for f in _fields(cls)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ValueError(f"unknown settings {unknown} in config.{'/'.join(names)}; known: {sorted(known)}")
    for f in _fields(cls):  # sequences come back from ConfigDicts and the command line as lists or tuples
        if isinstance(f.default, tuple) and f.name in merged:
            merged[f.name] = tuple(merged[f.name])
    return cls(**merged, **derived)
