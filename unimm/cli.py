"""Command-line plumbing shared by unimm.main and unimm.bench: flag parsing that
turns a bad `--config.a.b=v` into a one-line error instead of a traceback."""

from __future__ import annotations

import runpy
import sys

from absl import flags
from absl import logging


def _section_keys(argv, dotted: str):
    """Keys of the config section `dotted` names ('model'), loading --config's file; None if unknown."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None:
        return None
    file, _, arg = path.partition(":")
    try:
        node = runpy.run_path(file)["get_config"](*([arg] if arg else []))
        for part in filter(None, dotted.split(".")):
            node = node[part]
        return sorted(node.keys())
    except Exception:  # the section itself is unknown, or the file does not load: say less
        return None


def unknown_key_message(argv, error: Exception) -> str:
    text = str(error.args[0]) if error.args else str(error)
    key = text.split("\n")[0].strip("\"' ")
    culprit = next((a for a in argv if a.startswith("--config.") and
                    key in a.split("=", 1)[0][len("--config."):].split(".")), None)
    if culprit is None:
        return f"unknown config key {key!r} ({text})"
    dotted = culprit.split("=", 1)[0][len("--config."):]
    parts = dotted.split(".")
    section = ".".join(parts[:parts.index(key)])
    msg = f"{culprit}: the config has no key {key!r}"
    if section:
        msg += f" in section {section!r}"
    known = _section_keys(argv, section)
    if known:
        msg += f"; known keys there: {', '.join(known)}"
    hint = text.split("\n", 1)[1].strip() if "\n" in text else ""
    return msg + (f". {hint}" if hint else "")


def parse_flags(argv):
    """absl flags parser for app.run: config-override mistakes exit 2 with a clear message.

    Library INFO logs (XLA backends, orbax internals) are hidden unless
    --verbosity is given, so the progress lines stay readable."""
    try:
        rest = flags.FLAGS(argv)
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        return rest
    except flags.Error as e:
        print(f"error: {e}\nPass --helpfull to see the flags.", file=sys.stderr)
    except (AttributeError, KeyError) as e:  # ml_collections: an override names a key the config lacks
        print(f"error: {unknown_key_message(argv, e)}", file=sys.stderr)
    sys.exit(2)
