"""Transfusion at the paper's sizes: 160m, 370m, 760m, 1.4b, 7b.

    python -m unimm.main --config=configs/transfusion.py:size=760m --workdir=/path/run
"""

from unimm.configs.transfusion import paper_config


def get_config(arg: str = "size=7b"):
    key, _, value = arg.partition("=")
    if key != "size" or not value:
        raise ValueError(f"expected 'size=<one of 160m, 370m, 760m, 1.4b, 7b>', got {arg!r}")
    return paper_config(value)
