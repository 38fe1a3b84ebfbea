"""Initialising the train state from a Hugging Face Qwen2.5-VL checkpoint (both brains)."""

import json

import absl.flags
import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from fixtures_training import Trainer, synthetic_batch, tiny_config, to_numpy
from tests.fixtures_backbone import (make_tiny_hf_checkpoint, make_tiny_hf_model,  # noqa: F401
                                     tiny_hf_checkpoint, tiny_hf_config)
from twinbrain_jax.config_lib import ConfigError
from twinbrain_jax.models import hf_loading
from twinbrain_jax.models.qwen25vl import Qwen25VL
from twinbrain_jax.models.twinbrain import TwinBrainVLA, synthetic_observation
from twinbrain_jax.training import demo_data, loop, state as state_lib

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
absl.flags.FLAGS.mark_as_parsed()  # grain reads absl flags.

MESH = (2, 2, 2)
NUM_REAL_TOKENS = 496  # The tiny preset's <|action|> / <|propri|> rows are 496 and 497.


@pytest.fixture(scope="module")
def loaded(tiny_hf_checkpoint):
  """(trainer, randomly initialised state, state after loading the checkpoint), on (2, 2, 2)."""
  config = tiny_config(MESH)
  config.model.left_dtype = "float32"  # bf16 storage, float32 compute: compared with HF below.
  _, grid = synthetic_batch(config)
  trainer = Trainer(config, grid)
  initial = trainer.init()
  state = state_lib.load_pretrained_backbones(
      initial, trainer.shardings, state_lib.model_config(config), str(tiny_hf_checkpoint),
      trainer.mesh, trainer.rules)
  return trainer, to_numpy(initial), state


@pytest.fixture(scope="module")
def hf_params(tiny_hf_checkpoint):
  """The checkpoint in the flax layout, float32 (the HF tensors, transposed / reshaped)."""
  return to_numpy(hf_loading.load_params(tiny_hf_checkpoint, param_dtype=np.float32))


