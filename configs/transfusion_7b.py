"""Transfusion 7B (Llama-2-7B-like decoder, 32k text vocab, KL-VAE latents, patch 2).

    python -m unimm.main --config=configs/transfusion_7b.py --workdir=/path/run \
        --config.tokenizer.path=/path/llama2_tokenizer.model

The default mesh is fully-sharded data parallel over every device
(mesh.shape: data=1, fsdp=-1, tensor=1).
"""

from unimm.configs.transfusion import paper_config


def get_config():
    return paper_config("7b")
