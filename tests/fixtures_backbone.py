"""Tiny random Hugging Face Qwen2.5-VL / Qwen3-VL checkpoints for parity tests (built offline).

The HF config mirrors `backbone_presets.backbone_preset("tiny")`: spatial merge 2, window 112 px
(4x4 merged units per window) and one full-attention vision block, so windows, merger and full
attention all run.

Use in a test module:

    from tests.fixtures_backbone import tiny_hf_checkpoint  # noqa: F401  (pytest fixture)

    def test_something(tiny_hf_checkpoint):
      model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_hf_checkpoint)
"""

from __future__ import annotations

import os
import pathlib

import pytest

from twinbrain_jax.models.backbone_presets import backbone_preset


def tiny_hf_config(tie_word_embeddings: bool = True, preset: str = "tiny"):
  """A `transformers.Qwen2_5_VLConfig` with the sizes of `backbone_preset(preset)`."""
  import transformers  # Test-only dependency.

  bb = backbone_preset(preset)
  text, vision = bb.text, bb.vision
  text_config = dict(
      vocab_size=text.vocab_size, hidden_size=text.hidden_size,
      intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
      num_attention_heads=text.num_attention_heads,
      num_key_value_heads=text.num_key_value_heads, hidden_act=text.hidden_act,
      max_position_embeddings=text.max_position_embeddings, rms_norm_eps=text.rms_norm_eps,
      rope_parameters=dict(rope_type="default", rope_theta=float(text.rope_theta),
                           mrope_section=list(text.mrope_section)),
      # The released token ids lie outside a tiny vocabulary.
      bos_token_id=None, eos_token_id=None, tie_word_embeddings=tie_word_embeddings)
  vision_config = dict(
      depth=vision.depth, hidden_size=vision.hidden_size, hidden_act=vision.hidden_act,
      intermediate_size=vision.intermediate_size, num_heads=vision.num_heads,
      in_channels=vision.in_channels, patch_size=vision.patch_size,
      spatial_merge_size=vision.spatial_merge_size,
      temporal_patch_size=vision.temporal_patch_size, window_size=vision.window_size,
      out_hidden_size=vision.out_hidden_size,
      fullatt_block_indexes=list(vision.fullatt_block_indexes))
  return transformers.Qwen2_5_VLConfig(
      text_config=text_config, vision_config=vision_config,
      image_token_id=bb.image_token_id, video_token_id=bb.video_token_id,
      vision_start_token_id=bb.vision_start_token_id,
      vision_end_token_id=bb.vision_end_token_id, tie_word_embeddings=tie_word_embeddings)


def make_tiny_hf_model(seed: int = 0, tie_word_embeddings: bool = True, preset: str = "tiny"):
  """A randomly initialised fp32 `Qwen2_5_VLForConditionalGeneration` in eval mode.

  HF initialises norms to one and biases to zero; they are re-drawn here so that a wrong
  mapping of any norm weight or bias shows up in the parity tests.
  """
  import torch
  import transformers

  torch.manual_seed(seed)
  model = transformers.Qwen2_5_VLForConditionalGeneration(
      tiny_hf_config(tie_word_embeddings, preset))
  return _perturb_norms_and_biases(model).float().eval()


def _perturb_norms_and_biases(model):
  """Re-draws norm weights around one and biases around zero (HF initialises them to exactly
  one / zero), so that a wrong mapping of any of them shows up in the parity tests."""
  import torch

  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("bias"):
        param.copy_(0.1 * torch.randn_like(param))
      elif "norm" in name or "ln_q" in name:
        param.copy_(1.0 + 0.1 * torch.randn_like(param))
  return model


def make_tiny_qwen3vl_hf_model(seed: int = 0, preset: str = "qwen3vl_tiny"):
  """A randomly initialised fp32 `Qwen3VLForConditionalGeneration` (eval mode) with the sizes
  of `backbone_preset(preset)`; norms and biases re-drawn as for Qwen2.5-VL."""
  import torch
  import transformers

  from twinbrain_jax.models import qwen3vl

  config = qwen3vl.Qwen3VLConfig.from_config_dict(backbone_preset(preset))
  torch.manual_seed(seed)
  model = transformers.Qwen3VLForConditionalGeneration(
      transformers.Qwen3VLConfig(**qwen3vl.hf_config_kwargs(config)))
  return _perturb_norms_and_biases(model).float().eval()


def make_tiny_hf_checkpoint(path, seed: int = 0, tie_word_embeddings: bool = True,
                            preset: str = "tiny") -> pathlib.Path:
  """Builds a tiny random checkpoint and writes it with `save_pretrained` to `path`.

  Returns:
    `path` (a directory with `config.json` and `model.safetensors`).
  """
  path = pathlib.Path(path)
  os.makedirs(path, exist_ok=True)
  make_tiny_hf_model(seed, tie_word_embeddings, preset).save_pretrained(path)
  return path


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory) -> pathlib.Path:
  """Directory of a tiny random tied-embedding Qwen2.5-VL checkpoint (seed 0), built once."""
  pytest.importorskip("transformers")
  return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_qwen25vl"), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3vl_checkpoint(tmp_path_factory) -> pathlib.Path:
  """Directory of a tiny random tied-embedding Qwen3-VL checkpoint (seed 0), built once."""
  pytest.importorskip("transformers")
  path = tmp_path_factory.mktemp("tiny_qwen3vl")
  make_tiny_qwen3vl_hf_model(seed=0).save_pretrained(path)
  return path
