"""Qwen2.5-VL in linen: the text decoder with M-RoPE, the multimodal rope index, the full model.

Reads top to bottom as the architecture:

  configs -> M-RoPE (`mrope_cos_sin`, `apply_rope`) -> `dot_product_attention` -> `KVCache`
  -> `RMSNorm`, `Attention`, `MLP` -> `DecoderLayer` -> `TextModel` -> `get_rope_index`
  -> `Qwen25VL` (vision tower + image-feature merge + text model + lm head).

Parameter trees mirror the Hugging Face names so that loading a checkpoint is a rename
(`twinbrain_jax.models.hf_loading`): `model/embed_tokens/embedding`, `model/layers/
{input_layernorm, self_attn/{q,k,v,o}_proj, post_attention_layernorm, mlp/{gate,up,down}_proj}`
(every layer stacked on a leading `layers` axis, `nn.scan`; `model/layers_{i}/...` when
unrolled, `scan_layers=False`), `model/norm`, `lm_head`, `visual/...`.

Logical axes (sharding scheme, shared with the vision tower): projection kernels keep their head
axes (einsum projections, `EinsumDense`): q `[embed, heads, kv]`, k/v `[embed, kv_heads, kv]`, o
`[heads, kv, embed]` (biases `[heads, kv]` / `[kv_heads, kv]`); gate/up `[embed, mlp]`, down
`[mlp, embed]`; the token embedding `[vocab, embed]`, an untied lm head `[embed, vocab]`, norm
scales `[norm]`. Tensor parallelism thus always splits on head boundaries. Activations are
constrained as `(batch, length, embed)`, `(batch, length, heads, kv)` and
`(batch, length, vocab)`.

The per-layer split used by AsyMoT joint attention: `DecoderLayer.qkv` (norm, projections, RoPE)
and `DecoderLayer.out` (o_proj, residual, MLP), with the pure `dot_product_attention` in between;
`DecoderLayer.__call__` is exactly `qkv -> dot_product_attention -> out`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from twinbrain_jax.models.layers import (INIT_STD, EinsumDense, LoraConfig, RMSNorm,
                                         adapter_config, add_layer_addition, dense,
                                         dot_product_attention, remat, scan_layers)
from twinbrain_jax.models.qwen25vl_vision import VisionConfig, VisionTower

Dtype = Any



def _get(d: Mapping[str, Any], key: str, where: str) -> Any:
  if key not in d:
    raise KeyError(f"{where} has no field {key!r}; is this a Qwen2.5-VL config?")
  return d[key]


# ---------------------------------------------------------------------------------------------
# Configs.


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The language model's sizes (field names follow the HF `text_config`)."""
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  intermediate_size: int
  vocab_size: int
  tie_word_embeddings: bool
  mrope_section: tuple[int, ...]
  rope_theta: float = 1e6
  rms_norm_eps: float = 1e-6
  hidden_act: str = "silu"
  max_position_embeddings: int = 128000

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"TextConfig: hidden_size={self.hidden_size} is not divisible by "
          f"num_attention_heads={self.num_attention_heads}.")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"TextConfig: num_attention_heads={self.num_attention_heads} is not a multiple of "
          f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention).")
    if sum(self.mrope_section) != self.head_dim // 2:
      raise ValueError(
          f"TextConfig: mrope_section={list(self.mrope_section)} sums to "
          f"{sum(self.mrope_section)} but must sum to head_dim/2 = {self.head_dim // 2}.")
    if self.hidden_act != "silu":
      raise ValueError(f"TextConfig: hidden_act={self.hidden_act!r} is not supported; use 'silu'.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_config_dict(cls, cd: Mapping[str, Any]) -> TextConfig:
    """From the `text` block of `backbone_presets.backbone_preset(...)`."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = dict(cd)
    unknown = sorted(set(kwargs) - names)
    if unknown:
      raise ValueError(f"Unknown text config field(s) {unknown}; known: {sorted(names)}.")
    kwargs["mrope_section"] = tuple(int(s) for s in _get(cd, "mrope_section", "text config"))
    return cls(**kwargs)

  @classmethod
  def from_hf(cls, d: Mapping[str, Any], tie_word_embeddings: bool | None = None) -> TextConfig:
    """From an HF text config dict (`text_config`, or the flat top level of older files)."""
    if tie_word_embeddings is None:
      tie_word_embeddings = d.get("tie_word_embeddings", False)
    return cls(**hf_text_fields(d, tie_word_embeddings, family="Qwen2.5-VL", rope_theta=1e6,
                                max_position_embeddings=128000))


def hf_text_fields(d: Mapping[str, Any], tie_word_embeddings: bool, *, family: str,
                   rope_theta: float, max_position_embeddings: int) -> dict[str, Any]:
  """The text-config fields Qwen2.5-VL and Qwen3-VL read alike from an HF text config dict
  (`rope_parameters`, or `rope_scaling` + `rope_theta` in older files); `rope_theta` and
  `max_position_embeddings` are the family's defaults for keys the file leaves out."""
  rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
  if "mrope_section" not in rope:
    raise KeyError("config.json text config has no `mrope_section` in rope_parameters / "
                   f"rope_scaling; is this a {family} config?")

  def need(key: str) -> Any:
    if key not in d:
      raise KeyError(f"config.json text config has no field {key!r}; is this a {family} config?")
    return d[key]

  return dict(
      hidden_size=int(need("hidden_size")),
      num_hidden_layers=int(need("num_hidden_layers")),
      num_attention_heads=int(need("num_attention_heads")),
      num_key_value_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
      intermediate_size=int(need("intermediate_size")),
      vocab_size=int(need("vocab_size")),
      tie_word_embeddings=bool(tie_word_embeddings),
      mrope_section=tuple(int(s) for s in rope["mrope_section"]),
      rope_theta=float(rope.get("rope_theta", d.get("rope_theta", rope_theta))),
      rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
      hidden_act=str(d.get("hidden_act", "silu")),
      max_position_embeddings=int(d.get("max_position_embeddings", max_position_embeddings)))


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
  """The whole model: text and vision sizes plus the special-token ids."""
  text: TextConfig
  vision: VisionConfig
  image_token_id: int
  video_token_id: int
  vision_start_token_id: int
  vision_end_token_id: int

  family = "qwen25vl"  # Not a field: which backbone this config builds.

  @classmethod
  def from_config_dict(cls, cd: Mapping[str, Any]) -> Qwen25VLConfig:
    """From `config.model.backbone` (a `backbone_presets.backbone_preset(...)` block)."""
    return cls(
        text=TextConfig.from_config_dict(_get(cd, "text", "backbone config")),
        vision=VisionConfig.from_config_dict(_get(cd, "vision", "backbone config")),
        **{k: int(_get(cd, k, "backbone config")) for k in _TOKEN_ID_FIELDS})

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> Qwen25VLConfig:
    """From a parsed HF `config.json`, either layout.

    Newer files nest the language model under `text_config`; older ones (the released
    Qwen2.5-VL checkpoints) put its fields at the top level with `rope_scaling`.
    """
    d = dict(d)
    text_dict = d.get("text_config") or d
    # The top level says whether embeddings are tied in both layouts; older files may only
    # carry it inside text_config.
    tie = d.get("tie_word_embeddings")
    if tie is None or (not tie and text_dict.get("tie_word_embeddings")):
      tie = bool(text_dict.get("tie_word_embeddings", False))
    ids = {k: int(d.get(k, text_dict.get(k, _QWEN_DEFAULT_IDS[k]))) for k in _TOKEN_ID_FIELDS}
    return cls(
        text=TextConfig.from_hf(text_dict, tie_word_embeddings=tie),
        vision=VisionConfig.from_hf(_get(d, "vision_config", "config.json")),
        **ids)


_TOKEN_ID_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id",
                    "vision_end_token_id")
