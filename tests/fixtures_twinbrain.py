"""A tiny TwinBrainVLA and hand-built observations (left-padded prompts with one image each)."""

from __future__ import annotations

import sys
import pathlib

import numpy as np

from twinbrain_jax.models.qwen25vl import get_rope_index
from twinbrain_jax.models.twinbrain import TwinBrainConfig

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "configs"))
import twinbrain as twinbrain_configs  # noqa: E402  (configs/ is not a package)

IMAGE_GRID = (1, 8, 8)  # patches: 4 x 4 merged units -> 16 image tokens per image.
PAD_ID = 0


def tiny_config(**overrides) -> TwinBrainConfig:
  """`configs/twinbrain.py:tiny`'s model, fp32 everywhere unless overridden."""
  model = twinbrain_configs.get_config("tiny").model
  model.left_param_dtype = "float32"
  model.update(overrides)
  return TwinBrainConfig.from_config_dict(model)


def _left_pad(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  length = max(len(r) for r in rows)
  ids = np.full((len(rows), length), PAD_ID, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for b, row in enumerate(rows):
    ids[b, length - len(row):] = row
    mask[b, length - len(row):] = 1
  return ids, mask


def make_obs(config: TwinBrainConfig, text_lengths=(5, 9), seed: int = 0,
             state_dim: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Observations for len(text_lengths) samples with prompts of different lengths.

  Left prompt:  <vision_start> <image>*16 <vision_end> text
  Right prompt: <vision_start> <image>*16 <vision_end> text <propri> <action>*N

  Returns:
    (obs dict of numpy arrays, image_grid_thw [B, 3]).
  """
  bb, rng = config.backbone, np.random.default_rng(seed)
  vision = bb.vision
  t, h, w = IMAGE_GRID
  num_image_tokens = t * h * w // vision.spatial_merge_size ** 2
  image = [bb.vision_start_token_id] + [bb.image_token_id] * num_image_tokens + [
      bb.vision_end_token_id]
  left_rows, right_rows = [], []
  for length in text_lengths:
    text = rng.integers(1, 400, size=length).tolist()
    left_rows.append(np.array(image + text))
    right_rows.append(np.array(image + text + [config.propri_token_id]
                               + [config.action_token_id] * config.num_action_queries))
  grid = np.array([IMAGE_GRID] * len(text_lengths), np.int64)
  obs = {}
  for side, rows in (("left", left_rows), ("right", right_rows)):
    ids, mask = _left_pad(rows)
    obs[f"{side}_input_ids"], obs[f"{side}_attention_mask"] = ids, mask
    obs[f"{side}_position_ids"] = get_rope_index(ids, grid, mask, bb)[0]
  patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
  obs["pixel_values"] = rng.normal(size=(len(text_lengths) * t * h * w, patch_dim)).astype(
      np.float32)
  obs["state"] = rng.uniform(-1, 1, size=(len(text_lengths), state_dim or config.state_dim)
                             ).astype(np.float32)
  return obs, grid
