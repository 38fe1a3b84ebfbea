"""Loading HF Qwen2.5-VL checkpoint directories: layouts, shards, dtypes, sharding, errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from configs.twinbrain import LOGICAL_AXIS_RULES
from tests.fixtures_backbone import make_tiny_hf_model, tiny_hf_checkpoint  # noqa: F401
from twinbrain_jax import sharding
from twinbrain_jax.models import hf_loading, qwen25vl
from twinbrain_jax.models.backbone_presets import backbone_preset

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")


@pytest.fixture(scope="module")
def reference_params(tiny_hf_checkpoint):
  return hf_loading.load_params(tiny_hf_checkpoint)


def _tensors(directory):
  reader = hf_loading.SafetensorsReader(directory)
  return {k: np.array(reader.get(k)) for k in reader.keys()}


def _write_checkpoint(src, dst, tensors, config=None):
  """A copy of checkpoint `src` at `dst` holding `tensors` (and optionally another config)."""
  dst.mkdir(parents=True, exist_ok=True)
  config = config if config is not None else json.loads((src / "config.json").read_text())
  (dst / "config.json").write_text(json.dumps(config))
  safetensors_numpy.save_file(tensors, str(dst / hf_loading.SINGLE_FILE))
  return dst


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


# ---------------------------------------------------------------------------------------------
# Configs.


def test_config_from_both_layouts_and_presets(tiny_hf_checkpoint):
  new = json.loads((tiny_hf_checkpoint / "config.json").read_text())
  config = qwen25vl.Qwen25VLConfig.from_hf(new)
  # The released checkpoints' layout: text fields at the top level, `rope_scaling`.
  old = {k: v for k, v in new.items() if k != "text_config"}
  text = dict(new["text_config"])
  rope = text.pop("rope_parameters")
  old.update(text, rope_theta=rope["rope_theta"],
             rope_scaling=dict(type="mrope", mrope_section=rope["mrope_section"]))
  assert qwen25vl.Qwen25VLConfig.from_hf(old) == config
  assert qwen25vl.Qwen25VLConfig.from_config_dict(backbone_preset("tiny")) == config
  assert config.text.mrope_section == (2, 3, 3) and config.text.tie_word_embeddings


def test_config_rejects_bad_mrope_section():
  bb = backbone_preset("tiny")
  bb.text.mrope_section = [2, 3, 4]
  with pytest.raises(ValueError, match="mrope_section"):
    qwen25vl.Qwen25VLConfig.from_config_dict(bb)


# ---------------------------------------------------------------------------------------------
# Values and layouts.


def test_loaded_values_are_the_checkpoint_tensors(tiny_hf_checkpoint, reference_params):
  tensors = _tensors(tiny_hf_checkpoint)
  layer = jax.tree.map(lambda x: x[1], reference_params["model"]["layers"])  # Stacked layers.
  q_weight = tensors["model.layers.1.self_attn.q_proj.weight"]  # [Hq * D, E]
  np.testing.assert_array_equal(layer["self_attn"]["q_proj"]["kernel"],
                                q_weight.T.reshape(64, 4, 16))
  np.testing.assert_array_equal(layer["self_attn"]["o_proj"]["kernel"],
                                tensors["model.layers.1.self_attn.o_proj.weight"].T.reshape(
                                    4, 16, 64))
  np.testing.assert_array_equal(layer["mlp"]["down_proj"]["kernel"],
                                tensors["model.layers.1.mlp.down_proj.weight"].T)
  np.testing.assert_array_equal(reference_params["model"]["embed_tokens"]["embedding"],
                                tensors["model.embed_tokens.weight"])
  assert "lm_head" not in reference_params  # Tied.


def test_new_key_layout_loads_the_same(tiny_hf_checkpoint, reference_params, tmp_path):
  renamed = {}
  for key, value in _tensors(tiny_hf_checkpoint).items():
    if key.startswith("visual."):
      key = "model." + key
    elif key.startswith("model."):
      key = "model.language_model." + key[len("model."):]
    renamed[key] = value
  _write_checkpoint(tiny_hf_checkpoint, tmp_path / "new", renamed)
  _assert_trees_equal(hf_loading.load_params(tmp_path / "new"), reference_params)


def test_sharded_checkpoint_with_index(reference_params, tmp_path):
  make_tiny_hf_model(seed=0).save_pretrained(tmp_path, max_shard_size="100KB")
  index = json.loads((tmp_path / hf_loading.INDEX_FILE).read_text())
  assert len(set(index["weight_map"].values())) > 1
  assert not (tmp_path / hf_loading.SINGLE_FILE).exists()
  _assert_trees_equal(hf_loading.load_params(tmp_path), reference_params)


def test_bf16_checkpoint_and_dtype_choice(tmp_path):
  model = make_tiny_hf_model(seed=1).to(torch.bfloat16)
  model.save_pretrained(tmp_path)
  expected = model.model.language_model.layers[0].mlp.up_proj.weight.detach().float().numpy().T
  for dtype in (jnp.bfloat16, jnp.float32):
    params = hf_loading.load_params(tmp_path, param_dtype=dtype)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(dtype)}
    np.testing.assert_array_equal(
        np.asarray(params["model"]["layers"]["mlp"]["up_proj"]["kernel"][0], np.float32), expected)
  assert hf_loading.SafetensorsReader(tmp_path).get(
      "model.norm.weight").dtype == ml_dtypes.bfloat16


def test_untied_lm_head_parity(tmp_path):
  hf_model = make_tiny_hf_model(seed=2, tie_word_embeddings=False)
  hf_model.save_pretrained(tmp_path)
  model, params = hf_loading.load_pretrained(tmp_path)
  assert not model.config.text.tie_word_embeddings
  np.testing.assert_array_equal(params["lm_head"]["kernel"],
                                hf_model.lm_head.weight.detach().numpy().T)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 490, (2, 6))
  mask = np.ones_like(ids)
  out = model.apply({"params": params}, ids, mask)
  with torch.no_grad():
    hf_logits = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
  assert float(np.abs(np.asarray(out["logits"]) - hf_logits.numpy()).max()) < 1e-4


def test_loading_into_a_mesh_shards_each_parameter(tiny_hf_checkpoint, reference_params):
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  rules = sharding.logical_axis_rules(LOGICAL_AXIS_RULES, mesh)
  params = hf_loading.load_params(tiny_hf_checkpoint, mesh=mesh, rules=rules)
  _assert_trees_equal(params, reference_params)
  q_kernel = params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]  # [L, E, Hq, D]
  assert q_kernel.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
  assert q_kernel.addressable_shards[0].data.shape == (q_kernel.shape[0], 32, 2, 16)
  embedding = params["model"]["embed_tokens"]["embedding"]
  assert embedding.sharding.spec == PartitionSpec("tensor", "fsdp")
  assert params["visual"]["blocks"]["mlp"]["gate_proj"]["kernel"].sharding.spec == (
      PartitionSpec(None, "fsdp", "tensor"))


def test_orbax_round_trip(tiny_hf_checkpoint, reference_params, tmp_path):
  hf_loading.save_orbax(reference_params, tmp_path / "orbax", tiny_hf_checkpoint)
  mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
  rules = sharding.logical_axis_rules(LOGICAL_AXIS_RULES, mesh)
  config, restored = hf_loading.restore_orbax(tmp_path / "orbax", mesh=mesh, rules=rules)
  assert config == hf_loading.load_config(tiny_hf_checkpoint)
  _assert_trees_equal(restored, reference_params)
  assert restored["model"]["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == (
      PartitionSpec(None, "fsdp", "tensor"))


# ---------------------------------------------------------------------------------------------
# Errors.


def test_missing_files(tiny_hf_checkpoint, tmp_path):
  with pytest.raises(hf_loading.CheckpointError, match="does not exist"):
    hf_loading.load_params(tmp_path / "nowhere", hf_loading.load_config(tiny_hf_checkpoint))
  with pytest.raises(hf_loading.CheckpointError, match="config.json"):
    hf_loading.load_config(tmp_path)
  shutil.copy(tiny_hf_checkpoint / "config.json", tmp_path / "config.json")
  with pytest.raises(hf_loading.CheckpointError, match="model.safetensors"):
    hf_loading.load_params(tmp_path)
  (tmp_path / hf_loading.INDEX_FILE).write_text(json.dumps(
      {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
  with pytest.raises(hf_loading.CheckpointError, match="model-00001-of-00002.safetensors"):
    hf_loading.load_params(tmp_path)


def test_missing_key_is_named(tiny_hf_checkpoint, tmp_path):
  tensors = _tensors(tiny_hf_checkpoint)
  del tensors["model.layers.1.self_attn.k_proj.bias"]
  _write_checkpoint(tiny_hf_checkpoint, tmp_path, tensors)
  with pytest.raises(hf_loading.CheckpointError,
                     match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
    hf_loading.load_params(tmp_path)


def test_missing_vision_key_is_named(tiny_hf_checkpoint, tmp_path):
  tensors = _tensors(tiny_hf_checkpoint)
  del tensors["visual.blocks.1.norm2.weight"]
  _write_checkpoint(tiny_hf_checkpoint, tmp_path, tensors)
  with pytest.raises(hf_loading.CheckpointError, match=r"visual\.blocks\.1\.norm2\.weight"):
    hf_loading.load_params(tmp_path)


def test_unexpected_key_is_named(tiny_hf_checkpoint, tmp_path):
  tensors = _tensors(tiny_hf_checkpoint)
  tensors["model.layers.2.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"]
  _write_checkpoint(tiny_hf_checkpoint, tmp_path, tensors)
  with pytest.raises(hf_loading.CheckpointError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
    hf_loading.load_params(tmp_path)


def test_shape_mismatch_names_key_and_both_shapes(tiny_hf_checkpoint, tmp_path):
  tensors = _tensors(tiny_hf_checkpoint)
  tensors["model.layers.0.mlp.gate_proj.weight"] = np.zeros((96, 64), np.float32)
  _write_checkpoint(tiny_hf_checkpoint, tmp_path / "text", tensors)
  with pytest.raises(hf_loading.CheckpointError,
                     match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\(96, 64\).*\(128, 64\)"):
    hf_loading.load_params(tmp_path / "text")
  tensors = _tensors(tiny_hf_checkpoint)
  tensors["model.layers.1.self_attn.q_proj.weight"] = np.zeros((80, 64), np.float32)
  _write_checkpoint(tiny_hf_checkpoint, tmp_path / "heads", tensors)
  with pytest.raises(hf_loading.CheckpointError,
                     match=r"layers\.1\.self_attn\.q_proj\.weight.*\(80, 64\).*\(64, 64\)"):
    hf_loading.load_params(tmp_path / "heads")
  tensors = _tensors(tiny_hf_checkpoint)
  tensors["visual.merger.mlp.2.bias"] = np.zeros((65,), np.float32)
  _write_checkpoint(tiny_hf_checkpoint, tmp_path / "vision", tensors)
  with pytest.raises(hf_loading.CheckpointError,
                     match=r"merger\.mlp\.2\.bias.*\(65,\).*\(64,\)"):
    hf_loading.load_params(tmp_path / "vision")


def test_hf_config_kwargs_round_trip(tiny_hf_checkpoint):
  config = hf_loading.load_config(tiny_hf_checkpoint)
  hf_config = transformers.Qwen2_5_VLConfig(**hf_loading.hf_config_kwargs(config))
  assert qwen25vl.Qwen25VLConfig.from_hf(hf_config.to_dict()) == config
  small = qwen25vl.Qwen25VLConfig.from_config_dict(backbone_preset("small"))
  hf_small = transformers.Qwen2_5_VLConfig(**hf_loading.hf_config_kwargs(small))
  assert qwen25vl.Qwen25VLConfig.from_hf(hf_small.to_dict()) == small
