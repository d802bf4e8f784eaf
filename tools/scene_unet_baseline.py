"""A text-free baseline for the scenes: a plain conditional conv U-Net (no transformer, no LM).

It trains on one-object scenes (or all) with v-prediction, conditioned either on class
embeddings of the prompt's shape and colour (--cond class) or on the mean of learned
embeddings of the caption's tokens (--cond pooled), samples with DDIM 25 and CFG, and
scores the single-object and colour prompts with the scene checker. It sets what the image
path alone reaches at a budget (docs/transfusion.md, ninth round):

    python tools/scene_unet_baseline.py --cond class --data so --steps 2000 --out /tmp/unet
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from unimm.data import scenes, spec as spec_lib, vocab
from unimm.data.grid import make_grid
from unimm.eval import geneval, prompts as prompts_lib
from unimm.nn import diffusion as diff
from unimm.nn import guidance, pixels, sampling
from unimm.nn.image_io import Conv, GroupNorm, ResBlock, TimestepMLP
from unimm.tokenizers import text as text_tok

SHAPES, COLORS = list(vocab.SHAPES), list(vocab.COLORS)
CAPTION_LEN = 16
NUM_TIMESTEPS = 1000
SCORED = ("single_object", "colors")


def class_labels(spec: spec_lib.Spec) -> tuple[int, int]:
    """(shape, colour) of the first group, 1-based; colour 0 when the prompt names none."""
    g = spec.groups[0]
    return SHAPES.index(g.shape) + 1, (COLORS.index(g.color) + 1 if g.color else 0)


class Conditions:
    """Caption token ids (padded with -1) and class labels for a list of specs."""

    def __init__(self, tokenizer: text_tok.TextTokenizer):
        self.tok = tokenizer

    def caption_ids(self, text: str) -> list[int]:
        ids = self.tok.encode(text)[:CAPTION_LEN]
        return ids + [-1] * (CAPTION_LEN - len(ids))

    def __call__(self, specs, captions):
        labels = np.array([class_labels(s) for s in specs], np.int32)
        caps = np.array([self.caption_ids(c) for c in captions], np.int32)
        return jnp.asarray(caps), jnp.asarray(labels[:, 0]), jnp.asarray(labels[:, 1])


class Net(nnx.Module):
    """Conv U-Net over 32 px images, conditioned (with the timestep) through every block."""

    def __init__(self, channels, mid_blocks: int, cond: str, text_vocab: int, *, rngs: nnx.Rngs, dim: int = 128):
        self.cond_kind = cond
        self.temb = TimestepMLP(dim, rngs=rngs)
        self.shape_emb = nnx.Embed(len(SHAPES) + 1, dim, rngs=rngs)
        self.color_emb = nnx.Embed(len(COLORS) + 1, dim, rngs=rngs)
        self.word_emb = nnx.Embed(text_vocab, dim, rngs=rngs)
        self.cap_mlp = nnx.Linear(dim, dim, rngs=rngs)
        self.conv_in = Conv(3, channels[0], rngs=rngs)
        self.down = nnx.List([ResBlock(c, c, dim, rngs=rngs) for c in channels])
        self.downsample = nnx.List([Conv(a, b, 3, 2, rngs=rngs) for a, b in zip(channels, channels[1:])])
        self.mid = nnx.List([ResBlock(channels[-1], channels[-1], dim, rngs=rngs) for _ in range(mid_blocks)])
        self.up = nnx.List([ResBlock(2 * c, c, dim, rngs=rngs) for c in channels])
        self.upsample = nnx.List([Conv(b, a, rngs=rngs) for a, b in zip(channels, channels[1:])])
        self.norm = GroupNorm(channels[0])
        self.conv_out = Conv(channels[0], 3, zero_init=True, rngs=rngs)

    def cond(self, caps, shape, color, keep):
        """The condition vector; `keep` = 0 drops it (the unconditional branch of CFG)."""
        if self.cond_kind == "class":
            e = self.shape_emb(shape) + self.color_emb(color)
        else:
            valid = (caps >= 0).astype(jnp.float32)
            summed = (self.word_emb(jnp.maximum(caps, 0)) * valid[..., None]).sum(1)
            e = self.cap_mlp(summed / jnp.maximum(valid.sum(1, keepdims=True), 1))
        return e * keep[:, None]

    def __call__(self, x, t, c):
        temb = self.temb(t, c)
        h, skips = self.conv_in(x), []
        for i, block in enumerate(self.down):
            h = block(h, temb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        for block in self.mid:
            h = block(h, temb)
        for i in reversed(range(len(self.up))):
            h = self.up[i](jnp.concatenate([h, skips[i]], -1), temb)
            if i > 0:
                n, hh, ww, cc = h.shape
                h = self.upsample[i - 1](jax.image.resize(h, (n, 2 * hh, 2 * ww, cc), "nearest"))
        return self.conv_out(jax.nn.silu(self.norm(h)))


def make_fns(acp, cfg_scale: float):
    @nnx.jit
    def train_step(model, opt, x0, caps, shape, color, key):
        k_t, k_eps, k_drop = jax.random.split(key, 3)
        t = jax.random.randint(k_t, (x0.shape[0],), 0, NUM_TIMESTEPS)
        eps = jax.random.normal(k_eps, x0.shape)
        keep = (jax.random.uniform(k_drop, (x0.shape[0],)) > 0.1).astype(jnp.float32)
        xt = diff.q_sample(x0, t, eps, acp)

        def loss_fn(m):
            out = m(xt, t, m.cond(caps, shape, color, keep))
            return jnp.mean((out - diff.v_target(x0, eps, acp[t])) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    @nnx.jit
    def sample(model, caps, shape, color, key):
        """DDIM over 25 steps with classifier-free guidance; images in [-1, 1]."""
        n = caps.shape[0]
        solver = sampling.DDIM.make("cosine", NUM_TIMESTEPS, 25, clip=1.0)
        both = jnp.concatenate([model.cond(caps, shape, color, jnp.ones((n,))),
                                model.cond(caps, shape, color, jnp.zeros((n,)))])

        def predict(x, t, aux):
            xx = guidance.double(x)
            tt = jnp.full((2 * n,), t)
            eps = diff.eps_from_prediction("v", model(xx, tt, both), xx, acp[tt])
            return guidance.combine(eps, cfg_scale), aux

        return sampling.sample(solver, predict, jax.random.normal(key, (n, 32, 32, 3)), key)[0]

    return train_step, sample


def training_batch(n, categories, conds: Conditions, rng):
    specs = [spec_lib.sample_spec(categories[rng.integers(len(categories))], rng) for _ in range(n)]
    images = np.stack([scenes.render(scenes.sample_scene(s, rng)) for s in specs])
    x0 = pixels.to_signed(images)
    return (x0, *conds(specs, [spec_lib.caption(s) for s in specs]))


def evaluate(model, sample, conds: Conditions, step: int, out: str, per_category: int = 32) -> dict:
    plan = [e for e, _ in prompts_lib.plan(per_category) if e["category"] in SCORED]
    specs = [spec_lib.Spec.from_dict(e["spec"]) for e in plan]
    x = sample(model, *conds(specs, [e["prompt"] for e in plan]), jax.random.key(step))
    images = np.asarray(pixels.to_uint8(x))
    hits: dict[str, list[bool]] = {}
    for e, img in zip(plan, images):
        ok, _ = geneval.score_image(e["spec"], img)
        for key in (e["category"], e["category"] + ":" + e["spec"]["groups"][0]["shape"]):
            hits.setdefault(key, []).append(ok)
    scores = {k: float(np.mean(v)) for k, v in hits.items()}
    print("eval", step, json.dumps(scores), flush=True)
    make_grid(list(images[:64]), [e["prompt"] for e in plan[:64]], cols=8, tile=64).save(f"{out}_{step}.png")
    return scores


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cond", choices=("class", "pooled"), default="class")
    p.add_argument("--data", choices=("so", "all"), default="so", help="so: one-object scenes only")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ch", default="32,64,128", help="U-Net widths, one per level")
    p.add_argument("--mid", type=int, default=1, help="middle ResBlocks")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--out", default="scene_unet", help="prefix of the sample-grid PNGs")
    a = p.parse_args(argv)
    channels = [int(c) for c in a.ch.split(",")]
    categories = list(SCORED) if a.data == "so" else list(spec_lib.ALL_CATEGORIES)
    tokenizer = text_tok.load("scenes")
    conds = Conditions(tokenizer)

    acp = jnp.asarray(diff.alphas_cumprod("cosine", NUM_TIMESTEPS), jnp.float32)
    model = Net(channels, a.mid, a.cond, tokenizer.vocab_size, rngs=nnx.Rngs(0))
    warmup = min(100, a.steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(0, 1e-3, warmup, a.steps, 1e-4)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.95, weight_decay=0.0))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    print("params", sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))), flush=True)
    train_step, sample = make_fns(acp, a.cfg)

    rng, key, t0 = np.random.default_rng(0), jax.random.key(1), time.time()
    for s in range(1, a.steps + 1):
        loss = train_step(model, opt, *training_batch(a.batch, categories, conds, rng), jax.random.fold_in(key, s))
        if s % 100 == 0:
            print(s, float(loss), f"{s / (time.time() - t0):.2f} steps/s", flush=True)
        if s == a.steps or s == a.steps // 2:
            evaluate(model, sample, conds, s, a.out)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
