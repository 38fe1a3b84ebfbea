"""Qwen2.5-VL backbone sizes as config data (field names follow the HF `config.json`).

`tiny` is for tests (compiles in seconds), `small` is the size every benchmark uses, `3b`/`7b`
are the released Qwen2.5-VL-{3B,7B}-Instruct models.
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


def backbone_preset(name: str) -> ml_collections.ConfigDict:
  """The backbone block `config.model.backbone` for a named size."""
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
    raise ConfigError(f"Unknown backbone size {name!r}; choose one of: tiny, small, 3b, 7b.")
  return ml_collections.ConfigDict(dict(name=name, text=text, vision=vision, **ids))
