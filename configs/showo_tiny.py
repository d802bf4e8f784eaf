"""Show-o, tiny: the CPU demo (32 px scenes as 8x8 discrete codes, ~4M-param decoder).

    python -m unimm.main --config=configs/showo_tiny.py

The image tokenizer (configs/vq_tiny.py) is trained first into
<workdir>/image_tokenizer unless --config.image_tokenizer.workdir points at an
existing run. Override anything from the command line, e.g. --config.train.steps=200.
"""

from unimm.configs.showo import tiny_config


def get_config():
    return tiny_config()
