"""The Qwen3-VL vision tower (with DeepStack) against the pinned transformers, fp32."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.fixtures_backbone import make_tiny_qwen3vl_hf_model
from twinbrain_jax.models import qwen3vl_vision
from twinbrain_jax.models.backbone_presets import backbone_preset

torch = pytest.importorskip("torch")

# Two images of different sizes, each at least 4x4 merged units; neither side equals the 6x6
# learned position grid, so the bilinear resampling runs both up and across aspect ratios.
GRID = np.array([[1, 8, 12], [1, 10, 8]], np.int64)
ATOL = 1e-4


def _config():
  return qwen3vl_vision.VisionConfig.from_config_dict(backbone_preset("qwen3vl_tiny").vision)


def test_position_interpolation_equals_torch_interpolate():
  """Our taps/weights applied to a table equal `F.interpolate(bilinear, align_corners=True)`
  of that table, in merge-block-major order."""
  side, merge = 6, 2
  table = np.random.default_rng(0).normal(size=(side * side, 5)).astype(np.float32)
  indices, weights = qwen3vl_vision.position_interpolation(GRID, side, merge)
  ours = (table[indices] * weights[:, :, None]).sum(axis=1)
  offset = 0
  for _, h, w in GRID.tolist():
    grid = torch.from_numpy(table.T.reshape(1, 5, side, side))
    ref = torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear",
                                          align_corners=True)[0].numpy()  # [5, h, w]
    ref = ref.reshape(5, h // merge, merge, w // merge, merge).transpose(1, 3, 2, 4, 0)
    np.testing.assert_allclose(ours[offset:offset + h * w], ref.reshape(h * w, 5), atol=1e-5)
    offset += h * w


def test_vision_tower_and_deepstack_match_hf():
  config = _config()
  assert len(config.deepstack_visual_indexes) == 2
  hf = make_tiny_qwen3vl_hf_model(seed=1)
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  prefix = "model.visual."
  params = qwen3vl_vision.vision_params_from_hf(lambda name: state[prefix + name], config)

  n = int((GRID[:, 0] * GRID[:, 1] * GRID[:, 2]).sum())
  pixels = np.random.default_rng(2).normal(size=(n, config.patch_dim)).astype(np.float32)
  with torch.no_grad():
    out = hf.model.visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(GRID))
  ref_features = out.pooler_output.numpy()
  ref_deepstack = np.stack([d.numpy() for d in out.deepstack_features])

  tower = qwen3vl_vision.VisionTower(config)
  features, deepstack = jax.jit(lambda p, x: tower.apply({"params": p}, x, GRID))(
      params, jnp.asarray(pixels))
  merged_tokens = n // 4
  assert features.shape == ref_features.shape == (merged_tokens, config.out_hidden_size)
  assert deepstack.shape == ref_deepstack.shape == (2, merged_tokens, config.out_hidden_size)
  feature_diff = float(np.abs(np.asarray(features) - ref_features).max())
  deepstack_diff = float(np.abs(np.asarray(deepstack) - ref_deepstack).max())
  print(f"max abs diff: features {feature_diff:.2e}, deepstack {deepstack_diff:.2e}")
  assert feature_diff < ATOL and deepstack_diff < ATOL
  # The maps differ from each other and from the final features (distinct mergers and blocks).
  assert np.abs(ref_deepstack[0] - ref_deepstack[1]).max() > 1e-2


def test_param_tree_matches_init_and_shapes_are_checked():
  config = _config()
  hf = make_tiny_qwen3vl_hf_model(seed=1)
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  loaded = qwen3vl_vision.vision_params_from_hf(lambda name: state["model.visual." + name],
                                                config)
  tower = qwen3vl_vision.VisionTower(config)
  pixels = jnp.zeros((16, config.patch_dim))
  init = jax.eval_shape(lambda: nn.unbox(tower.init(jax.random.key(0), pixels,
                                                    np.array([[1, 4, 4]]))["params"]))
  init_shapes = jax.tree.map(lambda x: tuple(x.shape), init)
  loaded_shapes = jax.tree.map(lambda x: tuple(x.shape), loaded)
  assert init_shapes == loaded_shapes

  bad = dict(state)
  bad["model.visual.blocks.1.mlp.linear_fc1.weight"] = np.zeros((3, 3), np.float32)
  with pytest.raises(ValueError, match="blocks.1.mlp.linear_fc1.weight"):
    qwen3vl_vision.vision_params_from_hf(lambda name: bad["model.visual." + name], config)
