"""Shared test helpers: tiny configs that compile in seconds, and model tweaks."""

import jax


def randomize_zero_inits(model, seed=1):
    """Output layers start at zero (predictions are 0 at init); give them random
    weights so equivalence tests compare real, input-dependent predictions."""
    from flax import nnx
    import numpy as np

    key = jax.random.key(seed)
    for i, (_, v) in enumerate(nnx.iter_graph(model)):
        if isinstance(v, nnx.Param) and v[...].ndim >= 2 and not np.any(np.asarray(v[...])):
            v[...] = 0.1 * jax.random.normal(jax.random.fold_in(key, i), v[...].shape)
    return model


def _short_run(c, overrides: dict):
    """A recipe config trained for 4 steps of batch 8 on one device, sampled cheaply,
    then `overrides` ({section: {key: value}}) applied."""
    c.sampling.update(sample_steps=4, max_new_tokens=6)
    c.data.update(batch_size=8, num_threads=1, prefetch=2)
    c.optim.update(learning_rate=3e-3, warmup_steps=2)
    c.train.update(steps=4, log_every=1, checkpoint_every=2, final_eval=False, tensorboard=False, mfu=False)
    c.eval.update(images_per_category=1, num_understanding=2, batch_size=8)
    c.mesh.shape.update(data=1, fsdp=1, tensor=1)
    for section, values in overrides.items():
        c[section].update(values)
    return c


def tiny_transfusion_config(**overrides):
    """A Transfusion config small enough to compile in seconds."""
    from unimm.configs.transfusion import tiny_config

    c = tiny_config()
    c.model.update(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, qk_norm=True)
    # The paper's path (linear patches, text only through attention); tests add the rest as variants.
    c.image.update(resolution=16, patch_size=4, io="linear", unet_skips=False, unet_token_skip=False,
                   unet_global_cond=False)
    c.transfusion.update(max_text_len=16, caption_cond=False, caption_first_ratio=0.8)
    c.data.weights = None  # every scene kind
    return _short_run(c, overrides)


def tiny_tokenizer_config(**overrides):
    """An image tokenizer for 16 px scenes: 2x down (8x8 codes), 64 codes."""
    from unimm.configs.image_tokenizer import tiny_config

    c = tiny_config()
    c.image.resolution = 16
    c.image_tokenizer.update(channels=(16, 32), codebook_size=64, code_dim=8)
    c.data.update(batch_size=16, num_threads=1, prefetch=2)
    c.train.update(steps=300, log_every=100, checkpoint_every=300, tensorboard=False, mfu=False)
    c.eval.update(num_understanding=32)
    c.mesh.shape.update(data=1, fsdp=1, tensor=1)
    for section, values in overrides.items():
        c[section].update(values)
    return c


def tiny_showo_config(tokenizer_workdir: str = "", **overrides):
    """A Show-o config over the tiny 16 px tokenizer, small enough to compile in seconds."""
    from unimm.configs.common import nested_run
    from unimm.configs.showo import tiny_config

    c = tiny_config()
    c.model.update(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
    c.image.resolution = 16
    c.image_tokenizer = nested_run(tiny_tokenizer_config())
    c.image_tokenizer.workdir = str(tokenizer_workdir)
    # Every stream and scene kind in the batches, whatever the demo trains on.
    c.showo.update(max_text_len=20, t2i_ratio=0.6, mmu_ratio=0.3, lm_ratio=0.1)
    c.data.weights = None
    return _short_run(c, overrides)


def constant_parameters(abstract):
    """A pretrained-part loader (named in configs as 'helpers:constant_parameters'):
    every array 0.5, of the shapes and dtypes the model asks for."""
    import numpy as np

    return jax.tree.map(lambda a: np.full(a.shape, 0.5, a.dtype), abstract)


def wrongly_shaped_parameters(abstract):
    import numpy as np

    return jax.tree.map(lambda a: np.zeros(tuple(s + 1 for s in a.shape), a.dtype), abstract)
