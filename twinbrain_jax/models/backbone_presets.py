"""Backbone sizes as config data (field names follow the HF `config.json`).

Qwen2.5-VL (`family="qwen25vl"`): `tiny` is for tests (compiles in seconds), `small` is the size
every benchmark uses, `3b`/`7b` are the released Qwen2.5-VL-{3B,7B}-Instruct models.

Qwen3-VL (`family="qwen3vl"`): `qwen3vl_tiny` (tests), `qwen3vl_small` (benchmarks), and
`qwen3vl_{2b,4b,8b}`, the released Qwen3-VL-{2B,4B,8B}-Instruct `config.json` sizes (text:
hidden / layers / heads / kv heads / head_dim / MLP; vision: depth / width / MLP / DeepStack
blocks; 4B: 2560/36/32/8/128/9728, tied, vision 24 x 1024 / 4096, DeepStack 5, 11, 17).
"""

from __future__ import annotations

import ml_collections

from twinbrain_jax.config_lib import ConfigError

# Special-token ids of the released Qwen2.5-VL tokenizer.
_QWEN_TOKEN_IDS = dict(
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
    vision_end_token_id=151653)


def _vision(depth, hidden_size, num_heads, intermediate_size, out_hidden_size, fullatt_block_indexes,
            window_size=112):
  return ml_collections.ConfigDict(dict(
      depth=depth, hidden_size=hidden_size, num_heads=num_heads,
      intermediate_size=intermediate_size, out_hidden_size=out_hidden_size,
      fullatt_block_indexes=tuple(fullatt_block_indexes), window_size=window_size,
      patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3,
      hidden_act="silu", rms_norm_eps=1e-6))


def _text(hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
          intermediate_size, vocab_size, tie_word_embeddings, mrope_section, rope_theta=1e6,
          max_position_embeddings=128000):
  return ml_collections.ConfigDict(dict(
      hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
      num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
      intermediate_size=intermediate_size, vocab_size=vocab_size,
      tie_word_embeddings=tie_word_embeddings, mrope_section=tuple(mrope_section),
      rope_theta=rope_theta, rms_norm_eps=1e-6, hidden_act="silu",
      max_position_embeddings=max_position_embeddings))


def _qwen3_vision(depth, hidden_size, num_heads, intermediate_size, out_hidden_size,
                  deepstack_visual_indexes, num_position_embeddings=2304):
  return ml_collections.ConfigDict(dict(
      depth=depth, hidden_size=hidden_size, num_heads=num_heads,
      intermediate_size=intermediate_size, out_hidden_size=out_hidden_size,
      deepstack_visual_indexes=tuple(deepstack_visual_indexes),
      num_position_embeddings=num_position_embeddings, patch_size=16, temporal_patch_size=2,
      spatial_merge_size=2, in_channels=3, hidden_act="gelu_pytorch_tanh", rope_theta=10000.0))


def _qwen3_text(hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
                head_dim, intermediate_size, vocab_size, tie_word_embeddings, mrope_section,
                rope_theta=5e6, max_position_embeddings=262144):
  return ml_collections.ConfigDict(dict(
      hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
      num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
      head_dim=head_dim, intermediate_size=intermediate_size, vocab_size=vocab_size,
      tie_word_embeddings=tie_word_embeddings, mrope_section=tuple(mrope_section),
      rope_theta=rope_theta, rms_norm_eps=1e-6, hidden_act="silu",
      max_position_embeddings=max_position_embeddings))


_QWEN3VL_NAMES = ("qwen3vl_tiny", "qwen3vl_small", "qwen3vl_2b", "qwen3vl_4b", "qwen3vl_8b")
BACKBONE_NAMES = ("tiny", "small", "3b", "7b") + _QWEN3VL_NAMES


def _qwen3vl_preset(name: str) -> ml_collections.ConfigDict:
  if name == "qwen3vl_tiny":
    # 3 decoder layers: the 2 DeepStack maps enter after layers 0 and 1, layer 2 runs without.
    text = _qwen3_text(64, 3, 4, 2, 16, 128, 512, True, [4, 2, 2], max_position_embeddings=2048)
    vision = _qwen3_vision(3, 32, 2, 64, 64, [0, 1], num_position_embeddings=36)
    ids = dict(image_token_id=500, video_token_id=501, vision_start_token_id=498,
               vision_end_token_id=499)
  elif name == "qwen3vl_small":
    text = _qwen3_text(512, 8, 8, 2, 64, 1408, 4096, True, [12, 10, 10],
                       max_position_embeddings=4096)
    vision = _qwen3_vision(4, 256, 4, 512, 512, [0, 1, 2], num_position_embeddings=576)
    ids = dict(image_token_id=4090, video_token_id=4091, vision_start_token_id=4088,
               vision_end_token_id=4089)
  elif name == "qwen3vl_2b":
    text = _qwen3_text(2048, 28, 16, 8, 128, 6144, 151936, True, [24, 20, 20])
    vision = _qwen3_vision(24, 1024, 16, 4096, 2048, [5, 11, 17])
    ids = _QWEN_TOKEN_IDS
  elif name == "qwen3vl_4b":
    text = _qwen3_text(2560, 36, 32, 8, 128, 9728, 151936, True, [24, 20, 20])
    vision = _qwen3_vision(24, 1024, 16, 4096, 2560, [5, 11, 17])
    ids = _QWEN_TOKEN_IDS
  else:  # qwen3vl_8b
    text = _qwen3_text(4096, 36, 32, 8, 128, 12288, 151936, False, [24, 20, 20])
    vision = _qwen3_vision(27, 1152, 16, 4304, 4096, [8, 16, 24])
    ids = _QWEN_TOKEN_IDS
  return ml_collections.ConfigDict(dict(name=name, family="qwen3vl", text=text, vision=vision,
                                        **ids))


def backbone_preset(name: str) -> ml_collections.ConfigDict:
  """The backbone block `config.model.backbone` for a named size; `family` says which model
  (`qwen25vl` or `qwen3vl`) it builds."""
  if name in _QWEN3VL_NAMES:
    return _qwen3vl_preset(name)
  if name == "tiny":
    text = _text(64, 2, 4, 2, 128, 512, True, [2, 3, 3], max_position_embeddings=2048)
    vision = _vision(2, 32, 2, 64, 64, [1])
    ids = dict(image_token_id=500, video_token_id=501, vision_start_token_id=498,
               vision_end_token_id=499)
  elif name == "small":
    text = _text(512, 8, 8, 2, 1408, 4096, True, [8, 12, 12], max_position_embeddings=4096)
    vision = _vision(4, 256, 4, 512, 512, [3])
    ids = dict(image_token_id=4090, video_token_id=4091, vision_start_token_id=4088,
               vision_end_token_id=4089)
  elif name == "3b":
    text = _text(2048, 36, 16, 2, 11008, 151936, True, [16, 24, 24])
    vision = _vision(32, 1280, 16, 3420, 2048, [7, 15, 23, 31])
    ids = _QWEN_TOKEN_IDS
  elif name == "7b":
    text = _text(3584, 28, 28, 4, 18944, 152064, False, [16, 24, 24])
    vision = _vision(32, 1280, 16, 3420, 3584, [7, 15, 23, 31])
    ids = _QWEN_TOKEN_IDS
  else:
    raise ConfigError(f"Unknown backbone size {name!r}; choose one of: "
                      f"{', '.join(BACKBONE_NAMES)}.")
  return ml_collections.ConfigDict(dict(name=name, family="qwen25vl", text=text, vision=vision,
                                        **ids))
