"""Libra-VLA model and training: binning, config checks, the planner and the refiner overfit a
small batch, the dynamic curriculum switches when the token accuracy passes tau."""

import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fixtures_training import Trainer, to_numpy
from twinbrain_jax.models import libra
from twinbrain_jax.training import state as state_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "configs"))
import libra as libra_configs  # noqa: E402  (configs/ is not a package)


def tiny_config(**model):
  config = libra_configs.get_config("tiny")
  config.mesh.update(data=1, fsdp=1, tensor=1)
  config.model.update(model)
  config.train.optimizer.update(warmup_steps=1, clip_norm=0.0)
  return config


def batch_of(config, batch_size=2, seed=0):
  """A model batch with actions off their bin centres by up to 0.8 half-bins (bins unambiguous)."""
  model_config = state_lib.model_config(config)
  obs, grid = libra.synthetic_observation(model_config, [4 + i for i in range(batch_size)],
                                          seed=seed)
  rng = np.random.default_rng(seed + 1)
  n, shape = model_config.num_bins, (batch_size, model_config.plan_length, model_config.action_dim)
  bins = rng.integers(0, n, shape)
  obs["actions"] = np.asarray(libra.bins_to_actions(jnp.asarray(bins), n)) + rng.uniform(
      -0.8, 0.8, shape).astype(np.float32) / n
  obs["action_mask"] = np.ones(shape[:2], bool)
  return obs, grid


@pytest.mark.parametrize("num_bins", [2, 10, 50, 256])
def test_bins_and_centres_are_exact_inverses(num_bins):
  bins = jnp.arange(num_bins)
  centres = libra.bins_to_actions(bins, num_bins)
  np.testing.assert_array_equal(np.asarray(libra.actions_to_bins(centres, num_bins)), bins)
  # And the definition: clip(floor((a + 1) / 2 * N), 0, N - 1), the edges included.
  actions = np.array([-1.0, -0.999, 0.0, 0.999, 1.0], np.float32)
  want = np.clip(np.floor((actions.astype(np.float64) + 1) / 2 * num_bins), 0, num_bins - 1)
  np.testing.assert_array_equal(np.asarray(libra.actions_to_bins(jnp.asarray(actions),
                                                                 num_bins)), want)
  assert np.all(np.diff(np.asarray(centres)) > 0) and -1 < centres[0] and centres[-1] < 1


@pytest.mark.parametrize("override, match", [
    (dict(segment_length=4), "refiner.action_horizon=5 must equal segment_length=4"),
    (dict(action_dim=6), "refiner.action_dim=7 must equal action_dim=6"),
    (dict(num_bins=1), "num_bins=1"),
    (dict(curriculum="sometimes"), "curriculum='sometimes'"),
    (dict(accuracy_threshold=1.5), r"accuracy_threshold=1.5 \(tau\)"),
])
def test_inconsistent_config_is_refused(override, match):
  with pytest.raises(ValueError, match=match):
    state_lib.model_config(tiny_config(**override))


def test_action_dimension_or_horizon_mismatch_is_refused():
  model_config = state_lib.model_config(tiny_config())
  with pytest.raises(ValueError, match=r"action_dim=7.*got \(2, 10, 4\)"):
    libra.check_actions(model_config, jnp.zeros((2, 10, 4)))
  with pytest.raises(ValueError, match=r"data.action_horizon=10"):
    libra.check_actions(model_config, jnp.zeros((2, 8, 7)))


def test_curriculum_modes():
  passed, failed = jnp.ones((), bool), jnp.zeros((), bool)
  for curriculum, want in (("teacher_forcing", (False, False)), ("none", (True, True)),
                           ("dynamic", (False, True))):
    config = state_lib.model_config(tiny_config(curriculum=curriculum))
    got = tuple(bool(libra.use_predicted_bins(config, latch)) for latch in (failed, passed))
    assert got == want, curriculum
  config = state_lib.model_config(tiny_config(accuracy_threshold=0.5))
  frozen = libra.initial_frozen()
  frozen = libra.update_frozen(config, frozen, dict(token_accuracy=jnp.float32(0.49)))
  assert not bool(frozen["curriculum"]["planner_passed"])
  frozen = libra.update_frozen(config, frozen, dict(token_accuracy=jnp.float32(0.5)))
  assert bool(frozen["curriculum"]["planner_passed"])
  # Latched: a later worse batch does not switch back.
  frozen = libra.update_frozen(config, frozen, dict(token_accuracy=jnp.float32(0.1)))
  assert bool(frozen["curriculum"]["planner_passed"])


