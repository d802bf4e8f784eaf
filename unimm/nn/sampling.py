"""The image sampler loop and its solvers, for every recipe that draws continuous images.

    x, aux = sample(solver, predict, noise, rng)

`predict(x, t, aux) -> (prediction, aux)` is the recipe's model call (guided,
conditioned on a cached prefix, ...) at the solver's time t; `aux` is whatever
the prediction carries from one step to the next (a self-conditioning
estimate), None if nothing. The loop and the solvers know no model.

Solvers are frozen dataclasses (hashable, so they can be static jit arguments):

- `DDIM`: Gaussian diffusion over the integer timesteps of a discrete noise
  schedule, T-1 down to 0; `predict` returns the noise estimate eps. eta = 0
  is DDIM (Song et al., 2021), eta = 1 DDPM's ancestral sampler with the
  respaced posterior variance (Nichol & Dhariwal, 2021). `clip` bounds the
  clean-data estimate each step implies (see `diffusion.step`).
- `Euler`, `Heun`: the rectified-flow ODE dz/dt = v(z, t) from t = 0 (noise)
  to t = 1 (data), z_t = t x + (1 - t) z0; `predict` returns the velocity.
  Time is float32 in [0, 1]. Heun (a second-order predictor-corrector) makes
  two model calls a step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from unimm.nn import diffusion as diff

Predict = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class DDIM:
    """Respaced DDIM/DDPM steps over `timesteps` (descending integers)."""

    schedule: str
    num_timesteps: int
    timesteps: tuple
    eta: float = 0.0
    clip: Optional[float] = None

    @classmethod
    def make(cls, schedule: str, num_timesteps: int, steps: int, eta: float = 0.0, clip: Optional[float] = None,
             spacing: str = "linspace"):
        ts = tuple(int(t) for t in diff.sampling_timesteps(num_timesteps, steps, spacing))
        return cls(schedule, num_timesteps, ts, float(eta), None if clip is None else float(clip))

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def step(self, predict: Predict, i, x, aux, rng):
        acp = jnp.asarray(diff.alphas_cumprod(self.schedule, self.num_timesteps))
        ts = jnp.asarray(self.timesteps, jnp.int32)
        t = ts[i]
        last = ts.shape[0] - 1
        a_prev = jnp.where(i < last, acp[ts[jnp.minimum(i + 1, last)]], 1.0)
        eps, aux = predict(x, t, aux)
        b = x.shape[:1]
        noise = jax.random.normal(rng, x.shape, jnp.float32)
        x = diff.step(x, eps.astype(jnp.float32), jnp.full(b, acp[t]), jnp.full(b, a_prev), self.eta, noise,
                      self.clip)
        return x, aux


@dataclasses.dataclass(frozen=True)
class Euler:
    """Explicit Euler steps of the flow ODE over `steps` equal intervals of [0, 1]."""

    steps: int

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"flow sampling needs >= 1 step, got {self.steps}")

    @property
    def num_steps(self) -> int:
        return self.steps

    def _times(self, i):
        return i.astype(jnp.float32) / self.steps, (i + 1).astype(jnp.float32) / self.steps

    def step(self, predict: Predict, i, x, aux, rng):
        del rng
        t, t_next = self._times(jnp.asarray(i))
        v, aux = predict(x, t, aux)
        return x + (t_next - t) * v.astype(jnp.float32), aux


@dataclasses.dataclass(frozen=True)
class Heun(Euler):
    """Heun's method: an Euler step, then the average of the velocities at both ends."""

    def step(self, predict: Predict, i, x, aux, rng):
        del rng
        t, t_next = self._times(jnp.asarray(i))
        v0, aux = predict(x, t, aux)
        guess = x + (t_next - t) * v0.astype(jnp.float32)
        v1, aux = predict(guess, t_next, aux)
        return x + (t_next - t) * 0.5 * (v0 + v1).astype(jnp.float32), aux


DIFFUSION_SOLVERS = ("ddpm", "ddim")  # predict -> eps, integer timesteps
FLOW_SOLVERS = ("euler", "heun")  # predict -> velocity, t in [0, 1]


def make(name: str, steps: int, *, schedule: str = "cosine", num_timesteps: int = 1000, ddim_eta: float = 0.0,
         clip: Optional[float] = None, spacing: str = "linspace"):
    """A solver by name: 'ddpm' (DDIM with eta 1), 'ddim' (eta `ddim_eta`), 'euler' or 'heun'."""
    if name in DIFFUSION_SOLVERS:
        return DDIM.make(schedule, num_timesteps, steps, 1.0 if name == "ddpm" else ddim_eta, clip, spacing)
    if name == "euler":
        return Euler(steps)
    if name == "heun":
        return Heun(steps)
    raise ValueError(f"unknown sampler {name!r}; choose from {DIFFUSION_SOLVERS + FLOW_SOLVERS}")


def sample(solver, predict: Predict, x: jax.Array, rng: jax.Array, aux: Any = None):
    """Run `solver` from `x` (noise) for its steps; returns (sample, final aux)."""

    def body(i, carry):
        x, aux, rng = carry
        rng, sub = jax.random.split(rng)
        x, aux = solver.step(predict, i, x, aux, sub)
        return x, aux, rng

    x, aux, _ = jax.lax.fori_loop(0, solver.num_steps, body, (x.astype(jnp.float32), aux, rng))
    return x, aux


def flow_interpolate(x: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """z_t = t x + (1 - t) z0, t broadcast over x's leading dims (rectified flow's path)."""
    t = t.reshape(t.shape + (1,) * (x.ndim - t.ndim))
    return t * x + (1.0 - t) * noise


def flow_target(x: jax.Array, noise: jax.Array) -> jax.Array:
    """The velocity rectified flow trains towards: x - z0."""
    return x - noise
