"""Vision tower: parity with HF transformers' Qwen2.5-VL `visual` (fp32, CPU), loading, sharding."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.twinbrain import LOGICAL_AXIS_RULES
from twinbrain_jax import sharding
from twinbrain_jax.models import image_processor
from twinbrain_jax.models.backbone_presets import backbone_preset
from twinbrain_jax.models.qwen25vl_vision import (
    VisionConfig, VisionTower, attention_segments, check_grid_thw, hf_vision_weight_shapes,
    image_attention_segments, vision_params_from_hf, vision_positions)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")
from tests.fixtures_backbone import tiny_hf_checkpoint  # noqa: E402,F401  (pytest fixture)

PARITY_ATOL = 1e-4  # fp32 max abs error allowed against HF.


def _images():
  """Two images of different sizes: 8x10 and 5x9 merged units (ragged 4x4 windows)."""
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(224, 280), (130, 250)]]
  return image_processor.preprocess_images(images)


def _hf_visual(model):
  inner = model.model
  return inner.visual if hasattr(inner, "visual") else model.visual


def _checkpoint_getter(path):
  """`get(name)` over the checkpoint's vision tensors, old (`visual.`) or new layout."""
  handle = safetensors.safe_open(str(path / "model.safetensors"), "np")
  keys = set(handle.keys())
  prefix = "visual." if any(k.startswith("visual.") for k in keys) else "model.visual."
  return lambda name: handle.get_tensor(prefix + name)


@pytest.fixture(scope="module")
def tiny_vision(tiny_hf_checkpoint):  # noqa: F811
  with open(tiny_hf_checkpoint / "config.json") as f:
    config = VisionConfig.from_hf(json.load(f)["vision_config"])
  params = vision_params_from_hf(_checkpoint_getter(tiny_hf_checkpoint), config)
  model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      tiny_hf_checkpoint, dtype=torch.float32).eval()
  return config, params, model


def test_config_from_hf_equals_preset(tiny_vision):
  config, _, _ = tiny_vision
  assert config == VisionConfig.from_config_dict(backbone_preset("tiny").vision)
  assert config.window_merge_units == 4 and config.fullatt_block_indexes == (1,)
  # Released checkpoints write `in_chans` and omit rope parameters.
  released = VisionConfig.from_hf(dict(
      depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16,
      in_chans=3, out_hidden_size=2048, patch_size=14, spatial_merge_size=2,
      spatial_patch_size=14, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
      tokens_per_second=2, temporal_patch_size=2))
  assert released == VisionConfig.from_config_dict(backbone_preset("3b").vision)


