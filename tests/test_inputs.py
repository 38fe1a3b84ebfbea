"""Pipeline batch -> TwinBrainVLA batch: prompts, patches, positions; the synthetic tokenizer."""

import jax
import numpy as np
import pytest

from fixtures_twinbrain import tiny_config
from twinbrain_jax.inputs import RIGHT_PROMPT, ModelInputs
from twinbrain_jax.models.image_processor import preprocess_images, processor_settings
from twinbrain_jax.models.qwen25vl import get_rope_index
from twinbrain_jax.models.tokenizer import (IM_START, IMAGE_PAD, VISION_END, VISION_START,
                                            write_synthetic_tokenizer)
from twinbrain_jax.models.twinbrain import TwinBrainVLA

INSTRUCTIONS = ["put the spoon on the towel", "pick up the red block and place it in the bowl"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  config = tiny_config()
  tok = write_synthetic_tokenizer(
      tmp_path_factory.mktemp("tok"), config.backbone, INSTRUCTIONS * 20 + [RIGHT_PROMPT] * 20,
      reserved_ids=(config.action_token_id, config.propri_token_id))
  return ModelInputs(config, tok, max_left_tokens=96, max_right_tokens=128, image_size=(112, 112))


def _pipeline_batch(seed=0):
  rng = np.random.default_rng(seed)
  return dict(image=rng.integers(0, 256, (2, 112, 112, 3), dtype=np.uint8),
              instruction=np.array(INSTRUCTIONS), state=rng.normal(size=(2, 8)).astype(np.float32),
              actions=rng.normal(size=(2, 16, 7)).astype(np.float32),
              action_mask=np.ones((2, 16), bool))


def test_synthetic_tokenizer_places_specials_at_config_ids(inputs):
  tok, bb = inputs.tokenizer, inputs.config.backbone
  assert tok.image_pad_id == bb.image_token_id
  assert tok.vision_start_id == bb.vision_start_token_id
  assert tok.vision_end_id == bb.vision_end_token_id
  # The right brain's reserved rows are not produced by the tokenizer for any text.
  ids = set(tok.encode(" ".join(INSTRUCTIONS) + RIGHT_PROMPT))
  assert inputs.config.action_token_id not in ids and inputs.config.propri_token_id not in ids
  assert tok.decode(tok.encode("put the spoon on the towel")) == "put the spoon on the towel"


def test_model_batch_layout(inputs):
  batch = inputs(_pipeline_batch())
  config, tok = inputs.config, inputs.tokenizer
  assert batch["left_input_ids"].shape == (2, 96) and batch["right_input_ids"].shape == (2, 128)
  grid = inputs.image_grid_thw(2)
  np.testing.assert_array_equal(grid, [[1, 8, 8], [1, 8, 8]])
  for b, text in enumerate(INSTRUCTIONS):
    left = batch["left_input_ids"][b][batch["left_attention_mask"][b] == 1]
    expected = (f"{IM_START}user\n{VISION_START}{IMAGE_PAD * 16}{VISION_END}{text}<|im_end|>\n"
                f"{IM_START}assistant\n")
    assert tok.decode(left, skip_special_tokens=False) == expected
    right = batch["right_input_ids"][b][batch["right_attention_mask"][b] == 1]
    assert list(right[-9:]) == [config.propri_token_id] + [config.action_token_id] * 8
    assert RIGHT_PROMPT.format(instruction=text) in tok.decode(right[:-9], skip_special_tokens=False)
    # Left padding: the valid tokens are the suffix.
    assert batch["left_attention_mask"][b][-len(left):].all()
  for side in ("left", "right"):
    expected_pos, _ = get_rope_index(batch[f"{side}_input_ids"], grid,
                                     batch[f"{side}_attention_mask"], config.backbone)
    np.testing.assert_array_equal(batch[f"{side}_position_ids"], expected_pos)
  images = _pipeline_batch()["image"]
  expected_pixels, expected_grid = preprocess_images(list(images))
  np.testing.assert_array_equal(expected_grid, grid)
  np.testing.assert_array_equal(batch["pixel_values"], expected_pixels)
  np.testing.assert_array_equal(batch["actions"], _pipeline_batch()["actions"])


def test_model_runs_on_the_batch(inputs):
  batch = inputs(_pipeline_batch())
  model = TwinBrainVLA(inputs.config)
  grid = inputs.image_grid_thw(2)
  noisy = np.zeros((2, 16, 7), np.float32)
  params = jax.jit(lambda r: model.init(r, batch, grid, noisy, np.zeros(2, np.float32)))(
      jax.random.key(0))
  context, mask = jax.jit(lambda p, b: model.apply(p, b, grid, method=TwinBrainVLA.encode))(
      params, batch)
  assert context.shape == (2, 8, inputs.config.backbone.text.hidden_size) and mask.all()
  assert np.isfinite(np.asarray(context)).all()


def test_bad_batches_are_clear_errors(inputs):
  batch = _pipeline_batch()
  with pytest.raises(KeyError, match="no 'instruction'"):
    inputs({k: v for k, v in batch.items() if k != "instruction"})
  with pytest.raises(ValueError, match="state has width 7 but model.state_dim is 8"):
    inputs(dict(batch, state=batch["state"][:, :7]))
  with pytest.raises(ValueError, match=r"Expected images \[B, 112, 112, 3\]"):
    inputs(dict(batch, image=np.zeros((2, 96, 96, 3), np.uint8)))
  with pytest.raises(ValueError, match="more than inputs.max_left_tokens=96"):
    inputs(dict(batch, instruction=np.array(["put the spoon on the towel " * 20] * 2)))
  with pytest.raises(ValueError, match="must be multiples of 28"):
    ModelInputs(inputs.config, inputs.tokenizer, 96, 128, image_size=(100, 100))


def test_qwen3vl_inputs_use_its_processor_and_run(tmp_path):
  """Qwen3-VL: patch 16 (128 px -> 8x8 patches, 16 image tokens), mean/std 0.5, DeepStack."""
  config = tiny_config("qwen3vl_tiny")
  tok = write_synthetic_tokenizer(
      tmp_path, config.backbone, INSTRUCTIONS * 20 + [RIGHT_PROMPT] * 20,
      reserved_ids=(config.action_token_id, config.propri_token_id))
  inputs = ModelInputs(config, tok, max_left_tokens=96, max_right_tokens=128,
                       image_size=(128, 128))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
  batch = inputs(dict(_pipeline_batch(), image=images))
  grid = inputs.image_grid_thw(2)
  np.testing.assert_array_equal(grid, [[1, 8, 8], [1, 8, 8]])
  settings = dict(processor_settings("qwen3vl"), min_pixels=128 * 128, max_pixels=128 * 128)
  expected_pixels, expected_grid = preprocess_images(list(images), **settings)
  np.testing.assert_array_equal(expected_grid, grid)
  np.testing.assert_array_equal(batch["pixel_values"], expected_pixels)
  assert (batch["left_input_ids"] == config.backbone.image_token_id).sum() == 2 * 16
  with pytest.raises(ValueError, match="multiples of 32"):
    ModelInputs(config, tok, max_left_tokens=96, max_right_tokens=128, image_size=(112, 112))
