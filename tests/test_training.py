"""The sharded train step: parity with one device, optimizer groups, schedule, bad input."""

import jax
import numpy as np
import pytest

from fixtures_training import Trainer, synthetic_batch, tiny_config, to_numpy
from twinbrain_jax.config_lib import ConfigError
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
