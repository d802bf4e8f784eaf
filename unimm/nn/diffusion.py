"""Gaussian diffusion math: noise schedules, forward noising, the DDPM/DDIM step,
prediction targets and loss weights (the sampler loop is `unimm.nn.sampling`).

Timesteps are integers 0..T-1 (0 = least noise); `alphas_cumprod[t]` is the
signal fraction at t. Samplers walk a descending subsequence of timesteps; the
last step lands on clean data (alpha = 1).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

def cosine_alphas_cumprod(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule, with betas capped at `max_beta`."""
    f = lambda t: math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2
    betas = np.array([min(1 - f(i + 1) / f(i), max_beta) for i in range(num_timesteps)], np.float64)
    return np.cumprod(1.0 - betas).astype(np.float32)


def linear_alphas_cumprod(num_timesteps: int = 1000, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
    betas = np.linspace(start, end, num_timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas).astype(np.float32)


SCHEDULES = {"cosine": cosine_alphas_cumprod, "linear": linear_alphas_cumprod}


def alphas_cumprod(schedule: str, num_timesteps: int) -> np.ndarray:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {schedule!r}; choose from {sorted(SCHEDULES)}")
    return SCHEDULES[schedule](num_timesteps)


def _bcast(a: jax.Array, x: jax.Array) -> jax.Array:
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def q_sample(x0: jax.Array, t: jax.Array, noise: jax.Array, acp: jax.Array) -> jax.Array:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps; t broadcasts over x0's leading dims."""
    a = _bcast(acp[t], x0)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


SPACINGS = ("linspace", "leading")


def sampling_timesteps(num_timesteps: int, steps: int, spacing: str = "linspace") -> np.ndarray:
    """`steps` descending timesteps a sampler visits.

    'linspace': evenly spaced from T-1 to 0 (iDDPM's respacing). It starts at
    the last timestep, where the cosine schedule's alpha_bar is about 2.4e-9: an
    eps-predicting model's error there is multiplied by sqrt((1 - a) / a) into
    its x0 estimate, so it suits v- or x0-prediction (or x0 clipping to a
    known range). 'leading': 0, T/S, ..., (S-1) T/S, plus 1 (DDIM's spacing, as
    Stable Diffusion samples): the first step starts where the signal is
    resolvable (t = 997 of 1000 at 250 steps, 961 at 25)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampling steps must be in 1..{num_timesteps}, got {steps}")
    if spacing == "linspace":
        return np.unique(np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int32))[::-1].copy()
    if spacing == "leading":
        stride = num_timesteps // steps
        offset = min(1, num_timesteps - 1 - (steps - 1) * stride)
        return (np.arange(steps - 1, -1, -1) * stride + offset).astype(np.int32)
    raise ValueError(f"unknown timestep spacing {spacing!r}; choose from {SPACINGS}")


def x0_from_eps(x_t: jax.Array, eps: jax.Array, acp_t: jax.Array, clip: float | None = None) -> jax.Array:
    """The clean image a noise estimate implies at signal level acp_t, bounded by `clip` if given."""
    a = _bcast(acp_t, x_t)
    x0 = (x_t - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
    return x0 if clip is None else jnp.clip(x0, -clip, clip)


def step(x_t: jax.Array, eps: jax.Array, a_t: jax.Array, a_prev: jax.Array, eta: float,
         noise: jax.Array, clip: float | None = None) -> jax.Array:
    """One reverse step from signal level a_t to a_prev (a_prev = 1 is clean data).

    eta = 0 is DDIM (deterministic); eta = 1 is DDPM's ancestral step with the
    posterior variance of the respaced schedule. `clip` bounds the predicted x0
    (pixels in [-1, 1]); the noise estimate is then made consistent with it.
    """
    x0 = x0_from_eps(x_t, eps, a_t, clip)
    a_t, a_prev = _bcast(a_t, x_t), _bcast(a_prev, x_t)
    if clip is not None:
        eps = (x_t - jnp.sqrt(a_t) * x0) / jnp.sqrt(1.0 - a_t)
    var = eta**2 * (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - var, 0.0)) * eps
    return jnp.sqrt(a_prev) * x0 + direction + jnp.sqrt(var) * noise


TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def sample_timesteps(rng: jax.Array, shape, num_timesteps: int, kind: str = "uniform", mean: float = 0.0,
                     std: float = 1.0) -> jax.Array:
    """Integer training timesteps in [0, T). 'uniform' is DDPM's; 'logit_normal'
    draws t/T = sigmoid(mean + std * n) (Esser et al., 2024), so a positive mean
    spends more of training at high noise, where a sample's layout is decided."""
    if kind == "uniform":
        return jax.random.randint(rng, shape, 0, num_timesteps)
    if kind == "logit_normal":
        u = jax.nn.sigmoid(mean + std * jax.random.normal(rng, shape))
        return jnp.clip(jnp.floor(u * num_timesteps), 0, num_timesteps - 1).astype(jnp.int32)
    raise ValueError(f"unknown timestep sampling {kind!r}; choose from {TIMESTEP_SAMPLINGS}")


PREDICTIONS = ("eps", "v", "x0")
WEIGHTINGS = ("none", "min_snr")


def v_target(x0: jax.Array, eps: jax.Array, acp_t: jax.Array) -> jax.Array:
    """v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho, 2022)."""
    a = _bcast(acp_t, x0)
    return jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * x0


def eps_from_v(v: jax.Array, x_t: jax.Array, acp_t: jax.Array) -> jax.Array:
    a = _bcast(acp_t, x_t)
    return jnp.sqrt(a) * v + jnp.sqrt(1.0 - a) * x_t


def prediction_target(prediction: str, x0: jax.Array, eps: jax.Array, acp_t: jax.Array) -> jax.Array:
    """What a model that predicts `prediction` (eps, v or x0) is trained to output."""
    if prediction == "eps":
        return eps
    if prediction == "v":
        return v_target(x0, eps, acp_t)
    if prediction == "x0":
        return x0
    raise ValueError(f"unknown prediction {prediction!r}; choose from {PREDICTIONS}")


def eps_from_prediction(prediction: str, out: jax.Array, x_t: jax.Array, acp_t: jax.Array) -> jax.Array:
    """The noise estimate a model output implies, for the samplers."""
    if prediction == "eps":
        return out
    if prediction == "v":
        return eps_from_v(out, x_t, acp_t)
    if prediction == "x0":
        a = _bcast(acp_t, x_t)
        return (x_t - jnp.sqrt(a) * out) / jnp.sqrt(jnp.maximum(1.0 - a, 1e-12))
    raise ValueError(f"unknown prediction {prediction!r}; choose from {PREDICTIONS}")


def loss_weight(weighting: str, prediction: str, acp_t: jax.Array, gamma: float = 5.0) -> jax.Array:
    """Per-example weight of the prediction's MSE at signal level acp_t.

    An x0 error costs SNR in eps-MSE, SNR + 1 in v-MSE and 1 in x0-MSE:
    eps-prediction all but ignores the noisiest steps, where only the
    conditioning says what to draw; v- and x0-prediction do not. 'none':
    weight 1. 'min_snr': Hang et al. (2023), weights that make every
    prediction's loss min(SNR, gamma) times the x0 error, so the nearly clean
    steps stop dominating the gradient.
    """
    if weighting == "none":
        return jnp.ones_like(acp_t)
    if weighting == "min_snr":
        snr = acp_t / (1.0 - acp_t)
        per_x0 = {"eps": snr, "v": snr + 1.0, "x0": jnp.ones_like(snr)}[prediction]
        return jnp.minimum(snr, gamma) / per_x0
    raise ValueError(f"unknown diffusion loss weighting {weighting!r}; choose from {WEIGHTINGS}")


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding (..., dim) of (possibly fractional) timesteps."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.asarray(t, jnp.float32)[..., None] * freqs
    emb = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    return jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, dim % 2)])
