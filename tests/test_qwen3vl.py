"""Qwen3-VL language model, full model and checkpoint loading against the pinned transformers.

Reference: `transformers.Qwen3VLForConditionalGeneration` saved by `tests/fixtures_backbone.py`
(tiny random weights: 3 decoder layers, DeepStack after layers 0 and 1). Parity tolerance:
1e-4 max abs error in fp32 at the valid (non-padding) positions.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.twinbrain import LOGICAL_AXIS_RULES
from tests.fixtures_backbone import (make_tiny_qwen3vl_hf_model,  # noqa: F401  (fixture)
                                     tiny_qwen3vl_checkpoint)
from twinbrain_jax import sharding
from twinbrain_jax.models import backbones, hf_loading, qwen3vl, qwen25vl
from twinbrain_jax.models.backbone_presets import backbone_preset
from twinbrain_jax.models.layers import stack_layer_params
from twinbrain_jax.models.image_processor import preprocess_images, processor_settings

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PARITY_TOL = 1e-4


@pytest.fixture(scope="module")
def hf_model(tiny_qwen3vl_checkpoint):
  model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
      tiny_qwen3vl_checkpoint, dtype=torch.float32)
  return model.eval()


@pytest.fixture(scope="module")
def flax_model(tiny_qwen3vl_checkpoint):
  config = hf_loading.load_config(tiny_qwen3vl_checkpoint)
  assert isinstance(config, qwen3vl.Qwen3VLConfig)
  params = hf_loading.load_params(tiny_qwen3vl_checkpoint, config)
  return qwen3vl.Qwen3VL(config), params


def multimodal_batch(config, seed=0):
  """Two left-padded prompts of different lengths, with images of different sizes.

  Images through the Qwen3-VL processor (patch 16, with a 128 x 128 lower limit so they stay
  small): 128x128 -> 8x8 patches (4x4 merged units) and 160x224 -> 10x14 (5x7 units). The
  first prompt holds both images, the second the larger one only.
  """
  rng = np.random.default_rng(seed)
  images = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
            rng.integers(0, 256, (160, 224, 3), dtype=np.uint8),
            rng.integers(0, 256, (160, 224, 3), dtype=np.uint8)]
  settings = dict(processor_settings("qwen3vl"), min_pixels=128 * 128)
  pixel_values, grid = preprocess_images(images, **settings)
  merge = config.vision.spatial_merge_size
  image = lambda g: ([config.vision_start_token_id] + [config.image_token_id] * (  # noqa: E731
      int(np.prod(g)) // merge ** 2) + [config.vision_end_token_id])
  text = lambda n: rng.integers(0, 490, n).tolist()  # noqa: E731
  prompts = [text(3) + image(grid[0]) + text(2) + image(grid[1]) + text(5),
             text(2) + image(grid[2]) + text(4)]
  ids, mask = qwen25vl_left_pad(prompts)
  return ids, mask, pixel_values, grid


def qwen25vl_left_pad(prompts):
  from twinbrain_jax.models.tokenizer import left_pad
  return left_pad(prompts, max(len(p) for p in prompts), pad_id=0)


def _hf_forward(hf_model, ids, mask, config, pixel_values=None, grid=None):
  kwargs = dict(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long), output_hidden_states=True)
  if pixel_values is not None:
    kwargs.update(pixel_values=torch.tensor(pixel_values), image_grid_thw=torch.tensor(grid),
                  mm_token_type_ids=torch.tensor((ids == config.image_token_id).astype(np.int64)))
  with torch.no_grad():
    out = hf_model(**kwargs)
  return out.logits.numpy(), out.hidden_states[-1].numpy()


def _max_err(a, b, valid):
  return float(np.abs(np.asarray(a)[valid] - np.asarray(b)[valid]).max())


# ---------------------------------------------------------------------------------------------
# Interleaved M-RoPE and positions.


def test_interleaved_mrope_matches_hf(hf_model):
  text = hf_model.config.text_config
  rng = np.random.default_rng(1)
  positions = rng.integers(0, 3000, (3, 2, 11))
  model_text = qwen3vl.TextConfig.from_hf(text.to_dict(), tie_word_embeddings=True)
  cos, sin = qwen3vl.TextModel(model_text).rotary(positions)
  with torch.no_grad():
    hf_cos, hf_sin = hf_model.model.language_model.rotary_emb(
        torch.zeros(1, dtype=torch.float32), torch.tensor(positions))
  assert cos.shape == (2, 11, text.head_dim)
  np.testing.assert_allclose(cos, hf_cos.numpy(), atol=1e-5)
  np.testing.assert_allclose(sin, hf_sin.numpy(), atol=1e-5)


def test_interleaved_axes_cycle_t_h_w():
  # The released layout: 64 frequencies, h and w take every third one up to 60, t the rest.
  axes = qwen3vl.interleaved_mrope_axes(128, (24, 20, 20))
  assert axes[:6].tolist() == [0, 1, 2, 0, 1, 2]
  assert np.bincount(axes).tolist() == [24, 20, 20]
  assert (axes[60:] == 0).all()


def test_get_rope_index_matches_hf(hf_model, flax_model):
  model, _ = flax_model
  ids, mask, _, grid = multimodal_batch(model.config)
  ours, deltas = qwen3vl.get_rope_index(ids, grid, mask, model.config)
  ref, ref_deltas = hf_model.model.get_rope_index(
      torch.tensor(ids, dtype=torch.long),
      mm_token_type_ids=torch.tensor((ids == model.config.image_token_id).astype(np.int64)),
      image_grid_thw=torch.tensor(grid), attention_mask=torch.tensor(mask, dtype=torch.long))
  valid = mask.astype(bool)
  np.testing.assert_array_equal(ours[:, valid], ref.numpy()[:, valid])
  np.testing.assert_array_equal(deltas, ref_deltas.numpy())


# ---------------------------------------------------------------------------------------------
# Forward parity.


def test_text_only_parity_left_padding(hf_model, flax_model):
  model, params = flax_model
  rng = np.random.default_rng(3)
  ids, mask = qwen25vl_left_pad([rng.integers(0, 490, 7).tolist(),
                                 rng.integers(0, 490, 12).tolist()])
  positions = qwen25vl.text_position_ids(mask)
  out = model.apply({"params": params}, ids, mask, position_ids=positions)
  ref_logits, ref_hidden = _hf_forward(hf_model, ids, mask, model.config)
  valid = mask.astype(bool)
  assert _max_err(out["hidden_states"], ref_hidden, valid) < PARITY_TOL
  assert _max_err(out["logits"], ref_logits, valid) < PARITY_TOL


def test_multimodal_parity_deepstack_left_padding(hf_model, flax_model):
  model, params = flax_model
  ids, mask, pixel_values, grid = multimodal_batch(model.config)
  out = jax.jit(lambda p, i, m, x: model.apply({"params": p}, i, m, x, grid,
                                               qwen3vl.get_rope_index(ids, grid, mask,
                                                                      model.config)[0]))(
      params, ids, mask, pixel_values)
  ref_logits, ref_hidden = _hf_forward(hf_model, ids, mask, model.config, pixel_values, grid)
  valid = mask.astype(bool)
  hidden_err = _max_err(out["hidden_states"], ref_hidden, valid)
  logits_err = _max_err(out["logits"], ref_logits, valid)
  print(f"max abs diff: hidden {hidden_err:.2e}, logits {logits_err:.2e}")
  assert hidden_err < PARITY_TOL and logits_err < PARITY_TOL

  # DeepStack is active: dropping its maps moves the outputs far beyond the tolerance.
  embeds, additions = model.apply({"params": params}, ids, pixel_values, grid,
                                  method=qwen3vl.Qwen3VL.embed_multimodal)
  assert additions.shape == (2, *ids.shape, model.config.text.hidden_size)
  is_image = ids == model.config.image_token_id
  assert np.abs(np.asarray(additions)[:, ~is_image]).max() == 0
  assert np.abs(np.asarray(additions)[:, is_image]).min(axis=-1).max() > 0
  positions, _ = qwen3vl.get_rope_index(ids, grid, mask, model.config)
  hidden, _ = model.apply({"params": params}, embeds, positions, mask,
                          method=lambda m, *a: m.model(*a))
  assert _max_err(hidden, ref_hidden, valid) > 100 * PARITY_TOL


def test_unrolled_layout_matches_hf_and_the_scan(hf_model, flax_model, tiny_qwen3vl_checkpoint):
  """`scan_layers=False` (`layers_{i}`, `blocks_{i}`; DeepStack added by the Python loop) loads
  the same tensors as the scanned layout (stacked) and gives the same outputs."""
  model, params = flax_model
  unrolled_params = hf_loading.load_params(tiny_qwen3vl_checkpoint, scan_layers=False)
  assert "layers_2" in unrolled_params["model"] and "blocks_2" in unrolled_params["visual"]
  stacked = dict(unrolled_params,
                 model=stack_layer_params(unrolled_params["model"], "layers_", "layers"),
                 visual=stack_layer_params(unrolled_params["visual"], "blocks_", "blocks"))
  jax.tree.map(np.testing.assert_array_equal, stacked, params)
  unrolled = qwen3vl.Qwen3VL(model.config, scan_layers=False)
  ids, mask, pixel_values, grid = multimodal_batch(model.config)
  positions, _ = qwen3vl.get_rope_index(ids, grid, mask, model.config)
  run = lambda m, p: jax.jit(lambda p: m.apply(  # noqa: E731
      {"params": p}, ids, mask, pixel_values, grid, positions))(p)
  out, scanned_out = run(unrolled, unrolled_params), run(model, params)
  ref_logits, ref_hidden = _hf_forward(hf_model, ids, mask, model.config, pixel_values, grid)
  valid = mask.astype(bool)
  assert _max_err(out["hidden_states"], ref_hidden, valid) < PARITY_TOL
  assert _max_err(out["logits"], ref_logits, valid) < PARITY_TOL
  # fp32; the layouts differ only in XLA's fusion and summation order.
  assert _max_err(out["hidden_states"], scanned_out["hidden_states"], valid) < 1e-5


def test_kv_cache_prefill_then_decode_equals_full_forward(flax_model):
  """Prefill the prompt (with images and DeepStack) then feed 2 tokens one at a time."""
  model, params = flax_model
  ids, mask, pixel_values, grid = multimodal_batch(model.config)
  positions, _ = qwen3vl.get_rope_index(ids, grid, mask, model.config)
  full = model.apply({"params": params}, ids, mask, pixel_values, grid, positions)
  prefill_len = ids.shape[1] - 2
  cache = qwen25vl.KVCache.init(model.config.text, ids.shape[0], ids.shape[1])
  out = model.apply({"params": params}, ids[:, :prefill_len], mask[:, :prefill_len],
                    pixel_values, grid, positions[:, :, :prefill_len], cache)
  cache, logits = out["cache"], [out["logits"]]
  for t in range(prefill_len, ids.shape[1]):
    out = model.apply({"params": params}, ids[:, t:t + 1], mask[:, t:t + 1], None, None,
                      positions[:, :, t:t + 1], cache)
    cache = out["cache"]
    logits.append(out["logits"])
  assert _max_err(jnp.concatenate(logits, axis=1), full["logits"], mask.astype(bool)) < 1e-5


# ---------------------------------------------------------------------------------------------
# Loading, configs, presets.


def test_config_round_trips_and_presets():
  for name in ("qwen3vl_tiny", "qwen3vl_small", "qwen3vl_2b", "qwen3vl_4b", "qwen3vl_8b"):
    preset = backbone_preset(name)
    config = backbones.config_from_dict(preset)
    assert isinstance(config, qwen3vl.Qwen3VLConfig) and config.family == "qwen3vl"
    hf_config = transformers.Qwen3VLConfig(**hf_loading.hf_config_kwargs(config))
    assert backbones.config_from_hf(hf_config.to_dict()) == config, name
  four_b = backbones.config_from_dict(backbone_preset("qwen3vl_4b"))
  assert (four_b.text.hidden_size, four_b.text.num_hidden_layers, four_b.text.head_dim) == (
      2560, 36, 128)
  assert four_b.vision.deepstack_visual_indexes == (5, 11, 17)
  assert isinstance(backbones.config_from_dict(backbone_preset("tiny")),
                    qwen25vl.Qwen25VLConfig)
  with pytest.raises(ValueError, match="qwen3vl"):
    backbones.config_from_dict(dict(backbone_preset("qwen3vl_tiny"), family="qwen4"))


def test_released_config_json_layout_parses(tiny_qwen3vl_checkpoint, tmp_path):
  """The released files spell RoPE as `rope_scaling` + `rope_theta` in text_config."""
  d = json.loads((tiny_qwen3vl_checkpoint / "config.json").read_text())
  text = d["text_config"]
  rope = text.pop("rope_parameters")
  text["rope_theta"] = rope.pop("rope_theta")
  text["rope_scaling"] = rope
  assert backbones.config_from_hf(d) == hf_loading.load_config(tiny_qwen3vl_checkpoint)
  d["model_type"] = "qwen3_vl_moe"
  (tmp_path / "config.json").write_text(json.dumps(d))
  with pytest.raises(hf_loading.CheckpointError, match="qwen3_vl_moe"):
    hf_loading.load_config(tmp_path)


def test_sharded_checkpoint_loads_the_same(flax_model, tmp_path):
  _, reference = flax_model
  make_tiny_qwen3vl_hf_model(seed=0).save_pretrained(tmp_path, max_shard_size="100KB")
  assert (tmp_path / hf_loading.INDEX_FILE).exists()
  params = hf_loading.load_params(tmp_path)
  assert jax.tree.structure(params) == jax.tree.structure(reference)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_shape_mismatch_names_the_key(tiny_qwen3vl_checkpoint, tmp_path):
  import safetensors.numpy
  reader = hf_loading.SafetensorsReader(tiny_qwen3vl_checkpoint)
  tensors = {k: np.array(reader.get(k)) for k in reader.keys()}
  key = "model.language_model.layers.1.self_attn.k_norm.weight"
  tensors[key] = np.ones((8,), np.float32)
  (tmp_path / "config.json").write_text((tiny_qwen3vl_checkpoint / "config.json").read_text())
  safetensors.numpy.save_file(tensors, str(tmp_path / hf_loading.SINGLE_FILE))
  with pytest.raises(hf_loading.CheckpointError, match=r"k_norm\.weight.*\(8,\).*\(16,\)"):
    hf_loading.load_params(tmp_path)


def test_every_parameter_has_known_logical_axes():
  for name in ("qwen3vl_tiny", "qwen3vl_4b"):
    abstract = hf_loading.abstract_params(backbones.config_from_dict(backbone_preset(name)))
    sharding.check_logical_names(abstract, LOGICAL_AXIS_RULES)
    boxed = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)
                            or hasattr(x, "names"))
    assert all(hasattr(leaf, "names") for leaf in boxed), "a parameter has no logical axes"
    # Scanned: decoder layers and vision blocks stacked on a leading `layers` axis.
    attention = abstract["model"]["layers"]["self_attn"]
    assert attention["q_norm"]["scale"].names == ("layers", "norm")
    assert attention["q_proj"]["kernel"].names == ("layers", "embed", "heads", "kv")
    assert abstract["visual"]["blocks"]["attn"]["qkv"]["kernel"].names[0] == "layers"
    assert abstract["visual"]["deepstack_merger_list_0"]["linear_fc1"]["kernel"].names == (
        "embed", "mlp")