def _train(config, steps):
  config.train.num_steps = steps  # The cosine schedule spans the run.
  batch, grid = batch_of(config)
  trainer = Trainer(config, grid, devices=jax.devices()[:1])
  state = trainer.init()
  history = []
  for _ in range(steps):
    state, metrics = trainer.step(state, batch)
    history.append({k: float(v) for k, v in to_numpy(metrics).items()})
  return trainer, state, batch, grid, history


@pytest.fixture(scope="module")
def dynamic_run():
  """The dynamic curriculum with tau = 0.6 on one batch of 2."""
  config = tiny_config(curriculum="dynamic", accuracy_threshold=0.6)
  config.train.optimizer.lr.update(planner=3e-3, plan_head=1e-2, refiner=3e-3)
  return _train(config, 60)


@pytest.mark.slow
def test_planner_overfits_a_small_batch(dynamic_run):
  _, state, batch, grid, history = dynamic_run
  assert history[0]["token_accuracy"] < 0.3  # Chance is 1/10.
  assert history[-1]["token_accuracy"] == 1.0, [h["token_accuracy"] for h in history]
  assert history[-1]["loss_plan"] < 0.1 * history[0]["loss_plan"]


def test_curriculum_switches_the_step_after_accuracy_passes_tau(dynamic_run):
  _, _, _, _, history = dynamic_run
  accuracy = [h["token_accuracy"] for h in history]
  used = [h["use_predicted_bins"] for h in history]
  first = next(i for i, a in enumerate(accuracy) if a >= 0.6)
  assert 0 < first < len(history) - 1
  assert used[:first + 1] == [0.0] * (first + 1)  # Ground truth up to the step that passed ...
  assert used[first + 1:] == [1.0] * (len(used) - first - 1)  # ... the planner's bins after.
  assert bool(dynamic_run[1].frozen["curriculum"]["planner_passed"])


@pytest.mark.slow
def test_refiner_with_ground_truth_bins_overfits():
  """The refiner alone (planner frozen, teacher forcing) on 2 fixed samples: the fine loss drops
  >= 10x in 500 Adam steps and 8-step Euler samples conditioned on the ground-truth bins land on
  the actions: mean |error| < 0.08 (the DiT's own overfitting test's bound; an untrained
  sampler misses by ~0.5-0.9)."""
  config = tiny_config(curriculum="teacher_forcing")
  model_config = state_lib.model_config(config)
  model = libra.LibraVLA(model_config)
  batch, grid = batch_of(config)
  params = jax.jit(lambda r: model.init(r, *libra.init_args(model_config))["params"])(
      jax.random.key(0))
  params = jax.tree.map(np.asarray, nn.unbox(params))
  frozen, steps = libra.initial_frozen(), 500
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, steps))

  def fine_loss(refiner, rng):
    _, parts = libra.compute_loss(model, dict(params, refiner=refiner), frozen, batch, grid, rng,
                                  num_repeats=8)
    return parts["loss_fine"], parts["use_predicted_bins"]

  @jax.jit
  def train(refiner, rngs):
    def step(carry, rng):
      refiner, opt_state = carry
      (loss, used), grads = jax.value_and_grad(fine_loss, has_aux=True)(refiner, rng)
      updates, opt_state = tx.update(grads, opt_state, refiner)
      return (optax.apply_updates(refiner, updates), opt_state), (loss, used)
    (refiner, _), history = jax.lax.scan(step, (refiner, tx.init(refiner)), rngs)
    return refiner, history

  horizon, n = model_config.segment_length, model_config.num_bins
  target = batch["actions"][:, :horizon]
  bins = libra.actions_to_bins(jnp.asarray(target), n)
  noise = jax.random.normal(jax.random.key(3), target.shape)
  sample = jax.jit(lambda p: libra.refine(model, p, batch, bins, noise, num_steps=8))
  error_before = np.abs(np.asarray(sample(params)) - target).mean()
  refiner, (losses, used) = train(params["refiner"], jax.random.split(jax.random.key(1), steps))
  losses = np.asarray(losses)
  assert not np.asarray(used).any()  # Ground-truth bins throughout.
  assert losses[-20:].mean() < losses[:10].mean() / 10, (losses[:10].mean(), losses[-20:].mean())
  error = np.abs(np.asarray(sample(dict(params, refiner=refiner))) - target).mean()
  assert error < 0.08 and error_before > 3 * error, (error_before, error)
