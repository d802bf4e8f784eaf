import numpy as np

from unimm.nn.attention import attention_mask
from unimm.nn.flops import attention_pairs


def test_attention_pairs_counts_exactly_what_the_mask_allows():
    rng = np.random.default_rng(0)
    for _ in range(20):
        b, t = 3, 24
        seg = np.zeros((b, t), np.int32)
        span = np.zeros((b, t), np.int32)
        pos = np.zeros((b, t), np.int32)
        for r in range(b):
            cur, doc = 0, 1
            while cur < t - 4 and rng.random() < 0.8:
                n = int(rng.integers(4, 12))
                n = min(n, t - cur)
                seg[r, cur:cur + n] = doc
                pos[r, cur:cur + n] = np.arange(n)
                s = int(rng.integers(0, n - 2))
                span[r, cur + s:cur + s + int(rng.integers(1, n - s))] = doc
                cur, doc = cur + n, doc + 1
        mask = np.asarray(attention_mask(seg, span, pos, seg, span, pos))
        assert attention_pairs(seg, span) == int(mask.sum())


def test_xla_flops_counts_a_matmul_and_reads_every_analysis_form():
    import jax
    import jax.numpy as jnp

    from unimm.nn.flops import _flops_of, xla_flops

    n = 32
    flops = xla_flops(lambda a, b: a @ b, *[jax.ShapeDtypeStruct((n, n), jnp.float32)] * 2)
    assert flops == 2 * n ** 3
    # Backends answer a dict, a list of dicts, or nothing (the GPU backend for a lowering).
    assert _flops_of({"flops": 5.0}) == 5.0
    assert _flops_of([{"flops": 7.0}]) == 7.0
    assert _flops_of(None) is None and _flops_of([]) is None and _flops_of({"bytes accessed": 1.0}) is None