def test_vision_tower_matches_hf(tiny_vision):
  config, params, model = tiny_vision
  pixel_values, grid = _images()
  with torch.no_grad():
    ref = _hf_visual(model)(torch.from_numpy(pixel_values), grid_thw=torch.from_numpy(grid))
  ref = ref.pooler_output.numpy()
  tower = VisionTower(config)
  out = jax.jit(lambda p, x: tower.apply({"params": p}, x, grid))(params, pixel_values)
  assert out.shape == ref.shape == (pixel_values.shape[0] // 4, config.out_hidden_size)
  err = float(np.abs(np.asarray(out) - ref).max())
  print(f"vision tower fp32 max abs error vs HF: {err:.3e} (max |ref| {np.abs(ref).max():.3f})")
  assert err < PARITY_ATOL
  # Each image alone gives its rows of the batched output: segments never leak across images.
  first = int(grid[0].prod()) // 4
  alone = jax.jit(lambda p, x: tower.apply({"params": p}, x, grid[:1]))(
      params, pixel_values[:first * 4])
  np.testing.assert_allclose(np.asarray(alone), np.asarray(out)[:first], atol=1e-5)


def test_equal_images_share_one_segment_plan_and_match_hf(tiny_vision):
  """Three images of one (ragged-window) size: the tower plans one image and applies the plan
  image by image; the output still equals HF's over the whole batch."""
  config, params, model = tiny_vision
  rng = np.random.default_rng(1)
  images = [rng.integers(0, 256, (130, 250, 3), dtype=np.uint8) for _ in range(3)]
  pixel_values, grid = image_processor.preprocess_images(images)
  windows = image_attention_segments(grid, 2, config.window_merge_units)
  assert windows.scatter.shape == (int(grid[0].prod()),)  # one image's tokens
  with torch.no_grad():
    ref = _hf_visual(model)(torch.from_numpy(pixel_values), grid_thw=torch.from_numpy(grid))
  out = jax.jit(lambda p, x: VisionTower(config).apply({"params": p}, x, grid))(
      params, pixel_values)
  assert float(np.abs(np.asarray(out) - ref.pooler_output.numpy()).max()) < PARITY_ATOL


def test_bf16_compute_close_to_fp32(tiny_vision):
  config, params, _ = tiny_vision
  pixel_values, grid = _images()
  def forward(dtype):
    tower = VisionTower(config, dtype=dtype)
    return jax.jit(lambda p, x: tower.apply({"params": p}, x, grid))(params, pixel_values)

  ref, out = forward(jnp.float32), forward(jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  # bf16 keeps ~3 significant digits; allow 2% of the output range.
  err = float(jnp.abs(out.astype(jnp.float32) - ref).max())
  assert err < 0.02 * float(jnp.abs(ref).max()), err


def test_param_tree_from_hf_matches_init_and_rules(tiny_vision):
  config, params, _ = tiny_vision
  pixel_values, grid = _images()
  tower = VisionTower(config)
  abstract = jax.eval_shape(functools.partial(tower.init, grid_thw=grid), jax.random.key(0),
                            pixel_values)["params"]
  shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)  # noqa: E731
  assert shapes(nn.unbox(abstract)) == shapes(params)
  sharding.check_logical_names(abstract, sharding.logical_axis_rules(LOGICAL_AXIS_RULES))


def test_hf_weight_names_cover_checkpoint(tiny_hf_checkpoint, tiny_vision):  # noqa: F811
  config, _, _ = tiny_vision
  handle = safetensors.safe_open(str(tiny_hf_checkpoint / "model.safetensors"), "np")
  in_file = {k[len("visual."):] for k in handle.keys() if k.startswith("visual.")}
  assert set(hf_vision_weight_shapes(config)) == in_file


def test_shape_mismatch_and_missing_key_name_the_key(tiny_vision):
  config, _, model = tiny_vision
  tensors = {k: v.numpy() for k, v in _hf_visual(model).state_dict().items()}
  bad = dict(tensors)
  bad["blocks.1.attn.qkv.weight"] = np.zeros((96, 31), np.float32)
  with pytest.raises(ValueError) as err:
    vision_params_from_hf(bad.__getitem__, config)
  message = str(err.value)
  assert "blocks.1.attn.qkv.weight" in message and "(96, 31)" in message and "(96, 32)" in message
  missing = {k: v for k, v in tensors.items() if k != "merger.mlp.2.bias"}
  with pytest.raises(KeyError, match=r"merger\.mlp\.2\.bias.*\(64,\)"):
    vision_params_from_hf(missing.__getitem__, config)
  # A config that disagrees with the checkpoint is caught at the first tensor it touches.
  wide = VisionConfig.from_config_dict({**dict(backbone_preset("tiny").vision), "hidden_size": 64})
  with pytest.raises(ValueError, match=r"patch_embed\.proj\.weight.*\(32, 3, 2, 14, 14\).*"
                                       r"\(64, 3, 2, 14, 14\)"):
    vision_params_from_hf(tensors.__getitem__, wide)


@pytest.mark.parametrize("grid", [[[1, 16, 20], [1, 10, 18]], [[2, 12, 8], [1, 4, 4]]])
def test_attention_segments_equal_hf_windows(grid):
  """Windows and frames as token sets equal HF's window index / cu_seqlens partitions."""
  from transformers import vision_utils
  grid = np.asarray(grid)
  grid_t = torch.from_numpy(grid)
  window_index, cu_windows = vision_utils.get_vision_window_index(
      grid_t, spatial_merge_size=2, window_size=112, patch_size=14)
  tokens = (window_index[:, None] * 4 + torch.arange(4)).reshape(-1).numpy()
  cu_windows = cu_windows.numpy()
  hf_windows = {frozenset(tokens[a:b].tolist()) for a, b in zip(cu_windows[:-1], cu_windows[1:])}
  cu_frames = vision_utils.get_vision_cu_seqlens(grid_t).numpy()
  hf_frames = {frozenset(range(a, b)) for a, b in zip(cu_frames[:-1], cu_frames[1:])}
  for window_units, expected in [(4, hf_windows), (None, hf_frames)]:
    segments = attention_segments(grid, 2, window_units)
    ours = {frozenset(segments.gather[s, :n].tolist()) for s, n in enumerate(segments.lengths)}
    assert ours == expected
    # The scatter index inverts the gather.
    np.testing.assert_array_equal(segments.gather.reshape(-1)[segments.scatter],
                                  np.arange(int(grid.prod(1).sum())))
  np.testing.assert_array_equal(vision_positions(grid, 2),
                                vision_utils.get_vision_position_ids(grid_t, 2).numpy())


def test_bad_grid_and_pixels_raise():
  config = VisionConfig.from_config_dict(backbone_preset("tiny").vision)
  tower = VisionTower(config)
  pixel_values = np.zeros((64, config.patch_dim), np.float32)
  with pytest.raises(ValueError, match="pixel_values has shape"):
    tower.init(jax.random.key(0), pixel_values, np.array([[1, 8, 4]]))
  with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
    check_grid_thw(np.array([[1, 7, 8]]), 2)
  with pytest.raises(TypeError, match="concrete host array"):
    jax.jit(tower.init)(jax.random.key(0), pixel_values, np.array([[1, 8, 8]]))


def test_sharded_forward_equals_single_device():
  """Params sharded by the logical rules on a (data, fsdp, tensor) = (2, 2, 2) mesh: same output."""
  config = VisionConfig.from_config_dict(backbone_preset("tiny").vision)
  grid = np.array([[1, 16, 20], [1, 10, 18]])
  pixel_values = np.random.default_rng(0).standard_normal(
      (int(grid.prod(1).sum()), config.patch_dim)).astype(np.float32)
  tower = VisionTower(config)
  init = functools.partial(tower.init, grid_thw=grid)
  abstract = jax.eval_shape(init, jax.random.key(0), pixel_values)
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(np.float32),
                        nn.unbox(abstract))
  apply = jax.jit(lambda p, x: tower.apply(p, x, grid))
  ref = apply(params, pixel_values)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  rules = sharding.logical_axis_rules(LOGICAL_AXIS_RULES, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    sharded = jax.device_put(params, sharding.logical_shardings(abstract, mesh, rules))
    qkv = sharded["params"]["blocks"]["attn"]["qkv"]["kernel"]  # [depth, E, 3, H, D]
    assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor", None)
    out = apply(sharded, pixel_values)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_small_preset_one_224_image_matches_hf():
  """The benchmark size: one 224x224 image -> 64 tokens, 2x2 whole windows, 4 heads, depth 4."""
  from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
  from tests.fixtures_backbone import tiny_hf_config
  torch.manual_seed(1)
  hf_config = tiny_hf_config(preset="small").vision_config
  reference = modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel(hf_config).float().eval()
  with torch.no_grad():
    for name, param in reference.named_parameters():
      if name.endswith("bias") or "norm" in name or "ln_q" in name:
        param.add_(0.1 * torch.randn_like(param))
  config = VisionConfig.from_hf(hf_config.to_dict())
  assert config == VisionConfig.from_config_dict(backbone_preset("small").vision)
  image = np.random.default_rng(5).integers(0, 256, (224, 224, 3), dtype=np.uint8)
  pixel_values, grid = image_processor.preprocess_images([image])
  assert grid.tolist() == [[1, 16, 16]]
  with torch.no_grad():
    ref = reference(torch.from_numpy(pixel_values), grid_thw=torch.from_numpy(grid))
  ref = ref.pooler_output.numpy()
  tensors = {k: v.numpy() for k, v in reference.state_dict().items()}
  tower = VisionTower(config)
  out = jax.jit(lambda p, x: tower.apply({"params": p}, x, grid))(
      vision_params_from_hf(tensors.__getitem__, config), pixel_values)
  assert out.shape == ref.shape == (64, 512)
  err = float(np.abs(np.asarray(out) - ref).max())
  print(f"small vision tower fp32 max abs error vs HF: {err:.3e} (max |ref| {np.abs(ref).max():.3f})")
  assert err < PARITY_ATOL


@pytest.mark.parametrize("policy", ["dots", "full"])
def test_remat_gives_the_same_gradients(tiny_vision, policy):
  config, params, _ = tiny_vision
  pixel_values, grid = _images()

  def grads(remat_policy):
    tower = VisionTower(config, remat_policy=remat_policy)
    loss = lambda p: jnp.sum(tower.apply({"params": p}, pixel_values, grid) ** 2)  # noqa: E731
    return jax.jit(jax.grad(loss))(params)

  plain, rematted = grads("none"), grads(policy)
  assert float(jnp.abs(plain["blocks"]["attn"]["qkv"]["kernel"][0]).max()) > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), plain, rematted)


def test_unknown_remat_policy_is_a_clear_error(tiny_vision):
  config, params, _ = tiny_vision
  pixel_values, grid = _images()
  with pytest.raises(ValueError, match=r"remat_policy='some' is not a remat policy; choose one "
                     r"of \['dots', 'full', 'none'\]"):
    VisionTower(config, remat_policy="some").apply({"params": params}, pixel_values, grid)
