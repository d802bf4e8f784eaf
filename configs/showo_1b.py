"""Show-o, 1.3B (Phi-1.5 shape) at 256 px: 8192 LFQ codes, 16x16 image tokens.

    python -m unimm.main --config=configs/showo_1b.py --config.tokenizer.path=<spm model> \
        --config.image_tokenizer.workdir=<an LFQ tokenizer run>

Sharded with FSDP over all devices by default (config.mesh.shape).
"""

from unimm.configs.showo import paper_config


def get_config():
    return paper_config()
