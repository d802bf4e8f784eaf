"""A text-free baseline for the scenes: a plain conditional conv U-Net (no transformer, no LM).

It trains on one-object scenes (or all) with v-prediction, conditioned either on class
embeddings of the prompt's shape and colour (--cond class) or on the mean of learned word
embeddings of the caption (--cond pooled), samples with DDIM 25 and CFG, and scores 32
single-object and 32 colour prompts with the scene checker. It sets what the image path
alone reaches at a budget (docs/transfusion.md, ninth round):

    python tools/scene_unet_baseline.py --cond class --data so --steps 2000 --out /tmp/unet
"""
import argparse, json, sys, time
import numpy as np, jax, jax.numpy as jnp, optax
from flax import nnx

from unimm.data import spec as spec_lib, scenes, vocab
from unimm.eval import prompts as prompts_lib, geneval
from unimm.nn import diffusion as D
from unimm.nn.image_io import ResBlock, Conv, GroupNorm, TimestepMLP

p = argparse.ArgumentParser()
p.add_argument("--cond", default="class")  # class | pooled
p.add_argument("--data", default="so")  # so | all
p.add_argument("--steps", type=int, default=2000)
p.add_argument("--ch", default="32,64,128")
p.add_argument("--mid", type=int, default=1)
p.add_argument("--cfg", type=float, default=3.0)
p.add_argument("--out", default="scene_unet")
a = p.parse_args()
CH = [int(c) for c in a.ch.split(",")]
SHAPES, COLORS = list(vocab.SHAPES), list(vocab.COLORS)
WORDS = sorted({w for c in ["a an and two three four five six to the left right of above below"] for w in c.split()} | set(SHAPES) | {s + "s" for s in SHAPES} | set(COLORS) | set(vocab.NUMBER_WORDS))
WID = {w: i + 1 for i, w in enumerate(WORDS)}
L = 16
cats = ["single_object", "colors"] if a.data == "so" else list(spec_lib.ALL_CATEGORIES)
rng = np.random.default_rng(0)

def encode_caption(text):
    ids = [WID.get(w, 0) for w in text.replace(",", "").split()][:L]
    return ids + [-1] * (L - len(ids))

def labels(spec):
    g = spec.groups[0]
    return SHAPES.index(g.shape) + 1, (COLORS.index(g.color) + 1 if g.color else 0)

def batch(n):
    imgs, caps, sh, co = [], [], [], []
    for _ in range(n):
        spec = spec_lib.sample_spec(cats[rng.integers(len(cats))], rng)
        imgs.append(scenes.render(scenes.sample_scene(spec, rng)))
        caps.append(encode_caption(spec_lib.caption(spec))); s, c = labels(spec); sh.append(s); co.append(c)
    x = np.stack(imgs).astype(np.float32) / 127.5 - 1
    return x, np.array(caps, np.int32), np.array(sh, np.int32), np.array(co, np.int32)

class Net(nnx.Module):
    def __init__(self, rngs):
        d = 128
        self.temb = TimestepMLP(d, rngs=rngs)
        self.shape_emb = nnx.Embed(len(SHAPES) + 1, d, rngs=rngs)
        self.color_emb = nnx.Embed(len(COLORS) + 1, d, rngs=rngs)
        self.word_emb = nnx.Embed(len(WORDS) + 1, d, rngs=rngs)
        self.cap_mlp = nnx.Linear(d, d, rngs=rngs)
        self.conv_in = Conv(3, CH[0], rngs=rngs)
        self.down = nnx.List([ResBlock(c, c, d, rngs=rngs) for c in CH])
        self.ds = nnx.List([Conv(CH[i], CH[i + 1], 3, 2, rngs=rngs) for i in range(len(CH) - 1)])
        self.mid = nnx.List([ResBlock(CH[-1], CH[-1], d, rngs=rngs) for _ in range(a.mid)])
        self.up = nnx.List([ResBlock(2 * c, c, d, rngs=rngs) for c in CH])
        self.us = nnx.List([Conv(CH[i + 1], CH[i], rngs=rngs) for i in range(len(CH) - 1)])
        self.norm = GroupNorm(CH[0]); self.out = Conv(CH[0], 3, zero_init=True, rngs=rngs)
    def cond(self, caps, sh, co, keep):
        if a.cond == "class":
            e = self.shape_emb(sh) + self.color_emb(co)
        else:
            v = (caps >= 0).astype(jnp.float32)
            e = (self.word_emb(jnp.maximum(caps, 0)) * v[..., None]).sum(1) / jnp.maximum(v.sum(1, keepdims=True), 1)
            e = self.cap_mlp(e)
        return e * keep[:, None]
    def __call__(self, x, t, c):
        temb = self.temb(t, c)
        h = self.conv_in(x); skips = []
        for i, b in enumerate(self.down):
            h = b(h, temb); skips.append(h)
            if i < len(self.ds): h = self.ds[i](h)
        for b in self.mid: h = b(h, temb)
        for i in reversed(range(len(self.up))):
            h = self.up[i](jnp.concatenate([h, skips[i]], -1), temb)
            if i > 0:
                n, hh, ww, cc = h.shape
                h = self.us[i - 1](jax.image.resize(h, (n, 2 * hh, 2 * ww, cc), "nearest"))
        return self.out(jax.nn.silu(self.norm(h)))

