"""A tiny TwinBrainVLA config and observations (left-padded prompts with one image each)."""

from __future__ import annotations

import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from twinbrain_jax.models.twinbrain import TwinBrainConfig, TwinBrainVLA, synthetic_observation

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "configs"))
import twinbrain as twinbrain_configs  # noqa: E402  (configs/ is not a package)


# The tiny presets of both backbone families.
TINY_PRESETS = ("tiny", "qwen3vl_tiny")


def tiny_config(preset: str = "tiny", **overrides) -> TwinBrainConfig:
  """`configs/twinbrain.py:<preset>`'s model (`tiny`: Qwen2.5-VL, `qwen3vl_tiny`: Qwen3-VL),
  fp32 everywhere unless overridden."""
  model = twinbrain_configs.get_config(preset).model
  model.left_param_dtype = model.left_dtype = "float32"
  model.update(overrides)
  return TwinBrainConfig.from_config_dict(model)


def make_obs(config: TwinBrainConfig, text_lengths=(5, 9), seed: int = 0):
  """Two samples (by default) of 4x4 merged image units and different prompt lengths."""
  return synthetic_observation(config, text_lengths, image_grid=(1, 8, 8), seed=seed)


def init_model(config: TwinBrainConfig, obs, grid, seed: int = 0):
  """(model, its initial `params` collection unboxed as numpy arrays)."""
  model = TwinBrainVLA(config)
  expert = config.action_expert
  noisy = jnp.zeros((obs["state"].shape[0], expert.action_horizon, expert.action_dim))
  t = jnp.zeros((obs["state"].shape[0],))
  params = jax.jit(lambda r: model.init(r, obs, grid, noisy, t)["params"])(jax.random.key(seed))
  return model, jax.tree.map(np.asarray, nn.unbox(params))