def _flat(tree):
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_left_is_the_checkpoint_in_bf16_and_right_in_fp32(loaded, hf_params, tiny_hf_checkpoint):
  _, _, state = loaded
  left, right = _flat(to_numpy(state.frozen["left"])), _flat(to_numpy(state.params["right"]))
  want = _flat(hf_params)
  assert left.keys() == right.keys() == want.keys()
  for key, expected in want.items():
    assert left[key].dtype == jax.numpy.bfloat16 and right[key].dtype == np.float32, key
    # Left: the HF tensor rounded to bf16, bit for bit.
    np.testing.assert_array_equal(left[key], expected.astype(jax.numpy.bfloat16), err_msg=key)
    if "embed_tokens" not in key:  # Right: the HF float32 tensor itself.
      np.testing.assert_array_equal(right[key], expected, err_msg=key)
  # The flax layout against the raw safetensors (torch Linear [out, in] -> kernel [in, heads, d]).
  reader = hf_loading.SafetensorsReader(tiny_hf_checkpoint)
  q_weight = np.asarray(reader.get("model.layers.1.self_attn.q_proj.weight"))  # [Hq * D, E]
  np.testing.assert_array_equal(
      to_numpy(state.params["right"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"])[1],
      q_weight.T.reshape(64, 4, 16))
  merger = np.asarray(reader.get("visual.merger.mlp.0.weight"))
  np.testing.assert_array_equal(
      to_numpy(state.params["right"]["visual"]["merger"]["mlp_0"]["kernel"]), merger.T)


def test_new_token_rows_start_at_the_mean_real_embedding(loaded, hf_params):
  _, _, state = loaded
  table = np.asarray(state.params["right"]["model"]["embed_tokens"]["embedding"])  # [V, E]
  hf_table = hf_params["model"]["embed_tokens"]["embedding"]
  # float64 reference mean; the float32 one differs by ~4e-10 (rows ~0.02, mean ~2e-3).
  mean = hf_table[:NUM_REAL_TOKENS].astype(np.float64).mean(axis=0)
  for row in (496, 497):
    np.testing.assert_allclose(table[row], mean, atol=1e-7, rtol=0)
    assert np.abs(hf_table[row] - mean).max() > 1e-3  # It was not that before.
  np.testing.assert_array_equal(np.delete(table, [496, 497], axis=0),
                                np.delete(hf_table, [496, 497], axis=0))
  # The left brain keeps the checkpoint's rows.
  left_table = np.asarray(state.frozen["left"]["model"]["embed_tokens"]["embedding"], np.float32)
  np.testing.assert_array_equal(left_table[496:498],
                                hf_table[496:498].astype(jax.numpy.bfloat16).astype(np.float32))


def test_loaded_state_keeps_the_shardings_and_the_rest(loaded):
  trainer, initial, state = loaded
  for tree, shardings in ((state.params, trainer.shardings.params),
                          (state.frozen, trainer.shardings.frozen)):
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
      assert leaf.sharding == sharding
  for side in (state.params["right"], state.frozen["left"]):
    q_kernel = side["model"]["layers"]["self_attn"]["q_proj"]["kernel"]  # [L, E, Hq, D]
    assert q_kernel.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    assert q_kernel.addressable_shards[0].data.shape == (q_kernel.shape[0], 32, 2, 16)
    assert side["model"]["embed_tokens"]["embedding"].sharding.spec == (
        PartitionSpec("tensor", "fsdp"))
  # The expert, the state encoder, the optimizer state and the step are untouched.
  for name in ("action_expert", "state_encoder"):
    for got, want in zip(jax.tree.leaves(state.params[name]),
                         jax.tree.leaves(initial.params[name])):
      np.testing.assert_array_equal(np.asarray(got), want)
  for got, want in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(initial.opt_state)):
    np.testing.assert_array_equal(np.asarray(got), want)
  assert int(state.step) == 0


def _hf_final_states(hf_model, obs, grid, image_token_id):
  ids = obs["left_input_ids"].astype(np.int64)
  with torch.no_grad():
    out = hf_model.model(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(obs["left_attention_mask"]),
        pixel_values=torch.tensor(obs["pixel_values"]), image_grid_thw=torch.tensor(grid),
        mm_token_type_ids=torch.tensor((ids == image_token_id).astype(np.int64)))
  return out.last_hidden_state.numpy()


# Both sides compute in float32 from the same bf16-rounded weights, so they differ only by
# float32 rounding: measured 1.2e-5 on final states up to 3.0 in magnitude (the left stream runs
# through the joint-attention code); asserted at 5e-5. Against the unrounded fp32 HF model the
# difference is 1.2e-2: the bf16 storage, not the computation, sets the gap.
def test_left_brain_reproduces_the_hf_model(loaded):
  trainer, _, state = loaded
  model_config = trainer.model.config
  # 12 x 16 patches: 6 x 8 merged units, so windows are partial and the merger and the
  # full-attention block all run; prompts of 5 and 9 text tokens, left-padded.
  obs, grid = synthetic_observation(model_config, text_lengths=(5, 9), image_grid=(1, 12, 16))
  with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
    brains = jax.jit(lambda p, o: trainer.model.apply(
        {"params": p}, o, grid, method=TwinBrainVLA.brains))
    hidden_left, _ = brains(state.all_params(), obs)
  hf_model = make_tiny_hf_model(seed=0).to(torch.bfloat16).float()  # The bf16 weights.
  want = _hf_final_states(hf_model, obs, grid, model_config.backbone.image_token_id)
  valid = obs["left_attention_mask"].astype(bool)
  err = np.abs(np.asarray(hidden_left)[valid] - want[valid]).max()
  assert err < 5e-5, err
  assert np.abs(want[valid]).max() > 0.5  # Not trivially small states.


# The right brain alone (outside the joint attention) is the float32 checkpoint: against the
# unrounded HF model, measured 1.2e-6, asserted at 1e-5 (a bf16-rounded copy misses by 1.2e-2).
def test_right_brain_alone_is_the_fp32_hf_model(loaded):
  trainer, _, state = loaded
  backbone = trainer.model.config.backbone
  obs, grid = synthetic_observation(trainer.model.config, text_lengths=(5, 9),
                                    image_grid=(1, 12, 16))
  with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
    run = jax.jit(lambda p, o: Qwen25VL(backbone).apply(
        {"params": p}, o["left_input_ids"], o["left_attention_mask"], o["pixel_values"], grid,
        o["left_position_ids"])["hidden_states"])
    hidden = run(state.params["right"], obs)
  want = _hf_final_states(make_tiny_hf_model(seed=0), obs, grid, backbone.image_token_id)
  valid = obs["left_attention_mask"].astype(bool)
  err = np.abs(np.asarray(hidden)[valid] - want[valid]).max()
  assert err < 1e-5, err


def test_checkpoint_of_another_model_is_refused(loaded, tmp_path):
  trainer, initial, _ = loaded
  initial = jax.device_put(initial, trainer.shardings)
  untied = make_tiny_hf_checkpoint(tmp_path / "untied", tie_word_embeddings=False)
  other_size = tmp_path / "small"
  other_size.mkdir()
  (other_size / "config.json").write_text(json.dumps(tiny_hf_config(preset="small").to_dict()))
  for path in (untied, other_size):
    with pytest.raises(ConfigError, match="differs from config.model.backbone") as error:
      state_lib.load_pretrained_backbones(initial, trainer.shardings, trainer.model.config,
                                          str(path), trainer.mesh, trainer.rules)
    assert str(path) in str(error.value)
    assert "Choose the preset of that checkpoint" in str(error.value)


def test_training_config_init_hf_checkpoint(loaded, tiny_hf_checkpoint, tmp_path):
  """`init.hf_checkpoint` in the config: `train` starts from the checkpoint (zero steps run)."""
  _, _, want = loaded
  config = demo_data.prepare(tiny_config(MESH), str(tmp_path / "data"), num_episodes=2,
                             num_eval_episodes=1)
  config.init.hf_checkpoint = str(tiny_hf_checkpoint)
  config.train.update(num_steps=0, progress_bar=False, eval_data_dir=None)
  result = loop.train(config, str(tmp_path / "run"))
  assert result.final_step == 0
  for tree, expected in ((result.state.frozen, want.frozen), (result.state.params, want.params)):
    for got, leaf in zip(jax.tree.leaves(tree), jax.tree.leaves(expected)):
      assert got.dtype == leaf.dtype and got.sharding == leaf.sharding
      np.testing.assert_array_equal(np.asarray(got), np.asarray(leaf))
