import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm.nn import diffusion as diff


def test_cosine_schedule_shape():
    acp = diff.cosine_alphas_cumprod(1000)
    assert acp.shape == (1000,) and np.all(np.diff(acp) < 0)
    assert acp[0] > 0.999 and acp[-1] < 1e-3


def test_q_sample_keeps_unit_variance():
    acp = jnp.asarray(diff.cosine_alphas_cumprod(1000))
    x0 = jax.random.normal(jax.random.key(0), (4096, 8))
    t = jnp.full((4096,), 400)
    xt = diff.q_sample(x0, t, jax.random.normal(jax.random.key(1), x0.shape), acp)
    assert abs(float(xt.var()) - 1.0) < 0.05


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_true_noise_walks_back_to_the_data(eta):
    """With the exact noise as the prediction, the deterministic sampler recovers x0
    exactly and the stochastic one recovers it at the final (a_prev = 1) step."""
    acp = diff.cosine_alphas_cumprod(1000)
    x0 = jax.random.normal(jax.random.key(0), (3, 5))
    eps = jax.random.normal(jax.random.key(1), (3, 5))
    ts = diff.sampling_timesteps(1000, 10)
    x = diff.q_sample(x0, jnp.full((3,), ts[0]), eps, jnp.asarray(acp))
    for i, t in enumerate(ts):
        a_t = acp[t]
        a_prev = acp[ts[i + 1]] if i + 1 < len(ts) else 1.0
        true_eps = (x - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
        noise = jax.random.normal(jax.random.key(10 + i), x.shape)
        x = diff.step(x, true_eps, jnp.full((3,), a_t), jnp.full((3,), a_prev), eta, noise)
    np.testing.assert_allclose(x, x0, atol=1e-4)


def test_ddpm_step_has_the_posterior_variance():
    acp = diff.cosine_alphas_cumprod(1000)
    a_t, a_prev = acp[600], acp[500]
    x = jnp.zeros((20000,))
    noise = jax.random.normal(jax.random.key(0), x.shape)
    out = diff.step(x, jnp.zeros_like(x), jnp.full(x.shape, a_t), jnp.full(x.shape, a_prev), 1.0, noise)
    posterior = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    assert abs(float(out.var()) / posterior - 1) < 0.05


def test_sampling_timesteps_and_errors():
    ts = diff.sampling_timesteps(1000, 50)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 50 and np.all(np.diff(ts) < 0)
    with pytest.raises(ValueError, match="sampling steps"):
        diff.sampling_timesteps(1000, 0)
    with pytest.raises(ValueError, match="schedule"):
        diff.alphas_cumprod("sigmoid", 10)


def test_v_parametrisation_gives_back_the_noise():
    acp = jnp.asarray(diff.cosine_alphas_cumprod(1000))
    x0 = jax.random.normal(jax.random.key(0), (5, 4, 4, 3))
    eps = jax.random.normal(jax.random.key(1), x0.shape)
    t = jnp.array([0, 250, 500, 900, 999])
    xt = diff.q_sample(x0, t, eps, acp)
    v = diff.v_target(x0, eps, acp[t])
    np.testing.assert_allclose(diff.eps_from_v(v, xt, acp[t]), eps, atol=1e-4)


def test_min_snr_weights():
    a = jnp.array([0.999, 0.5, 0.01])
    snr = a / (1 - a)
    np.testing.assert_allclose(diff.loss_weight("min_snr", "eps", a), jnp.minimum(snr, 5) / snr, rtol=1e-5)
    np.testing.assert_allclose(diff.loss_weight("min_snr", "v", a), jnp.minimum(snr, 5) / (snr + 1), rtol=1e-5)
    np.testing.assert_array_equal(diff.loss_weight("none", "eps", a), 1.0)
    with pytest.raises(ValueError, match="weighting"):
        diff.loss_weight("p2", "eps", a)


@pytest.mark.parametrize("prediction", diff.PREDICTIONS)
def test_every_prediction_gives_back_the_noise(prediction):
    acp = jnp.asarray(diff.cosine_alphas_cumprod(1000))
    x0 = jax.random.normal(jax.random.key(0), (5, 4, 4, 3))
    eps = jax.random.normal(jax.random.key(1), x0.shape)
    t = jnp.array([0, 250, 500, 900, 998])
    xt = diff.q_sample(x0, t, eps, acp)
    target = diff.prediction_target(prediction, x0, eps, acp[t])
    np.testing.assert_allclose(diff.eps_from_prediction(prediction, target, xt, acp[t]), eps, atol=2e-3)
    with pytest.raises(ValueError, match="prediction"):
        diff.prediction_target("score", x0, eps, acp[t])


def test_min_snr_makes_every_prediction_weigh_x0_errors_alike():
    # eps-MSE = SNR * x0-MSE and v-MSE = (SNR + 1) * x0-MSE: after min-SNR
    # weighting all three cost min(SNR, gamma) per unit of x0 error.
    a = jnp.array([0.999, 0.5, 0.01])
    snr = a / (1 - a)
    per_x0 = {"eps": snr, "v": snr + 1, "x0": jnp.ones_like(snr)}
    for p in diff.PREDICTIONS:
        np.testing.assert_allclose(diff.loss_weight("min_snr", p, a) * per_x0[p], jnp.minimum(snr, 5), rtol=1e-5)


def test_timestep_sampling():
    key = jax.random.key(0)
    u = diff.sample_timesteps(key, (20000,), 1000, "uniform")
    assert u.dtype == jnp.int32 and int(u.min()) >= 0 and int(u.max()) <= 999
    assert abs(float(u.mean()) - 499.5) < 10
    ln = diff.sample_timesteps(key, (20000,), 1000, "logit_normal", mean=1.0, std=1.0)
    assert int(ln.min()) >= 0 and int(ln.max()) <= 999
    # t/T = sigmoid(N(1, 1)): the median sits at sigmoid(1) = 0.731.
    assert abs(float(jnp.median(ln)) - 731) < 10
    with pytest.raises(ValueError, match="timestep sampling"):
        diff.sample_timesteps(key, (4,), 1000, "beta")
