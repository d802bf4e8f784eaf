import dataclasses
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm import objectives
from unimm.nn import diffusion as diff
from unimm.nn import sampling

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def _gaussian_denoiser(sigma: float, delta=None):
    """The exact eps prediction for data x0 ~ N(0, sigma^2): eps = sqrt(1-a) x_t / (a sigma^2 + 1 - a);
    with `delta`, the first call's prediction is off by it (aux carries 'first call')."""
    acp = jnp.asarray(diff.alphas_cumprod("cosine", 1000))

    def predict(x, t, first):
        a = acp[t]
        eps = jnp.sqrt(1 - a) * x / (a * sigma**2 + 1 - a)
        return eps + (0.0 if delta is None else jnp.where(first, delta, 0.0)), jnp.zeros((), bool)

    return predict


def _final(solver, predict, shape=(4, 8, 8, 4)):
    x = jax.random.normal(jax.random.key(0), shape)
    return sampling.sample(solver, predict, x, jax.random.key(1), jnp.ones((), bool))[0]


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_the_true_noise_walks_back_to_the_data(eta):
    """With the exact noise as its prediction, the loop recovers x0: exactly when
    deterministic, at the final (clean) step when stochastic."""
    acp = jnp.asarray(diff.alphas_cumprod("cosine", 1000))
    x0 = jax.random.normal(jax.random.key(0), (3, 5))
    solver = sampling.DDIM.make("cosine", 1000, 10, eta)
    x_T = diff.q_sample(x0, jnp.full((3,), solver.timesteps[0]), jax.random.normal(jax.random.key(1), (3, 5)), acp)
    predict = lambda x, t, aux: ((x - jnp.sqrt(acp[t]) * x0) / jnp.sqrt(1 - acp[t]), aux)
    out, _ = sampling.sample(solver, predict, x_T, jax.random.key(2))
    np.testing.assert_allclose(out, x0, atol=1e-4)


def _paper_solver(sampler: str, steps: int):
    """Transfusion 7B's sampler as its config builds it, with a measured latent range (scale 0.2, max 20)."""
    spec = importlib.util.spec_from_file_location("tf7b", CONFIGS / "transfusion_7b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.sampling.update(sampler=sampler, sample_steps=steps)
    obj = objectives.build(cfg, shapes_only=True)
    obj.s = dataclasses.replace(obj.s, latent_scale=0.2, latent_max=20.0)
    return obj.solver()


@pytest.mark.parametrize("sampler, steps", [("ddpm", 250), ("ddpm", 25), ("ddim", 250), ("ddim", 25)])
def test_an_error_in_the_first_prediction_stays_small(sampler, steps):
    """The paper configs' sampler (DDIM's leading spacing, x0 clipped to the latent
    range): an error of 1e-3 in the first noise prediction moves the final sample
    by less than 1e-2. Starting at t = 999 (linspace, as before) moves it by 0.3 to 5
    in three of these four settings."""
    solver = _paper_solver(sampler, steps)
    assert solver.timesteps[0] < 999 and solver.clip == pytest.approx(4.0)
    u = jax.random.normal(jax.random.key(3), (4, 8, 8, 4)) * 1e-3
    clean = _final(solver, _gaussian_denoiser(1.0))
    assert abs(float(clean.std()) - 1.0) < 0.1  # the exact denoiser does draw the data distribution
    moved = float(jnp.abs(_final(solver, _gaussian_denoiser(1.0, u)) - clean).max())
    assert moved < 1e-2
    old = dataclasses.replace(solver, timesteps=tuple(int(t) for t in diff.sampling_timesteps(1000, steps)),
                              clip=None)
    old_moved = float(jnp.abs(_final(old, _gaussian_denoiser(1.0, u)) - _final(old, _gaussian_denoiser(1.0))).max())
    assert old_moved > 1e-3 and (old_moved > 0.1 or (sampler, steps) == ("ddpm", 250))


def test_leading_spacing():
    ts = diff.sampling_timesteps(1000, 250, "leading")
    assert ts[0] == 997 and ts[-1] == 1 and len(ts) == 250 and np.all(np.diff(ts) == -4)
    assert list(diff.sampling_timesteps(1000, 1000, "leading")[:2]) == [999, 998]
    with pytest.raises(ValueError, match="timestep spacing"):
        diff.sampling_timesteps(1000, 10, "trailing-ish")


def _gaussian_velocity(mu: float, sigma: float):
    """The exact rectified-flow velocity for data N(mu, sigma^2) and noise N(0, 1):
    z_t = t x + (1 - t) z0, v(z, t) = E[x - z0 | z_t = z]."""
    def predict(z, t, aux):
        var = t**2 * sigma**2 + (1 - t) ** 2
        return mu + (t * sigma**2 - (1 - t)) / var * (z - t * mu), aux
    return predict


def test_flow_solvers_carry_noise_to_the_data():
    """Exact velocities map noise z0 to mu + sigma z0; Heun is far more accurate than Euler in as many steps."""
    mu, sigma = 0.5, 2.0
    z0 = jax.random.normal(jax.random.key(0), (256,))
    exact = mu + sigma * z0
    err = {}
    for name, steps in (("euler", 30), ("heun", 30), ("euler", 120)):
        out, _ = sampling.sample(sampling.make(name, steps), _gaussian_velocity(mu, sigma), z0, jax.random.key(1))
        err[(name, steps)] = float(jnp.abs(out - exact).max())
    assert err[("euler", 30)] < 0.4 and err[("heun", 30)] < 5e-3
    assert err[("euler", 120)] < err[("euler", 30)] / 3  # first order: 4x the steps, about a quarter the error
    assert err[("heun", 30)] < err[("euler", 120)]


def test_flow_path_and_target():
    x, z0 = jnp.array([[2.0, -1.0]]), jnp.array([[0.5, 0.5]])
    np.testing.assert_allclose(sampling.flow_interpolate(x, z0, jnp.array([0.25])), [[0.875, 0.125]])
    np.testing.assert_allclose(sampling.flow_target(x, z0), [[1.5, -1.5]])


def test_unknown_sampler_is_named():
    with pytest.raises(ValueError, match="unknown sampler 'euler2'"):
        sampling.make("euler2", 10)
