"""Discrete image tokenizer, tiny: 32 px scenes -> 8x8 codes (VQ with EMA updates, 256 codes;
each code from its own 4x4 tile: encoder='patch').

    python -m unimm.main --config=configs/vq_tiny.py --workdir=workdir/vq_tiny

Lookup-free quantization instead: --config.image_tokenizer.quantizer=lfq
(codebook_size must then be a power of two); a conv encoder instead:
--config.image_tokenizer.encoder=conv. Show-o runs load this run's
checkpoint by path (their config's image_tokenizer.workdir).
"""

from unimm.configs.image_tokenizer import tiny_config


def get_config():
    return tiny_config()
