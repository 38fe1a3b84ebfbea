"""The sharded train step: parity with one device, parameters as arguments, optimizer groups,
schedule, bad input."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fixtures_training import Trainer, synthetic_batch, tiny_config, to_numpy
from twinbrain_jax.config_lib import ConfigError
from twinbrain_jax.models.twinbrain import compute_loss
from twinbrain_jax.training import optimizer, step as step_lib


def _parity_optimizer(config):
  # A non-zero learning rate at step 0, and Adam eps 1e-3: the first update
  # lr * g / (|g| + eps) is then a smooth function of g (with eps 1e-8 it is lr * sign(g), and
  # gradients at float32 noise level would flip sign between meshes).
  config.train.optimizer.update(warmup_steps=0, eps=1e-3)


@pytest.fixture(scope="module")
def reference():
  """One step of the tiny preset on a single device: (batch, grid, state0, state1, metrics)."""
  config = tiny_config((1, 1, 1))
  _parity_optimizer(config)
  batch, grid = synthetic_batch(config)
  trainer = Trainer(config, grid, devices=jax.devices()[:1])
  state0 = to_numpy(trainer.init())
  state1, metrics = trainer.step(trainer.init(), batch)
  return batch, grid, state0, to_numpy(state1), to_numpy(metrics)


# Loss and gradient norm agree to float32 reduction-order noise (rtol 1e-5 / 1e-4); after one
# AdamW step at lr 1e-3 params agree to 1e-6 absolute (updates are ~1e-3 * g / (|g| + 1e-3)).
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_one_sharded_step_matches_one_device(reference, mesh_shape):
  batch, grid, state0, ref_state, ref_metrics = reference
  config = tiny_config(mesh_shape)
  _parity_optimizer(config)
  trainer = Trainer(config, grid)
  # The single-device initial state, laid out on this mesh.
  initial = jax.device_put(state0, trainer.shardings)
  state, metrics = trainer.step(initial, batch)
  metrics, state = to_numpy(metrics), to_numpy(state)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-4)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  assert int(state.step) == 1
  # The step really moved the params (the comparison above is not trivially satisfied).
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ref_state.params),
                                                          jax.tree.leaves(state0.params)))
  assert moved > 1e-4


def _largest_constant_elements(stablehlo_text):
  shapes = re.findall(r"stablehlo\.constant dense<[^>]*> : tensor<([^>]*)>", stablehlo_text)
  assert shapes, "no constant found: the pattern no longer matches the StableHLO text"
  return max(int(np.prod([int(d) for d in shape.split("x")[:-1]])) for shape in shapes)


def test_the_step_takes_the_frozen_brain_as_an_argument():
  """Closed over, the frozen weights would be baked into the program as constants (slower to
  lower, and a 45x larger executable for `small`, see docs/benchmarks.md)."""
  config = tiny_config((1, 1, 1))
  batch, grid = synthetic_batch(config)
  trainer = Trainer(config, grid, devices=jax.devices()[:1])
  state = trainer.init()
  text = trainer.lower(state, batch).as_text()
  largest_frozen = max(x.size for x in jax.tree.leaves(state.frozen))
  largest_trainable = max(x.size for x in jax.tree.leaves(state.params))
  assert _largest_constant_elements(text) < min(largest_frozen, largest_trainable) // 4

  # The check catches a closed-over brain: the same loss with the frozen part as a constant.
  frozen = state.frozen
  loss_fn = step_lib.make_loss_fn(trainer.model, grid, config.flow.num_repeats)
  closed = jax.jit(lambda params, batch, rng: loss_fn(params, frozen, batch, rng)[0])
  with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
    closed_text = closed.lower(state.params, batch, state.rng).as_text()
  assert _largest_constant_elements(closed_text) >= largest_frozen


# ---------------------------------------------------------------------------------------------
# Gradient accumulation.


def _capturing(tx):
  """`tx` that also keeps the gradients it was given in its state: `(grads, tx state)`, so one
  jitted step shows both the accumulated gradients and the update they produce."""
  def init(params):
    return jax.tree.map(jnp.zeros_like, params), tx.init(params)

  def update(grads, state, params=None):
    updates, inner = tx.update(grads, state[1], params)
    return updates, (grads, inner)

  return optax.GradientTransformation(init, update)


def _select(batch, num_samples, sample_ids):
  """The samples `sample_ids` of a host batch (pixels [B*P, D] taken by whole images)."""
  out = {}
  for key, value in batch.items():
    if key == "pixel_values":
      value = value.reshape(num_samples, -1, value.shape[-1])[sample_ids]
      out[key] = value.reshape(-1, value.shape[-1])
    else:
      out[key] = np.take(value, sample_ids, axis=step_lib.batch_axis(key))
  return out


def _reference_micro_gradients(model, params, frozen, batch, grid, step_key, num_repeats,
                               num_micro):
  """Per-micro-batch (losses [k], gradients [k trees], valid action elements [k]) from
  `compute_loss` and `jax.grad` on one device, for micro-batches of samples i::k (as the step
  splits) and of contiguous blocks (a wrong split); micro-batch i draws from
  `fold_in(step_key, i)`."""
  batch_size, size = len(grid), len(grid) // num_micro
  assert (grid == grid[0]).all()  # One image size: every micro-batch has the grid below.

  def loss_fn(trainable, micro, key):
    return compute_loss(model, {**frozen, **trainable}, micro, grid[:size], key, num_repeats,
                        train=True)

  grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  out = {}
  for split in ("strided", "contiguous"):
    losses, grads, counts = [], [], []
    for i in range(num_micro):
      ids = (np.arange(i, batch_size, num_micro) if split == "strided"
             else np.arange(i * size, (i + 1) * size))
      micro = _select(batch, batch_size, ids)
      loss, grad = grad_fn(params, micro, jax.random.fold_in(step_key, i))
      losses.append(float(loss))
      grads.append(jax.tree.map(np.asarray, grad))
      counts.append(float(micro["action_mask"].sum()) * micro["actions"].shape[-1])
    out[split] = (np.asarray(losses), grads, np.asarray(counts))
  return out


def _weighted_mean(losses, grads, weights):
  return (float(np.dot(weights, losses)),
          jax.tree.map(lambda *g: sum(w * x for w, x in zip(weights, g)), *grads))


def _relative_difference(a, b):
  """|a - b| / |b| in the global norm of two trees."""
  return float(optax.tree.norm(jax.tree.map(np.subtract, a, b)) / optax.tree.norm(b))


@pytest.fixture(scope="module")
def accumulation_setup():
  """The tiny preset with dropout on the (2, 2, 2) mesh, a batch of 8 in k = 2 micro-batches
  whose valid action counts differ, and the single-device reference of its step 0."""
  config = tiny_config((2, 2, 2))
  _parity_optimizer(config)
  config.model.action_expert.dropout = 0.1  # The per-micro-batch dropout keys matter too.
  batch, grid = synthetic_batch(config)
  batch["action_mask"][2, -10:] = False  # Micro-batch 0 (samples 0, 2, 4, 6) has fewer.
  tx = optimizer.make_optimizer(config.train)
  trainer = Trainer(config, grid, grad_accum_steps=2, tx=_capturing(tx))
  state0 = to_numpy(trainer.init())
  state1, metrics = trainer.step(jax.device_put(state0, trainer.shardings), batch)
  micro = _reference_micro_gradients(trainer.model, state0.params, state0.frozen, batch, grid,
                                     jax.random.fold_in(state0.rng, 0),
                                     config.flow.num_repeats, 2)
  reference = {}
  for split, (losses, grads, counts) in micro.items():
    reference[split, True] = _weighted_mean(losses, grads, counts / counts.sum())
    reference[split, False] = _weighted_mean(losses, grads, np.full(2, 0.5))
  return tx, state0, to_numpy(state1), to_numpy(metrics), reference


# The accumulated step runs sharded over 8 devices (batch over data x fsdp, weights over fsdp and
# tensor) while the reference runs on one device: they agree to float32 reduction-order noise.
# Measured: every leaf within 3.3e-6 of its largest gradient, except the attention key biases,
# whose exact gradient is zero (softmax ignores a shift shared by all keys) and which hold
# ~1e-9 noise on both sides. Asserted: |got - want| <= 1e-5 max|want leaf| + 1e-7 max|want|.
def test_grad_accumulation_equals_the_weighted_mean_of_micro_batch_gradients(
    accumulation_setup):
  _, _, state1, metrics, reference = accumulation_setup
  ref_loss, ref_grads = reference[("strided", True)]
  grads = state1.opt_state[0]  # What the optimizer was given.
  largest = max(np.abs(g).max() for g in jax.tree.leaves(ref_grads))
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(got, want, rtol=0,
                               atol=1e-5 * np.abs(want).max() + 1e-7 * largest)
  assert _relative_difference(grads, ref_grads) < 1e-5
  np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(ref_grads), rtol=1e-5)
  # The comparison tells the schemes apart: equal weights, or contiguous micro-batches (another
  # split, so other noise per sample), miss by orders of magnitude more.
  assert _relative_difference(grads, reference[("strided", False)][1]) > 1e-3
  assert _relative_difference(grads, reference[("contiguous", True)][1]) > 1e-2


# After one AdamW step (lr 1e-3, eps 1e-3, clipping at 1.0) from the reference gradients the
# params agree to 1e-6 absolute, as in the unaccumulated parity test above.
def test_grad_accumulation_adamw_update_matches_the_reference(accumulation_setup):
  tx, state0, state1, _, reference = accumulation_setup
  ref_grads = reference[("strided", True)][1]
  want = jax.jit(lambda g, p: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))(
      ref_grads, state0.params)
  for got, expected in zip(jax.tree.leaves(state1.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
  assert _relative_difference(state1.params, state0.params) > 1e-4  # The step moved them.


def test_grad_accumulation_needs_one_image_grid():
  grid = np.array([[1, 8, 8], [1, 8, 12], [1, 8, 8], [1, 8, 12]])
  step_lib.make_train_step(None, None, grid, 2)  # No accumulation: any grids.
  with pytest.raises(ConfigError, match="needs one image grid for the whole batch"):
    step_lib.make_train_step(None, None, grid, 2, grad_accum_steps=2)