acp = jnp.asarray(D.alphas_cumprod("cosine", 1000), jnp.float32)
model = Net(nnx.Rngs(0))
sched = optax.warmup_cosine_decay_schedule(0, 1e-3, 100, a.steps, 1e-4)
opt = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b2=0.95, weight_decay=0.0)), wrt=nnx.Param)
print("params", sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))), flush=True)

@nnx.jit
def train_step(model, opt, x0, caps, sh, co, key):
    k1, k2, k3 = jax.random.split(key, 3)
    t = jax.random.randint(k1, (x0.shape[0],), 0, 1000)
    eps = jax.random.normal(k2, x0.shape)
    keep = (jax.random.uniform(k3, (x0.shape[0],)) > 0.1).astype(jnp.float32)
    xt = D.q_sample(x0, t, eps, acp)
    def lf(m):
        out = m(xt, t, m.cond(caps, sh, co, keep))
        return jnp.mean((out - D.v_target(x0, eps, acp[t])) ** 2)
    loss, g = nnx.value_and_grad(lf)(model)
    opt.update(model, g)
    return loss

@nnx.jit
def sample(model, caps, sh, co, key):
    n = caps.shape[0]
    ts = D.sampling_timesteps(1000, 25)
    x = jax.random.normal(key, (n, 32, 32, 3))
    c = model.cond(caps, sh, co, jnp.ones((n,))); u = model.cond(caps, sh, co, jnp.zeros((n,)))
    for i, t in enumerate(ts):
        tt = jnp.full((2 * n,), t)
        out = model(jnp.concatenate([x, x]), tt, jnp.concatenate([c, u]))
        eps = D.eps_from_prediction("v", out, jnp.concatenate([x, x]), acp[tt])
        eps = D.guide(eps[:n], eps[n:], a.cfg)
        a_prev = acp[ts[i + 1]] if i + 1 < len(ts) else jnp.float32(1.0)
        x = D.step(x, eps, acp[t], a_prev, 0.0, jnp.zeros_like(x), 1.0)
    return x

def evaluate(step):
    plan = [(e, k) for e, k in prompts_lib.plan(32) if e["category"] in ("single_object", "colors")]
    specs = [spec_lib.Spec.from_dict(e["spec"]) for e, _ in plan]
    caps = jnp.array([encode_caption(e["prompt"]) for e, _ in plan]); lab = np.array([labels(s) for s in specs])
    x = sample(model, caps, jnp.array(lab[:, 0]), jnp.array(lab[:, 1]), jax.random.key(step))
    imgs = np.asarray(jnp.clip((x + 1) * 127.5, 0, 255)).astype(np.uint8)
    res = {}
    for (e, k), img in zip(plan, imgs):
        ok, _ = geneval.score_image(e["spec"], img); res.setdefault(e["category"], []).append(ok)
        res.setdefault(e["category"] + ":" + e["spec"]["groups"][0]["shape"], []).append(ok)
    out = {k: float(np.mean(v)) for k, v in res.items()}
    print("eval", step, json.dumps(out), flush=True)
    from PIL import Image
    grid = imgs[:64].reshape(8, 8, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(256, 256, 3)
    Image.fromarray(grid).resize((512, 512), Image.NEAREST).save(f"{a.out}_{step}.png")

t0 = time.time(); key = jax.random.key(1)
for s in range(1, a.steps + 1):
    x0, caps, sh, co = batch(16)
    loss = train_step(model, opt, jnp.asarray(x0), jnp.asarray(caps), jnp.asarray(sh), jnp.asarray(co), jax.random.fold_in(key, s))
    if s % 100 == 0: print(s, float(loss), f"{s / (time.time() - t0):.2f} steps/s", flush=True)
    if s in (1000,) or s == a.steps: evaluate(s)
print("total", time.time() - t0)
