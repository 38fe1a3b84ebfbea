"""Flow matching: time sampling, interpolation, the masked loss and the ODE sampler.

References are float64 numpy (closed-form distributions and ODE solutions); tolerances are
stated next to each check.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from twinbrain_jax import flow_matching as fm

S = 0.999


def test_sample_time_is_the_gr00t_transform_of_beta():
  """t = (s - tau) / s exactly, tau = u ** (1 / 1.5) the inverse CDF of Beta(1.5, 1) at the same
  uniform draws u (float32 rounding, 1e-6)."""
  rng = jax.random.key(3)
  t = np.asarray(fm.sample_time(rng, (1000,)), np.float64)
  tau = np.asarray(jax.random.uniform(rng, (1000,)), np.float64) ** (1 / 1.5)
  np.testing.assert_allclose(t, (S - tau) / S, rtol=0, atol=1e-6)


def test_sample_time_with_beta_other_than_one_matches_scipy():
  """Beta(2, 3) (no closed-form inverse CDF, so jax.random.beta): KS distance to scipy's CDF below
  the 99 % critical value 1.63 / sqrt(n)."""
  n = 50_000
  t = np.sort(np.asarray(fm.sample_time(jax.random.key(0), (n,), alpha=2.0, beta=3.0), np.float64))
  cdf = 1 - scipy.stats.beta(2.0, 3.0).cdf(np.clip(S * (1 - t), 0, 1))
  ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
  assert ks < 1.63 / math.sqrt(n), ks


def test_sample_time_distribution_matches_beta_cdf():
  """KS distance to the exact CDF and the first two moments against the closed form.

  tau ~ Beta(1.5, 1) has CDF u**1.5, so P(t <= x) = 1 - (s (1 - x))**1.5. With n = 200k draws the
  KS statistic stays below 1.63 / sqrt(n) (the 99 % critical value) and the moments within five
  standard errors.
  """
  n = 200_000
  t = np.sort(np.asarray(fm.sample_time(jax.random.key(0), (n,)), np.float64))
  assert t.min() > (S - 1) / S - 1e-7 and t.max() <= 1.0 + 1e-7
  cdf = 1 - np.clip(S * (1 - t), 0, 1) ** 1.5
  ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
  assert ks < 1.63 / math.sqrt(n), ks

  mean_tau, var_tau = 1.5 / 2.5, 1.5 * 1.0 / (2.5 ** 2 * 3.5)
  mean_t, var_t = (S - mean_tau) / S, var_tau / S ** 2
  assert abs(t.mean() - mean_t) < 5 * math.sqrt(var_t / n)
  # Var of the sample variance ~ (mu4 - var^2) / n; 5 sigma with mu4 bounded by E|t - m|^4 <= 1.
  assert abs(t.var() - var_t) < 5 * math.sqrt(1.0 / n)
  # Skewed toward noise: most of the mass is below t = 0.5 (exact: 1 - (0.4995)**1.5 = 0.647).
  np.testing.assert_allclose(np.mean(t < 0.5), 1 - (S * 0.5) ** 1.5, atol=5e-3)


def test_interpolate_and_target_match_numpy():
  rng = np.random.default_rng(0)
  noise, actions = rng.normal(size=(2, 5, 4, 3))
  t = np.array([0.0, 0.3, 0.5, 0.9, 1.0])
  x_t, target = fm.interpolate(jnp.asarray(noise, jnp.float32), jnp.asarray(actions, jnp.float32),
                               jnp.asarray(t, jnp.float32))
  ref_x = (1 - t[:, None, None]) * noise + t[:, None, None] * actions
  np.testing.assert_allclose(x_t, ref_x, atol=1e-6)
  np.testing.assert_allclose(target, actions - noise, atol=1e-6)
  # End points: t = 0 is pure noise, t = 1 the clean actions.
  np.testing.assert_allclose(x_t[0], noise[0], atol=1e-6)
  np.testing.assert_allclose(x_t[-1], actions[-1], atol=1e-6)
  with pytest.raises(ValueError, match="one time per example"):
    fm.interpolate(jnp.zeros((2, 3, 1)), jnp.zeros((2, 3, 1)), jnp.zeros((3,)))


def test_discretize_timestep():
  t = jnp.array([-0.0009, 0.0, 0.0005, 0.25, 0.7509, 0.9999, 1.0])
  np.testing.assert_array_equal(fm.discretize_timestep(t), [0, 0, 0, 250, 750, 999, 1000])
  assert fm.discretize_timestep(t).dtype == jnp.int32


def _loss_with_known_errors(actions, mask, errors, num_repeats):
  """flow_loss with a velocity_fn that returns target + errors[b] for every repeat.

  The velocity_fn recovers the noise from x_t (noise = (x_t - t a) / (1 - t)), so it only gets
  the target right if the repeated batch is in `flow_loss`'s order (row b * R + r is example b).
  Times are pushed near t = 0 (alpha = 50) to keep the division well conditioned.
  """
  actions_r = fm.repeat_batch(actions, num_repeats)
  errors_r = fm.repeat_batch(errors, num_repeats)

  def velocity_fn(x_t, t):
    t = t[:, None, None]
    noise = (x_t - t * actions_r) / (1 - t)
    return actions_r - noise + errors_r

  return fm.flow_loss(velocity_fn, jax.random.key(1), actions, mask, num_repeats=num_repeats,
                      time_alpha=50.0)


@pytest.mark.parametrize("num_repeats", [1, 3])
def test_flow_loss_masked_hand_case(num_repeats):
  """Errors of (b + 1) on valid steps and 100 on padding: loss = mean over valid of (b + 1)^2."""
  actions = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 4, 3)), jnp.float32)
  step_mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)       # 3 + 1 valid steps
  errors = jnp.where(step_mask[..., None], jnp.array([1.0, 2.0])[:, None, None], 100.0)
  errors = jnp.broadcast_to(errors, actions.shape)
  loss = _loss_with_known_errors(actions, step_mask, errors, num_repeats)
  expected = (3 * 3 * 1.0 + 1 * 3 * 4.0) / (4 * 3)                  # = 1.75
  np.testing.assert_allclose(loss, expected, rtol=1e-4)

  # A per-dimension mask [B, T, A]: only the first action dim of every step counts.
  dim_mask = jnp.zeros(actions.shape, bool).at[:, :, 0].set(True)
  errors = jnp.where(dim_mask, jnp.array([1.0, 3.0])[:, None, None], 100.0)
  loss = _loss_with_known_errors(actions, dim_mask, errors, num_repeats)
  np.testing.assert_allclose(loss, (4 * 1.0 + 4 * 9.0) / 8, rtol=1e-4)


def test_flow_loss_repeats_draw_fresh_noise_and_check_shapes():
  actions = jnp.ones((2, 3, 1))
  seen = {}

  def velocity_fn(x_t, t):
    seen["x_t"], seen["t"] = x_t, t
    return jnp.zeros_like(x_t)

  fm.flow_loss(velocity_fn, jax.random.key(0), actions, num_repeats=4)
  assert seen["x_t"].shape == (8, 3, 1) and seen["t"].shape == (8,)
  # Row b * R + r is example b under its own noise and time draw: no two rows share a time.
  np.testing.assert_array_equal(fm.repeat_batch(jnp.arange(2), 3), [0, 0, 0, 1, 1, 1])
  assert len(np.unique(np.asarray(seen["t"]))) == 8
  with pytest.raises(ValueError, match="action_mask has shape"):
    fm.flow_loss(velocity_fn, jax.random.key(0), actions, jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="velocity_fn returned shape"):
    fm.flow_loss(lambda x, t: x[:2], jax.random.key(0), actions, num_repeats=4)


def test_flow_loss_is_jittable_and_zero_for_the_exact_velocity():
  """For one fixed example the exact velocity is (a - x_t) / (1 - t); the loss is ~0 (1e-8)."""
  actions = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4, 2)), jnp.float32)

  @jax.jit
  def loss(rng):
    actions_r = fm.repeat_batch(actions, 2)
    fn = lambda x, t: (actions_r - x) / (1 - t[:, None, None])
    return fm.flow_loss(fn, rng, actions, num_repeats=2, time_alpha=50.0)

  assert float(loss(jax.random.key(0))) < 1e-8


def test_sampler_is_deterministic_for_a_seed():
  fn = lambda x, t: jnp.sin(x) * (1 + t[:, None, None])
  sample = jax.jit(lambda rng: fm.sample_actions(fn, rng, (2, 4, 3), num_steps=4))
  a, b, c = sample(jax.random.key(7)), sample(jax.random.key(7)), sample(jax.random.key(8))
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
  assert a.shape == (2, 4, 3)


def test_euler_and_heun_evaluate_at_the_stated_times():
  """dx/dt = t^2, x0 = 0, four steps. Euler sums t = 0, .25, .5, .75; Heun is the trapezoid rule."""
  fn = lambda x, t: jnp.broadcast_to((t ** 2)[:, None], x.shape)
  x0 = jnp.zeros((1, 1))
  euler = fm.integrate(fn, x0, num_steps=4, method="euler")
  heun = fm.integrate(fn, x0, num_steps=4, method="heun")
  np.testing.assert_allclose(euler, 0.25 * (0 + 1 / 16 + 1 / 4 + 9 / 16), rtol=1e-6)  # 0.21875
  np.testing.assert_allclose(heun, 0.25 * (0.5 * 0 + 1 / 16 + 1 / 4 + 9 / 16 + 0.5), rtol=1e-6)


def test_euler_and_heun_converge_to_the_exact_solution():
  """dx/dt = cos(3t) x + t, solved exactly in float64; Euler is first order, Heun second."""
  x0 = np.linspace(-1.5, 1.5, 6).reshape(2, 3, 1)
  fn = lambda x, t: jnp.cos(3 * t)[:, None, None] * x + t[:, None, None]

  # x(1) = e^{F(1)} (x0 + int_0^1 s e^{-F(s)} ds), F(s) = sin(3s) / 3; quadrature in float64.
  s = np.linspace(0.0, 1.0, 200_001)
  integrand = s * np.exp(-np.sin(3 * s) / 3)
  integral = np.sum((integrand[1:] + integrand[:-1]) / 2) * (s[1] - s[0])
  exact = np.exp(np.sin(3.0) / 3) * (x0 + integral)

  steps = [4, 8, 16, 32, 64]
  errors = {}
  for method in fm.SAMPLER_METHODS:
    solve = jax.jit(lambda x, n=None, m=method: fm.integrate(fn, x, num_steps=n, method=m),
                    static_argnums=1)
    errors[method] = [float(np.abs(np.asarray(solve(jnp.asarray(x0, jnp.float32), n),
                                              np.float64) - exact).max()) for n in steps]
  euler, heun = np.array(errors["euler"]), np.array(errors["heun"])
  assert np.all(np.diff(euler) < 0) and np.all(np.diff(heun) < 0), errors
  assert np.all(heun < euler), errors
  # Halving the step: Euler's error halves (ratio ~2), Heun's quarters (ratio ~4).
  np.testing.assert_allclose(euler[-3:-1] / euler[-2:], 2.0, rtol=0.15)
  np.testing.assert_allclose(heun[-3:-1] / heun[-2:], 4.0, rtol=0.15)
  assert heun[-1] < 1e-4


def test_sampler_rejects_bad_arguments():
  fn = lambda x, t: x
  with pytest.raises(ValueError, match="Unknown ODE method"):
    fm.sample_actions(fn, jax.random.key(0), (1, 2, 3), method="rk4")
  with pytest.raises(ValueError, match="positive Python int"):
    fm.sample_actions(fn, jax.random.key(0), (1, 2, 3), num_steps=0)
