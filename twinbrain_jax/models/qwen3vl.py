"""Qwen3-VL in linen: the Qwen3 decoder with interleaved M-RoPE and DeepStack, the full model.

Reads top to bottom as the architecture:

  configs -> interleaved M-RoPE (`interleaved_mrope_axes`) -> `Attention` (per-head q/k RMSNorm,
  no biases) -> `DecoderLayer` -> `TextModel` -> `Qwen3VL` (vision tower with DeepStack + image
  features merged into the token embeddings + text model + lm head).

What is Qwen2.5-VL's is imported from `qwen25vl`: the layer split used by AsyMoT (`qkv` /
`out`), the SwiGLU MLP, the KV cache, the causal padding mask, `get_rope_index` (Qwen3-VL places
image tokens exactly as Qwen2.5-VL does) and the decoder stack (one `nn.scan` over the layers,
or unrolled with `scan_layers=False`), whose `layer_additions` carry the DeepStack maps: map k
(from vision block `deepstack_visual_indexes[k]`, zero away from the image tokens) is added to
the residual stream after decoder layer k, as HF's `_deepstack_process`. Scanned, the K maps are
one operand broadcast to every step and the scanned layer index picks map i while i < K.

Parameter trees mirror the Hugging Face names: `model/embed_tokens`, `model/layers/
{input_layernorm, self_attn/{q,k,v,o}_proj, self_attn/{q,k}_norm, post_attention_layernorm,
mlp/{gate,up,down}_proj}` (stacked on a leading `layers` axis; `model/layers_{i}/...` when
unrolled), `model/norm`, `lm_head`, `visual/...` (`qwen3vl_vision`), with the logical axes of
`qwen25vl` (q/k norm scales `[norm]`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from twinbrain_jax.models import qwen25vl
from twinbrain_jax.models.layers import EinsumDense, RMSNorm
from twinbrain_jax.models.qwen25vl import (KVCache, apply_rope, get_rope_index,
                                           images_split_evenly, rope_cos_sin_by_axis,
                                           scatter_image_features)
from twinbrain_jax.models.qwen3vl_vision import VisionConfig, VisionTower

Dtype = Any

FAMILY = "qwen3vl"


def _get(d: Mapping[str, Any], key: str, where: str) -> Any:
  if key not in d:
    raise KeyError(f"{where} has no field {key!r}; is this a Qwen3-VL config?")
  return d[key]


# ---------------------------------------------------------------------------------------------
# Configs.


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The Qwen3 language model's sizes (field names follow the HF `text_config`); unlike
  Qwen2.5-VL the head size is its own field."""
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  intermediate_size: int
  vocab_size: int
  tie_word_embeddings: bool
  mrope_section: tuple[int, ...]
  rope_theta: float = 5e6
  rms_norm_eps: float = 1e-6
  hidden_act: str = "silu"
  max_position_embeddings: int = 262144

  def __post_init__(self):
    object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"Qwen3-VL TextConfig: num_attention_heads={self.num_attention_heads} is not a "
          f"multiple of num_key_value_heads={self.num_key_value_heads}.")
    if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
      raise ValueError(
          f"Qwen3-VL TextConfig: mrope_section={list(self.mrope_section)} must be three sizes "
          f"(t, h, w) summing to head_dim/2 = {self.head_dim // 2}.")
    if self.hidden_act != "silu":
      raise ValueError(f"Qwen3-VL TextConfig: hidden_act={self.hidden_act!r} is not supported; "
                       "use 'silu'.")

  @classmethod
  def from_config_dict(cls, cd: Mapping[str, Any]) -> TextConfig:
    """From the `text` block of `backbone_presets.backbone_preset("qwen3vl_...")`."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cd) - names)
    if unknown:
      raise ValueError(f"Unknown Qwen3-VL text config field(s) {unknown}; known: "
                       f"{sorted(names)}.")
    return cls(**dict(cd))

  @classmethod
  def from_hf(cls, d: Mapping[str, Any], tie_word_embeddings: bool) -> TextConfig:
    """From the HF `text_config` dict (`rope_parameters`, or `rope_scaling` + `rope_theta` in
    the released files)."""
    fields = qwen25vl.hf_text_fields(d, tie_word_embeddings, family="Qwen3-VL", rope_theta=5e6,
                                     max_position_embeddings=262144)
    head_dim = d.get("head_dim") or fields["hidden_size"] // fields["num_attention_heads"]
    return cls(head_dim=int(head_dim), **fields)


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
  """The whole model: text and vision sizes plus the special-token ids."""
  text: TextConfig
  vision: VisionConfig
  image_token_id: int
  video_token_id: int
  vision_start_token_id: int
  vision_end_token_id: int

  family = FAMILY  # Not a field: which backbone this config builds.

  def __post_init__(self):
    if self.vision.out_hidden_size != self.text.hidden_size:
      raise ValueError(
          f"Qwen3-VL: vision out_hidden_size={self.vision.out_hidden_size} must equal the text "
          f"hidden_size={self.text.hidden_size} (image features replace token embeddings).")
    if len(self.vision.deepstack_visual_indexes) > self.text.num_hidden_layers:
      raise ValueError(
          f"Qwen3-VL: {len(self.vision.deepstack_visual_indexes)} DeepStack maps but only "
          f"{self.text.num_hidden_layers} decoder layers to add them to.")

  @classmethod
  def from_config_dict(cls, cd: Mapping[str, Any]) -> Qwen3VLConfig:
    """From `config.model.backbone` (a `backbone_presets.backbone_preset("qwen3vl_...")`)."""
    return cls(
        text=TextConfig.from_config_dict(_get(cd, "text", "backbone config")),
        vision=VisionConfig.from_config_dict(_get(cd, "vision", "backbone config")),
        **{k: int(_get(cd, k, "backbone config")) for k in qwen25vl._TOKEN_ID_FIELDS})

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> Qwen3VLConfig:
    """From a parsed HF Qwen3-VL `config.json` (`text_config` and `vision_config` blocks)."""
    text = _get(d, "text_config", "config.json")
    tie = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    ids = {k: int(d.get(k, qwen25vl._QWEN_DEFAULT_IDS[k])) for k in qwen25vl._TOKEN_ID_FIELDS}
    return cls(text=TextConfig.from_hf(text, tie_word_embeddings=tie),
               vision=VisionConfig.from_hf(_get(d, "vision_config", "config.json")), **ids)


def hf_config_kwargs(config: Qwen3VLConfig) -> dict[str, Any]:
  """Keyword arguments of `transformers.Qwen3VLConfig` describing the same model (the inverse
  of `Qwen3VLConfig.from_hf`; tests and benchmarks build the reference model with it)."""
  t, v = config.text, config.vision
  text = dict(
      vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
      num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
      num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, hidden_act=t.hidden_act,
      max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
      rope_parameters=dict(rope_type="default", rope_theta=float(t.rope_theta),
                           mrope_section=list(t.mrope_section), mrope_interleaved=True),
      tie_word_embeddings=t.tie_word_embeddings, bos_token_id=None, eos_token_id=None)
  vision = dict(
      depth=v.depth, hidden_size=v.hidden_size, hidden_act=v.hidden_act,
      intermediate_size=v.intermediate_size, num_heads=v.num_heads, in_channels=v.in_channels,
      patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size,
      temporal_patch_size=v.temporal_patch_size, out_hidden_size=v.out_hidden_size,
      num_position_embeddings=v.num_position_embeddings,
      deepstack_visual_indexes=list(v.deepstack_visual_indexes),
      rope_parameters=dict(rope_type="axial", rope_theta=float(v.rope_theta)))
  return dict(text_config=text, vision_config=vision, tie_word_embeddings=t.tie_word_embeddings,
              **{k: getattr(config, k) for k in qwen25vl._TOKEN_ID_FIELDS})


# ---------------------------------------------------------------------------------------------
# Interleaved M-RoPE.


def interleaved_mrope_axes(head_dim: int, mrope_section: tuple[int, ...]) -> np.ndarray:
  """Which position axis drives each of the `head_dim / 2` rotary frequencies, `[D/2]`.

  Frequencies cycle t, h, w: frequency j is height's when `j % 3 == 1` and
  `j < 3 * mrope_section[1]`, width's when `j % 3 == 2` and `j < 3 * mrope_section[2]`, and
  temporal otherwise (HF's `Qwen3VLTextRotaryEmbedding.recomposition_frequencies`).
  """
  freq = np.arange(head_dim // 2)
  axes = np.zeros(head_dim // 2, np.int64)
  for axis in (1, 2):
    axes[(freq % 3 == axis) & (freq < 3 * mrope_section[axis])] = axis
  return axes


# ---------------------------------------------------------------------------------------------
# Layers.


class Attention(qwen25vl.Attention):
  """The q/k/v/o projections of a Qwen3 layer: no biases, RMSNorm over each q and k head
  before RoPE."""
  config: TextConfig

  def setup(self):
    c = self.config
    kw = lambda name: self.projection_kwargs(name, use_bias=False)
    e, hq, hkv, d = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    self.q_proj = EinsumDense("ble,ehd->blhd", (e, hq, d), ("embed", "heads", "kv"),
                              **kw("q_proj"))
    self.k_proj = EinsumDense("ble,ehd->blhd", (e, hkv, d), ("embed", "kv_heads", "kv"),
                              **kw("k_proj"))
    self.v_proj = EinsumDense("ble,ehd->blhd", (e, hkv, d), ("embed", "kv_heads", "kv"),
                              **kw("v_proj"))
    self.o_proj = EinsumDense("blhd,hde->ble", (hq, d, e), ("heads", "kv", "embed"),
                              contracted=2, **kw("o_proj"))
    self.q_norm = RMSNorm(c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
    self.k_norm = RMSNorm(c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)

  def project_qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, L, E] -> q [B, L, Hq, D], k and v [B, L, Hkv, D]; q/k normed, then rotated."""
    q = nn.with_logical_constraint(apply_rope(self.q_norm(self.q_proj(x)), cos, sin),
                                   ("batch", "length", "heads", "kv"))
    k = nn.with_logical_constraint(apply_rope(self.k_norm(self.k_proj(x)), cos, sin),
                                   ("batch", "length", "kv_heads", "kv"))
    v = nn.with_logical_constraint(self.v_proj(x), ("batch", "length", "kv_heads", "kv"))
    return q, k, v


class DecoderLayer(qwen25vl.DecoderLayer):
  """A Qwen3 pre-norm decoder layer (the Qwen2.5 layer with Qwen3's attention projections)."""
  config: TextConfig
  attention_cls = Attention


class TextModel(qwen25vl.TextModel):
  """The Qwen3 language model with interleaved M-RoPE; DeepStack maps enter through
  `layer_additions`."""
  config: TextConfig
  decoder_layer_cls = DecoderLayer

  def rotary(self, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[3, B, L] positions -> cos, sin [B, L, D]."""
    c = self.config
    return rope_cos_sin_by_axis(position_ids, c.head_dim, c.rope_theta,
                                interleaved_mrope_axes(c.head_dim, c.mrope_section))


# ---------------------------------------------------------------------------------------------
# The full model.


class Qwen3VL(qwen25vl.Qwen25VL):
  """Qwen3-VL: vision tower with DeepStack, image features merged into the token embeddings,
  text model, lm head (tied to the embedding matrix when `tie_word_embeddings`)."""
  config: Qwen3VLConfig

  vision_tower_cls = VisionTower
  text_model_cls = TextModel

  def embed_multimodal(self, input_ids: jax.Array, pixel_values: jax.Array | None,
                       image_grid_thw: np.ndarray | None) -> tuple[jax.Array, jax.Array | None]:
    """Token embeddings with the image tokens replaced by the vision features, and the DeepStack
    maps.

    Args:
      input_ids: [B, L] with one `image_token_id` per merged image token.
      pixel_values: [N, C*T*p*p] flattened patches of all images, or None.
      image_grid_thw: [n_images, 3] static host numpy grids.

    Returns:
      (embeddings [B, L, E], `layer_additions` [K, B, L, E] zero away from the image tokens, or
      None without images).
    """
    embeds = self.model.embed(input_ids)
    if pixel_values is None:
      return embeds, None
    if image_grid_thw is None:
      raise ValueError("pixel_values were given without image_grid_thw; pass both.")
    features, deepstack = self.visual(pixel_values, np.asarray(image_grid_thw))
    image_id = self.config.image_token_id
    per_sample = images_split_evenly(image_grid_thw, input_ids.shape[0])
    embeds = scatter_image_features(embeds, input_ids, features, image_id, per_sample)
    if deepstack.shape[0] == 0:
      return embeds, None
    zeros = jnp.zeros_like(embeds)
    additions = jnp.stack([scatter_image_features(zeros, input_ids, feature, image_id, per_sample)
                           for feature in deepstack])
    return embeds, nn.with_logical_constraint(additions, (None, "batch", "length", "embed"))

  def embed_inputs(self, input_ids: jax.Array, pixel_values: jax.Array | None,
                   image_grid_thw: np.ndarray | None) -> jax.Array:
    """Token embeddings with the image features (without DeepStack; see `embed_multimodal`)."""
    return self.embed_multimodal(input_ids, pixel_values, image_grid_thw)[0]

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               pixel_values: jax.Array | None = None, image_grid_thw: np.ndarray | None = None,
               position_ids: jax.Array | None = None, cache: KVCache | None = None
               ) -> dict[str, Any]:
    """Forward pass; arguments and outputs as `Qwen25VL.__call__`.

    With a filled cache (decode steps) no images are passed, so no DeepStack maps are added, as
    in HF generation.
    """
    if position_ids is None:
      position_ids = self.prompt_position_ids(input_ids, attention_mask, image_grid_thw, cache)
    embeds, additions = self.embed_multimodal(input_ids, pixel_values, image_grid_thw)
    hidden, cache = self.model(embeds, position_ids, attention_mask, cache,
                               layer_additions=additions)
    return dict(logits=self.logits(hidden), hidden_states=hidden, cache=cache)


__all__ = ["Attention", "DecoderLayer", "FAMILY", "Qwen3VL", "Qwen3VLConfig", "TextConfig",
           "TextModel", "VisionConfig", "get_rope_index", "hf_config_kwargs",
           "interleaved_mrope_axes"]
