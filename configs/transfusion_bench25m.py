"""Transfusion benchmark shape: ~25M non-embedding parameters (d=512, 8 layers,
8 heads, SwiGLU width 1376), batch 8, 32 text tokens + 64 image patches of dim 16 (16x16x4
latent-like inputs, patch 2), random data. For speed measurements only:

    python -m unimm.bench --config=configs/transfusion_bench25m.py
    python -m unimm.bench --config=configs/transfusion_bench25m.py --config.model.dtype=bfloat16
"""

from unimm.configs.transfusion import tiny_config


def get_config():
    c = tiny_config()
    c.model.update(num_layers=8, d_model=512, num_heads=8, num_kv_heads=8, head_dim=64, mlp_dim=1376)  # 8 x (4*512^2 + 3*512*1376) = 25.3M
    # The paper's image path: linear patches, text only through attention.
    c.image.update(resolution=16, channels=4, patch_size=2, io="linear", unet_skips=False, unet_token_skip=False,
                   unet_global_cond=False)
    c.transfusion.update(max_text_len=32, caption_cond=False, caption_first_ratio=0.8)
    c.data.update(source="synthetic", batch_size=8)
    return c
