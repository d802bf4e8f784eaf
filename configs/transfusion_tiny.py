"""Transfusion, tiny: the CPU demo and the README default (32 px scenes, U-Net patches, ~5M params).

    python -m unimm.main --config=configs/transfusion_tiny.py

Override anything from the command line, e.g. --config.train.steps=200.
"""

from unimm.configs.transfusion import tiny_config


def get_config():
    return tiny_config()
