"""Helpers for the training tests: the tiny preset, a synthetic model batch, a built step."""

from __future__ import annotations

import pathlib
import sys

import flax.linen as nn
import jax
import numpy as np

from twinbrain_jax import sharding
from twinbrain_jax.models import families
from twinbrain_jax.models.twinbrain import synthetic_observation
from twinbrain_jax.training import optimizer, state as state_lib, step as step_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "configs"))
import twinbrain as twinbrain_configs  # noqa: E402  (configs/ is not a package)

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(mesh_shape=(8, 1, 1)):
  """`configs/twinbrain.py:tiny` on a given (data, fsdp, tensor) mesh."""
  config = twinbrain_configs.get_config("tiny")
  config.mesh.update(dict(zip(sharding.MESH_AXES, mesh_shape)))
  # The tests compare meshes and runs to float32 reduction-order noise: a bf16 left brain (the
  # default) rounds differently on each layout.
  config.model.left_dtype = "float32"
  return config


def synthetic_batch(config, batch_size=8, seed=0):
  """A model batch of `batch_size` samples (prompts of different lengths, one 8x8-patch image
  each) with random normalised actions; (batch, image_grid_thw)."""
  model_config = state_lib.model_config(config)
  lengths = [3 + (i % 5) for i in range(batch_size)]
  obs, grid = synthetic_observation(model_config, lengths, image_grid=(1, 8, 8), seed=seed)
  rng = np.random.default_rng(seed + 1)
  expert = model_config.action_expert
  obs["actions"] = rng.uniform(-1, 1, (batch_size, expert.action_horizon,
                                       expert.action_dim)).astype(np.float32)
  mask = np.ones((batch_size, expert.action_horizon), bool)
  mask[0, -3:] = False  # One sample ends inside its chunk.
  obs["action_mask"] = mask
  return obs, grid


class Trainer:
  """State + jitted step of a config on its mesh (`devices` restricts the mesh; `tx` replaces
  the config's optimizer)."""

  def __init__(self, config, grid, devices=None, grad_accum_steps=1, tx=None):
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.rules = sharding.logical_axis_rules(config.logical_axis_rules, self.mesh)
    self.model = families.build_model(state_lib.model_config(config))
    groups = families.TRAINABLE_GROUPS[families.family(config)]
    self.tx = optimizer.make_optimizer(config.train, groups) if tx is None else tx
    _, self.shardings = state_lib.abstract_state(self.model, self.tx, self.mesh, self.rules,
                                                 config.seed)
    self.grid = grid
    self.step_fn = step_lib.make_train_step(self.model, self.tx, grid, config.flow.num_repeats,
                                            grad_accum_steps,
                                            optimizer.group_schedules(config.train, groups))

  def init(self, seed=0):
    return state_lib.create_train_state(self.model, self.tx, self.mesh, self.rules, seed,
                                        self.shardings)

  def step(self, state, batch):
    return self._call_step(state, batch, lambda jitted, *args: jitted(*args))

  def lower(self, state, batch):
    """The step lowered (traced, not compiled) for this state and batch."""
    return self._call_step(state, batch, lambda jitted, *args: jitted.lower(*args))

  def _call_step(self, state, batch, call):
    shardings = step_lib.batch_shardings(self.mesh, batch)
    jitted = step_lib.jit_train_step(self.step_fn, self.shardings, shardings, self.mesh)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return call(jitted, state, step_lib.global_batch(batch, shardings))


def to_numpy(tree):
  return jax.tree.map(np.asarray, tree)