# HF's defaults when a config.json leaves the ids out (the released tokenizer's ids).
_QWEN_DEFAULT_IDS = dict(image_token_id=151655, video_token_id=151656,
                         vision_start_token_id=151652, vision_end_token_id=151653)


# ---------------------------------------------------------------------------------------------
# Multimodal rotary embedding (M-RoPE).


def mrope_cos_sin(position_ids: jax.Array, head_dim: int, theta: float,
                  mrope_section: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """Cos/sin tables of M-RoPE.

  The `head_dim / 2` rotary frequencies are split into `mrope_section` groups; group i takes
  its angle from position axis i (temporal, height, width). The table repeats over the two
  halves of the head dimension (the rotate-half convention).

  Args:
    position_ids: [3, B, L] integer positions (temporal, height, width).
    head_dim: D, the attention head size.
    theta: the rotary base.
    mrope_section: frequencies per axis, summing to D / 2.

  Returns:
    cos, sin: [B, L, D] float32.
  """
  half = head_dim // 2
  if sum(mrope_section) != half:
    raise ValueError(f"mrope_section={list(mrope_section)} must sum to head_dim/2={half}.")
  axis_of_freq = np.repeat(np.arange(len(mrope_section)) % 3, mrope_section)
  return rope_cos_sin_by_axis(position_ids, head_dim, theta, axis_of_freq)


def rope_cos_sin_by_axis(position_ids: jax.Array, head_dim: int, theta: float,
                         axis_of_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """Cos/sin tables [B, L, D] (float32) where frequency j takes its angle from position axis
  `axis_of_freq[j]` of `position_ids` [3, B, L]; `axis_of_freq` is `[D/2]` in {0, 1, 2}."""
  inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  positions = jnp.asarray(position_ids).astype(jnp.float32)  # [3, B, L]
  positions = jnp.moveaxis(positions[np.asarray(axis_of_freq)], 0, -1)  # [B, L, D/2]
  angles = positions * jnp.asarray(inv_freq, jnp.float32)  # [B, L, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)  # [B, L, D]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates `x` [B, L, H, D] by the angles of cos/sin [B, L, D] (rotate-half convention)."""
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos + rotated * sin


# ---------------------------------------------------------------------------------------------
# Attention.


@struct.dataclass
class LayerKV:
  """One layer's key/value cache.

  Attributes:
    k: [B, S, Hkv, D] keys (RoPE applied) for S cache slots.
    v: [B, S, Hkv, D] values.
    index: [] int32, the first slot not yet written.
  """
  k: jax.Array
  v: jax.Array
  index: jax.Array

  def update(self, k_new: jax.Array, v_new: jax.Array) -> LayerKV:
    """Writes [B, L, Hkv, D] keys/values at slots `index .. index + L - 1`."""
    start = (0, self.index, 0, 0)
    return LayerKV(k=jax.lax.dynamic_update_slice(self.k, k_new.astype(self.k.dtype), start),
                   v=jax.lax.dynamic_update_slice(self.v, v_new.astype(self.v.dtype), start),
                   index=self.index + k_new.shape[1])


@struct.dataclass
class KVCache:
  """Key/value cache of the whole text model.

  Slots are filled left to right for the whole batch at once, so a left-padded prefill keeps
  its padding slots; `key_mask` records which slots hold real tokens.

  Attributes:
    layers: one `LayerKV` per decoder layer.
    key_mask: [B, S] bool, True for slots holding a valid (non-padding) token.
  """
  layers: tuple[LayerKV, ...]
  key_mask: jax.Array

  @property
  def index(self) -> jax.Array:
    """[] int32, how many slots are filled."""
    return self.layers[0].index

  @classmethod
  def init(cls, config: TextConfig, batch_size: int, max_length: int,
           dtype: Dtype = jnp.float32) -> KVCache:
    """An empty cache of `max_length` slots."""
    shape = (batch_size, max_length, config.num_key_value_heads, config.head_dim)
    layer = lambda: LayerKV(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                            index=jnp.zeros((), jnp.int32))
    return cls(layers=tuple(layer() for _ in range(config.num_hidden_layers)),
               key_mask=jnp.zeros((batch_size, max_length), bool))


def causal_padding_mask(attention_mask: jax.Array) -> jax.Array:
  """[B, L] validity (1 = token, 0 = padding) -> [B, L, L] causal mask over valid keys."""
  valid = attention_mask.astype(bool)
  length = valid.shape[1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  return causal[None, :, :] & valid[:, None, :]


# ---------------------------------------------------------------------------------------------
# Layers.

# The projections of a decoder layer (`parent/name`) and how many input axes each kernel has
# (o_proj reads [heads, kv]); low-rank adapters and int8 kernels are named by these.
DECODER_PROJECTIONS = {"self_attn/q_proj": 1, "self_attn/k_proj": 1, "self_attn/v_proj": 1,
                       "self_attn/o_proj": 2, "mlp/gate_proj": 1, "mlp/up_proj": 1,
                       "mlp/down_proj": 1}


def decoder_projection_shapes(config: Any) -> dict[str, tuple[int, int]]:
  """`DECODER_PROJECTIONS` name -> (inputs, outputs) of its matrix, for a Qwen2.5-VL or
  Qwen3-VL `TextConfig`."""
  e, i = config.hidden_size, config.intermediate_size
  q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
  return {"self_attn/q_proj": (e, q), "self_attn/k_proj": (e, kv), "self_attn/v_proj": (e, kv),
          "self_attn/o_proj": (q, e), "mlp/gate_proj": (e, i), "mlp/up_proj": (e, i),
          "mlp/down_proj": (i, e)}


class Attention(nn.Module):
  """The q/k/v/o projections of one decoder layer (q/k/v with bias, o without); `lora` adds
  adapters to the projections it targets."""
  config: TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoraConfig | None = None

  def projection_kwargs(self, name: str, **kw: Any) -> dict[str, Any]:
    """Keyword arguments of the `EinsumDense` called `name` (its adapter, if targeted)."""
    return dict(dtype=self.dtype, param_dtype=self.param_dtype,
                lora=adapter_config(self.lora, f"self_attn/{name}"), **kw)

  def setup(self):
    c = self.config
    kw = self.projection_kwargs
    e, hq, hkv, d = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    # Kernels keep their head axes (created in their final shape, so the logical names apply).
    self.q_proj = EinsumDense("ble,ehd->blhd", (e, hq, d), ("embed", "heads", "kv"),
                              **kw("q_proj"))
    self.k_proj = EinsumDense("ble,ehd->blhd", (e, hkv, d), ("embed", "kv_heads", "kv"),
                              **kw("k_proj"))
    self.v_proj = EinsumDense("ble,ehd->blhd", (e, hkv, d), ("embed", "kv_heads", "kv"),
                              **kw("v_proj"))
    self.o_proj = EinsumDense("blhd,hde->ble", (hq, d, e), ("heads", "kv", "embed"),
                              contracted=2, **kw("o_proj", use_bias=False))

  def project_qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, L, E] -> q [B, L, Hq, D], k and v [B, L, Hkv, D], RoPE applied to q and k."""
    q = nn.with_logical_constraint(apply_rope(self.q_proj(x), cos, sin),
                                   ("batch", "length", "heads", "kv"))
    k = nn.with_logical_constraint(apply_rope(self.k_proj(x), cos, sin),
                                   ("batch", "length", "kv_heads", "kv"))
    v = nn.with_logical_constraint(self.v_proj(x), ("batch", "length", "kv_heads", "kv"))
    return q, k, v

  def project_out(self, attn: jax.Array) -> jax.Array:
    """attn [B, L, Hq, D] -> [B, L, E]."""
    return self.o_proj(attn)


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases; kernels `[in, out]` as
  `nn.Dense`'s. `lora` adds adapters to the projections it targets."""
  config: TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    e, i = c.hidden_size, c.intermediate_size

    def projection(name, equation, shape, axes):
      return EinsumDense(equation, shape, axes, use_bias=False, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=name,
                         lora=adapter_config(self.lora, f"mlp/{name}"))

    gate = projection("gate_proj", "ble,ef->blf", (e, i), ("embed", "mlp"))(x)
    up = projection("up_proj", "ble,ef->blf", (e, i), ("embed", "mlp"))(x)
    hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
    return projection("down_proj", "blf,fe->ble", (i, e), ("mlp", "embed"))(hidden)


class DecoderLayer(nn.Module):
  """A Qwen2 pre-norm decoder layer, split into the halves that joint attention needs.

  `__call__(hidden, cos, sin, mask, cache)` = `qkv` -> `dot_product_attention` -> `out`.
  Subclasses change the attention projections through `attention_cls` (Qwen3's q/k norms).
  `lora` adds low-rank adapters to the projections it targets (`DECODER_PROJECTIONS`).
  """
  config: TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoraConfig | None = None
  attention_cls = Attention  # Not a field: a subclass's choice.

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.input_layernorm = RMSNorm(c.rms_norm_eps, **kw)
    self.self_attn = self.attention_cls(c, lora=self.lora, **kw)
    self.post_attention_layernorm = RMSNorm(c.rms_norm_eps, **kw)
    self.mlp = MLP(c, lora=self.lora, **kw)

  def qkv(self, hidden: jax.Array, cos: jax.Array, sin: jax.Array
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Input RMSNorm, q/k/v projections, RoPE.

    Args:
      hidden: [B, L, E] the residual stream entering the layer.
      cos, sin: [B, L, D] from `mrope_cos_sin`.

    Returns:
      q [B, L, Hq, D], k [B, L, Hkv, D], v [B, L, Hkv, D].
    """
    return self.self_attn.project_qkv(self.input_layernorm(hidden), cos, sin)

  def out(self, hidden: jax.Array, attn: jax.Array) -> jax.Array:
    """o_proj + residual, then post-attention RMSNorm, SwiGLU MLP + residual.

    Args:
      hidden: [B, L, E] the residual stream that entered the layer.
      attn: [B, L, Hq, D] the attention output for the layer's queries.

    Returns:
      [B, L, E] the residual stream leaving the layer.
    """
    hidden = hidden + self.self_attn.project_out(attn)
    hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
    return nn.with_logical_constraint(hidden, ("batch", "length", "embed"))

  def __call__(self, hidden: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
               cache: LayerKV | None = None, layer_index: int | jax.Array = 0,
               additions: jax.Array | None = None) -> tuple[jax.Array, LayerKV | None]:
    """One layer.

    Args:
      hidden: [B, L, E].
      cos, sin: [B, L, D].
      mask: [B, L, L] without a cache; [B, L, S] over the cache slots with one.
      cache: this layer's `LayerKV`; the new keys/values are written at `cache.index`.
      layer_index: this layer's index `i` (an int, or a traced `[]` int when scanned).
      additions: [K, B, L, E] per-layer additions (Qwen3-VL's DeepStack maps) or None; the
        layer adds `additions[i]` to its output when `i < K`.

    Returns:
      ([B, L, E], the updated cache or None).
    """
    q, k, v = self.qkv(hidden, cos, sin)
    if cache is not None:
      cache = cache.update(k, v)
      k, v = cache.k, cache.v
    hidden = self.out(hidden, dot_product_attention(q, k, v, mask))
    return add_layer_addition(hidden, additions, layer_index), cache


class TextModel(nn.Module):
  """The Qwen2 language model: token embedding, decoder layers, final RMSNorm.

  With `scan_layers` (the default) the decoder layers are one `nn.scan` over a `DecoderLayer`
  whose params are stacked on a leading `layers` axis (`model/layers/...`, `[L, ...]`): the step
  traces and compiles one layer. Otherwise they are unrolled (`model/layers_{i}/...`).
  `remat_policy` (see `layers.REMAT_POLICIES`) recomputes each layer in the backward pass; unrolled, it
  applies to each layer's halves (`qkv`, `out`), also when AsyMoT drives them one by one.
  Subclasses change the layers through `decoder_layer_cls` and the position encoding through
  `rotary`. `lora` puts low-rank adapters on the decoder layers' projections it targets.
  """
  config: TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = True
  lora: LoraConfig | None = None
  decoder_layer_cls = DecoderLayer  # Not a field: a subclass's choice.

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    layer_kw = dict(kw, lora=self.lora)
    self.embed_tokens = nn.Embed(
        c.vocab_size, c.hidden_size, embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(INIT_STD), ("vocab", "embed")), **kw)
    layer_cls = self.decoder_layer_cls
    if self.scan_layers:
      # Carry: hidden. Shared: cos, sin, mask, the per-layer additions. Scanned: the per-layer
      # cache (or None) and the layer index.
      stack = scan_layers(layer_cls, c.num_hidden_layers,
                          (nn.broadcast, nn.broadcast, nn.broadcast, 0, 0, nn.broadcast),
                          self.remat_policy)
      self.layers = stack(c, **layer_kw)
    else:
      layer_cls = remat(layer_cls, self.remat_policy, methods=("qkv", "out"))
      self.layers = [layer_cls(c, **layer_kw) for _ in range(c.num_hidden_layers)]  # layers_{i}
    self.norm = RMSNorm(c.rms_norm_eps, **kw)

  def layer(self) -> DecoderLayer:
    """An unbound `DecoderLayer` of this model's sizes and dtypes (for scanned params)."""
    return self.decoder_layer_cls(self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                                  lora=self.lora, parent=None)

  def stacked_layer_params(self) -> Any:
    """The decoder layers' params stacked on a leading `layers` axis (scanned layout only)."""
    if not self.scan_layers:
      raise ValueError("stacked_layer_params needs scan_layers=True.")
    return nn.unbox(self.layers.variables["params"])

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """[B, L] token ids -> [B, L, E] embeddings."""
    return self.embed_tokens(input_ids)

  def rotary(self, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[3, B, L] positions -> cos, sin [B, L, D]."""
    c = self.config
    return mrope_cos_sin(position_ids, c.head_dim, c.rope_theta, c.mrope_section)

  def run_layers(self, hidden: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 layer_caches: Sequence[LayerKV] | None = None,
                 additions: jax.Array | None = None
                 ) -> tuple[jax.Array, tuple[LayerKV, ...] | None]:
    """All decoder layers: hidden [B, L, E] -> [B, L, E] (before the final norm).

    `additions` [K, B, L, E] (or None) are added after layers 0 .. K-1 (`add_layer_addition`).
    """
    if self.scan_layers:
      stacked = None if layer_caches is None else jax.tree.map(
          lambda *xs: jnp.stack(xs), *layer_caches)
      layer_index = jnp.arange(self.config.num_hidden_layers)
      hidden, stacked = self.layers(hidden, cos, sin, mask, stacked, layer_index, additions)
      if layer_caches is None:
        return hidden, None
      return hidden, tuple(jax.tree.map(lambda x, i=i: x[i], stacked)
                           for i in range(len(layer_caches)))
    caches = [None] * len(self.layers) if layer_caches is None else list(layer_caches)
    for i, layer in enumerate(self.layers):
      hidden, caches[i] = layer(hidden, cos, sin, mask, caches[i], i, additions)
    return hidden, None if layer_caches is None else tuple(caches)

  def __call__(self, inputs_embeds: jax.Array, position_ids: jax.Array,
               attention_mask: jax.Array, cache: KVCache | None = None,
               layer_additions: jax.Array | None = None
               ) -> tuple[jax.Array, KVCache | None]:
    """Runs the decoder.

    Args:
      inputs_embeds: [B, L, E].
      position_ids: [3, B, L] M-RoPE positions (see `get_rope_index`).
      attention_mask: [B, L], 1 for tokens and 0 for padding (left or right). With a cache it
        covers only the L new tokens; the cache remembers the earlier ones.
      cache: a `KVCache`; the L new tokens go to slots `cache.index ..`, so a prefill followed by
        single-token steps reproduces the full forward.
      layer_additions: [K, B, L, E] added to the residual stream after layers 0 .. K-1 (Qwen3-VL's
        DeepStack image features, zero away from the image tokens), or None.

    Returns:
      (final-norm hidden states [B, L, E], the updated cache or None).
    """
    hidden = nn.with_logical_constraint(inputs_embeds.astype(self.dtype),
                                        ("batch", "length", "embed"))
    cos, sin = self.rotary(position_ids)
    if cache is None:
      mask = causal_padding_mask(attention_mask)
      hidden, _ = self.run_layers(hidden, cos, sin, mask, additions=layer_additions)
      return self.norm(hidden), None
    start = cache.index
    key_mask = jax.lax.dynamic_update_slice(
        cache.key_mask, attention_mask.astype(bool), (0, start))
    length, slots = hidden.shape[1], key_mask.shape[1]
    # Query i sits at slot start + i; it sees valid slots up to its own.
    causal = jnp.arange(slots)[None, :] <= (start + jnp.arange(length))[:, None]
    mask = causal[None] & key_mask[:, None, :]
    hidden, layer_caches = self.run_layers(hidden, cos, sin, mask, cache.layers, layer_additions)
    return self.norm(hidden), KVCache(layers=layer_caches, key_mask=key_mask)


# ---------------------------------------------------------------------------------------------
# Multimodal position ids.


def get_rope_index(input_ids: np.ndarray, image_grid_thw: np.ndarray | None,
                   attention_mask: np.ndarray | None, config: Qwen25VLConfig
                   ) -> tuple[np.ndarray, np.ndarray]:
  """M-RoPE position ids of a batch of prompts with images (HF `get_rope_index` semantics).

  Text tokens get equal ids on the three axes, counting on from the previous token. An image of
  merged grid (t, h, w) placed after text ending at position p gets (p + t_i, p + h_i, p + w_i)
  for its tokens in row-major order, and the text after it continues at p + max(h, w).
  Padding (attention_mask 0) gets position 0. Images are consumed in order across the batch,
  one per run of `image_token_id` tokens of the image's merged size.

  Args:
    input_ids: [B, L] int.
    image_grid_thw: [n_images, 3] patch grids (before merging), or None for text only.
    attention_mask: [B, L] with 1 for tokens, 0 for padding, or None (all valid).
    config: the model config (token ids, spatial merge size).

  Returns:
    position_ids: [3, B, L] int32.
    rope_deltas: [B, 1] int32, `max position + 1 - number of valid tokens`; the next generated
      token of sample b sits at position `n_valid_b + rope_deltas[b]`.
  """
  input_ids = np.asarray(input_ids)
  batch, length = input_ids.shape
  mask = np.ones_like(input_ids, bool) if attention_mask is None else (
      np.asarray(attention_mask).astype(bool))
  merge = config.vision.spatial_merge_size
  grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else (
      np.asarray(image_grid_thw, np.int64).reshape(-1, 3))
  next_image = 0
  position_ids = np.zeros((3, batch, length), np.int32)
  deltas = np.zeros((batch, 1), np.int32)
  for b in range(batch):
    ids = input_ids[b][mask[b]]
    is_image = ids == config.image_token_id
    pieces, current, i = [], 0, 0
    while i < len(ids):
      if not is_image[i]:
        j = i
        while j < len(ids) and not is_image[j]:
          j += 1
        pieces.append(np.broadcast_to(np.arange(current, current + j - i), (3, j - i)))
        current += j - i
        i = j
        continue
      if next_image >= len(grids):
        raise ValueError(
            f"Sample {b} has more runs of image tokens (id {config.image_token_id}) than the "
            f"{len(grids)} grids in image_grid_thw; pass one grid per image, in order.")
      t, h, w = (int(x) for x in grids[next_image])
      next_image += 1
      grid_t, grid_h, grid_w = t, h // merge, w // merge
      num_tokens = grid_t * grid_h * grid_w
      if i + num_tokens > len(ids) or not is_image[i:i + num_tokens].all():
        raise ValueError(
            f"Sample {b}: image {next_image - 1} with grid {(t, h, w)} needs {num_tokens} "
            f"consecutive image tokens at valid position {i}, but the run is shorter. Expand "
            "each image placeholder to t*h*w/merge**2 tokens.")
      tt, hh, ww = np.meshgrid(np.arange(grid_t), np.arange(grid_h), np.arange(grid_w),
                               indexing="ij")
      pieces.append(np.stack([tt, hh, ww]).reshape(3, -1) + current)
      current += max(h, w) // merge
      i += num_tokens
    if pieces:
      positions = np.concatenate(pieces, axis=1)
      position_ids[:, b, mask[b]] = positions
      deltas[b, 0] = positions.max() + 1 - len(ids)
  if next_image != len(grids):
    raise ValueError(
        f"image_grid_thw has {len(grids)} grids but the prompts hold {next_image} images "
        f"(runs of token {config.image_token_id}); pass exactly one grid per image.")
  return position_ids, deltas


def text_position_ids(attention_mask: np.ndarray) -> np.ndarray:
  """[B, L] validity -> [3, B, L] positions of a text-only batch (padding at 0)."""
  mask = np.asarray(attention_mask).astype(bool)
  positions = np.where(mask, np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return np.broadcast_to(positions[None], (3, *mask.shape)).copy()


def decode_position_ids(num_valid: jax.Array, rope_deltas: jax.Array) -> jax.Array:
  """Positions of the next generated token, text after the prompt (HF semantics).

  Args:
    num_valid: [B] number of valid tokens so far (prompt + generated), i.e. the new token's
      index among valid tokens.
    rope_deltas: [B, 1] from `get_rope_index` of the prompt.

  Returns:
    [3, B, 1] int32.
  """
  positions = jnp.asarray(num_valid, jnp.int32)[:, None] + jnp.asarray(rope_deltas, jnp.int32)
  return jnp.broadcast_to(positions[None], (3, *positions.shape))


# ---------------------------------------------------------------------------------------------
# The full model.


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def images_split_evenly(image_grid_thw: np.ndarray, batch_size: int) -> bool:
  """Whether a batch's images can be `images / batch_size` equal images per sample: every
  image has one grid and their count is a multiple of the batch (how training batches are
  built). `scatter_image_features` then places each sample's features within the sample."""
  grid = np.asarray(image_grid_thw)
  return len(grid) > 0 and len(grid) % batch_size == 0 and bool((grid == grid[:1]).all())


def scatter_image_features(base: jax.Array, input_ids: jax.Array, features: jax.Array,
                           image_token_id: int, per_sample: bool = False) -> jax.Array:
  """`base` with its image-token positions replaced by the image features, in prompt order.

  Args:
    base: [B, L, E] (token embeddings, or zeros for an additive map).
    input_ids: [B, L] with one `image_token_id` per merged image token.
    features: [N_tok, E] merged image tokens of all images in prompt order.
    per_sample: every sample holds N_tok / B image tokens (`images_split_evenly`): sample b
      takes rows b * N_tok / B onwards, a gather within each sample that keeps a batch-sharded
      input sharded (the global order needs every device to see all features). A traced sample
      with another image-token count gets NaN embeddings, so a wrong split cannot train quietly.

  Returns:
    [B, L, E]; raises when `input_ids` is concrete and its image-token count differs from N_tok.
  """
  is_image = input_ids == image_token_id  # [B, L]
  batch, length, width = base.shape
  per_sample = per_sample and features.shape[0] % batch == 0
  if _is_concrete(input_ids):
    counts = np.asarray(is_image).sum(1)
    if counts.sum() != features.shape[0]:
      raise ValueError(
          f"The prompts hold {counts.sum()} image tokens (id {image_token_id}) but the images "
          f"give {features.shape[0]} merged features; expand each image placeholder to "
          "t*h*w/merge**2 tokens.")
    per_sample = per_sample and bool((counts == counts[0]).all())
  if per_sample:
    per_image = features.shape[0] // batch
    index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, per_image - 1)  # [B, L]
    gathered = jnp.take_along_axis(features.reshape(batch, per_image, width), index[..., None],
                                   axis=1)
    out = jnp.where(is_image[..., None], gathered.astype(base.dtype), base)
    even = is_image.sum(1) == per_image
    return jnp.where(even[:, None, None], out, jnp.array(jnp.nan, base.dtype))
  # The k-th image token takes the k-th feature (features are in prompt order).
  is_image = is_image.reshape(-1)  # [B*L]
  feature_index = jnp.clip(jnp.cumsum(is_image) - 1, 0, features.shape[0] - 1)
  flat = jnp.where(is_image[:, None], features[feature_index].astype(base.dtype),
                   base.reshape(batch * length, width))
  return flat.reshape(batch, length, width)


class Qwen25VL(nn.Module):
  """Qwen2.5-VL: vision tower, image features merged into the token embeddings, text model,
  lm head (tied to the embedding matrix when `tie_word_embeddings`).

  Subclasses (Qwen3-VL) swap the parts through `vision_tower_cls` / `text_model_cls`. `lora`
  puts low-rank adapters on the decoder layers' projections it targets.
  """
  config: Qwen25VLConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = True
  lora: LoraConfig | None = None
  vision_tower_cls = VisionTower  # Not fields: a subclass's choice.
  text_model_cls = TextModel

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, scan_layers=self.scan_layers)
    self.visual = self.vision_tower_cls(self.config.vision, remat_policy=self.remat_policy, **kw)
    self.model = self.text_model_cls(self.config.text, remat_policy=self.remat_policy,
                                     lora=self.lora, **kw)
    kw.pop("scan_layers")
    if not self.config.text.tie_word_embeddings:
      self.lm_head = dense(self.config.text.vocab_size, ("embed", "vocab"), use_bias=False, **kw)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[B, L, E] final-norm hidden states -> [B, L, vocab] logits."""
    if self.config.text.tie_word_embeddings:
      logits = self.model.embed_tokens.attend(hidden)
    else:
      logits = self.lm_head(hidden)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

  def embed_inputs(self, input_ids: jax.Array, pixel_values: jax.Array | None,
                   image_grid_thw: np.ndarray | None) -> jax.Array:
    """Token embeddings with the image-token positions replaced by the vision features.

    Args:
      input_ids: [B, L] with one `image_token_id` per merged image token.
      pixel_values: [N, C*T*p*p] flattened patches of all images, or None.
      image_grid_thw: [n_images, 3] static host numpy grids.

    Returns:
      [B, L, E] embeddings.
    """
    embeds = self.model.embed(input_ids)
    if pixel_values is None:
      return embeds
    if image_grid_thw is None:
      raise ValueError("pixel_values were given without image_grid_thw; pass both.")
    features = self.visual(pixel_values, np.asarray(image_grid_thw))  # [N_tok, E]
    return scatter_image_features(embeds, input_ids, features, self.config.image_token_id,
                                  images_split_evenly(image_grid_thw, input_ids.shape[0]))

  def embed_multimodal(self, input_ids: jax.Array, pixel_values: jax.Array | None,
                       image_grid_thw: np.ndarray | None) -> tuple[jax.Array, None]:
    """(`embed_inputs(...)`, None): the backbone-agnostic form `TwinBrainVLA` calls; Qwen3-VL
    returns its DeepStack `layer_additions` in the second slot."""
    return self.embed_inputs(input_ids, pixel_values, image_grid_thw), None

  def prompt_position_ids(self, input_ids: jax.Array, attention_mask: jax.Array,
                          image_grid_thw: np.ndarray | None, cache: KVCache | None) -> np.ndarray:
    """[3, B, L] `get_rope_index` positions of a prompt (concrete inputs, empty cache)."""
    if cache is not None and not (_is_concrete(cache.index) and int(cache.index) == 0):
      raise ValueError(
          "With a filled KVCache, pass position_ids for the new tokens: "
          "decode_position_ids(num_valid, rope_deltas) after get_rope_index of the prompt.")
    if not (_is_concrete(input_ids) and _is_concrete(attention_mask)):
      raise ValueError(
          "position_ids=None needs concrete input_ids and attention_mask to run get_rope_index; "
          "under jit, compute position_ids with get_rope_index outside and pass them in.")
    return get_rope_index(np.asarray(input_ids), image_grid_thw, np.asarray(attention_mask),
                          self.config)[0]

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               pixel_values: jax.Array | None = None, image_grid_thw: np.ndarray | None = None,
               position_ids: jax.Array | None = None, cache: KVCache | None = None
               ) -> dict[str, Any]:
    """Forward pass.

    Args:
      input_ids: [B, L] int token ids with expanded image placeholders.
      attention_mask: [B, L], 1 for tokens, 0 for padding.
      pixel_values: [N, C*T*p*p] float patches of all images in prompt order, or None.
      image_grid_thw: [n_images, 3] int host numpy (static: it shapes the vision tower).
      position_ids: [3, B, L]; when None they are computed with `get_rope_index`, which needs
        concrete `input_ids` and `attention_mask` (outside `jit`, or pass them in).
      cache: an optional `KVCache` (prefill / decode).

    Returns:
      dict(logits [B, L, vocab], hidden_states [B, L, E] (final norm), cache).
    """
    if position_ids is None:
      position_ids = self.prompt_position_ids(input_ids, attention_mask, image_grid_thw, cache)
    embeds = self.embed_inputs(input_ids, pixel_values, image_grid_thw)
    hidden, cache = self.model(embeds, position_ids, attention_mask, cache)
    return dict(logits=self.logits(hidden), hidden_states=hidden, cache=cache)


def dummy_inputs(config: Qwen25VLConfig, batch_size: int = 1) -> dict[str, Any]:
  """Smallest valid inputs (one 2x2-merged-unit image) for `init` / `jax.eval_shape`."""
  v = config.vision
  side = 2 * v.spatial_merge_size
  grid = np.array([[1, side, side]], np.int64)
  num_patches = side * side
  num_tokens = num_patches // v.spatial_merge_size ** 2
  patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
  ids = np.full((batch_size, num_tokens + 1), config.image_token_id, np.int32)
  ids[:, 0] = config.vision_start_token_id
  pixel_values = np.zeros((batch_size * num_patches, patch_dim), np.float32)
  return dict(input_ids=ids, attention_mask=np.ones_like(ids),
              pixel_values=pixel_values, image_grid_thw=np.tile(grid, (batch_size, 1)))


def init_params(model: Qwen25VL, rng: jax.Array) -> Any:
  """Boxed (logically annotated) parameters of `model`, from `dummy_inputs`."""
  inputs = dummy_inputs(model.config)
  return model.init(rng, **inputs)["params"]
