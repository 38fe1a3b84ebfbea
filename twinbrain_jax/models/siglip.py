"""SigLIP vision tower (HF transformers `SiglipVisionModel`) in Flax, and its checkpoint loader.

    patches = Conv(p x p, stride p)(pixels) + learned positions           [B, P, E]
    blocks:   x += attn(LN1(x));  x += fc2(gelu_tanh(fc1(LN2(x))))         (bidirectional)
    last_hidden_state = post LN(x)                                         [B, P, E]
    pooler_output     = multi-head attention pooling of a learned probe    [B, E]   (use_head)

Pixels are channels-last `[B, S, S, 3]`, normalised as SigLIP's processor does ((x/255 - 0.5) /
0.5, i.e. in [-1, 1]). Libra-VLA's refiner reads `last_hidden_state` of the current frame.

    config = load_config(hf_dir); params = load_params(hf_dir, config)
    out = SiglipVisionModel(config).apply({"params": params}, pixels)
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from twinbrain_jax.models import hf_loading
from twinbrain_jax.models.dit import Attention
from twinbrain_jax.models.layers import dense

Dtype = Any
_POSITION_INIT = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
  """Sizes of the tower; field names are those of HF `SiglipVisionConfig`."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 16
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"
  use_head: bool = True

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"SiglipConfig.hidden_size={self.hidden_size} is not a multiple of "
                       f"num_attention_heads={self.num_attention_heads}.")
    if self.image_size % self.patch_size:
      raise ValueError(f"SiglipConfig.image_size={self.image_size} is not a multiple of "
                       f"patch_size={self.patch_size}.")
    if self.hidden_act != "gelu_pytorch_tanh":
      raise ValueError(f"SiglipConfig.hidden_act={self.hidden_act!r}; only 'gelu_pytorch_tanh' "
                       "(SigLIP's) is implemented.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def from_config_dict(cls, config: Mapping[str, Any]) -> SiglipConfig:
    items = dict(config.items())
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(items) - fields)
    if unknown:
      raise ValueError(f"Unknown SigLIP config key(s) {unknown}; the fields are {sorted(fields)}.")
    return cls(**items)

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> SiglipConfig:
    """From a `SiglipVisionConfig` dict (or a `SiglipConfig` one, via its `vision_config`)."""
    d = d.get("vision_config", d)
    fields = [f.name for f in dataclasses.fields(cls) if f.name != "use_head"]
    return cls(**{k: d[k] for k in fields if k in d}, use_head=d.get("vision_use_head", True))


class MLP(nn.Module):
  config: SiglipConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, L, E] -> [B, L, E]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(self.config.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x)
    h = nn.with_logical_constraint(nn.gelu(h, approximate=True), ("batch", "length", "mlp"))
    return dense(self.config.hidden_size, ("mlp", "embed"), name="fc2", **kw)(h)


def _attention(config: SiglipConfig, name: str, dtype: Dtype, param_dtype: Dtype) -> Attention:
  e = config.hidden_size
  return Attention(e, config.num_attention_heads, config.head_dim, kv_features=e, use_bias=True,
                   dtype=dtype, param_dtype=param_dtype, name=name)


def _layer_norm(config: SiglipConfig, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                      name=name)


class EncoderLayer(nn.Module):
  config: SiglipConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, P, E] -> [B, P, E]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x + _attention(self.config, "self_attn", **kw)(
        _layer_norm(self.config, "layer_norm1", **kw)(x))
    x = x + MLP(self.config, name="mlp", **kw)(_layer_norm(self.config, "layer_norm2", **kw)(x))
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class PoolingHead(nn.Module):
  """A learned probe attends to the tokens; then a residual MLP (HF's MAP head)."""
  config: SiglipConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, P, E] -> [B, E]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    probe = self.param("probe", nn.with_logical_partitioning(_POSITION_INIT, (None, "embed")),
                       (1, self.config.hidden_size), self.param_dtype)
    attention = _attention(self.config, "attention", **kw)
    probe = jnp.broadcast_to(probe.astype(self.dtype), (x.shape[0],) + probe.shape)
    h = attention(probe, attention.key_value(x))  # [B, 1, E]
    h = h + MLP(self.config, name="mlp", **kw)(_layer_norm(self.config, "layernorm", **kw)(h))
    return h[:, 0]


class SiglipVisionModel(nn.Module):
  """The tower; `__call__(pixels [B, S, S, C])` -> dict(last_hidden_state, pooler_output)."""
  config: SiglipConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> dict[str, jax.Array | None]:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if pixels.ndim != 4 or pixels.shape[1:] != (c.image_size, c.image_size, c.num_channels):
      raise ValueError(f"SiglipVisionModel: pixels must be [B, {c.image_size}, {c.image_size}, "
                       f"{c.num_channels}] (channels last, image_size); got {pixels.shape}.")
    patches = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=c.patch_size,
                      padding="VALID", name="patch_embedding",
                      kernel_init=nn.with_logical_partitioning(
                          nn.initializers.lecun_normal(), (None, None, None, "embed")),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                      **kw)(pixels.astype(self.dtype))
    x = patches.reshape(patches.shape[0], -1, c.hidden_size)  # [B, P, E], row-major as HF.
    positions = self.param("position_embedding",
                           nn.with_logical_partitioning(_POSITION_INIT, ("length", "embed")),
                           (c.num_patches, c.hidden_size), self.param_dtype)
    x = nn.with_logical_constraint(x + positions.astype(self.dtype), ("batch", "length", "embed"))
    for i in range(c.num_hidden_layers):
      x = EncoderLayer(c, name=f"layers_{i}", **kw)(x)
    x = _layer_norm(c, "post_layernorm", **kw)(x)
    pooled = PoolingHead(c, name="head", **kw)(x) if c.use_head else None
    return dict(last_hidden_state=x, pooler_output=pooled)


def siglip_flops(config: SiglipConfig, batch: int) -> int:
  """Forward matmul FLOPs (2 m n k) of the tower on `batch` images (head excluded)."""
  c, p = config, config.num_patches
  e = c.hidden_size
  per_layer = p * (4 * e * e + 2 * e * c.intermediate_size) + 2 * p * p * e
  patch = p * c.num_channels * c.patch_size ** 2 * e
  return 2 * batch * (patch + c.num_hidden_layers * per_layer)


# ---------------------------------------------------------------------------------------------
# Loading HF `SiglipVisionModel` safetensors.


def load_config(directory: str | pathlib.Path) -> SiglipConfig:
  path = pathlib.Path(directory) / hf_loading.CONFIG_FILE
  if not path.exists():
    raise hf_loading.CheckpointError(
        f"{path} does not exist; point at a Hugging Face SigLIP checkpoint directory.")
  return SiglipConfig.from_hf(json.loads(path.read_text()))


def hf_weight_shapes(config: SiglipConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name (without prefix) -> its torch shape, for every tensor of the tower."""
  c, e, m = config, config.hidden_size, config.intermediate_size
  shapes = {
      "embeddings.patch_embedding.weight": (e, c.num_channels, c.patch_size, c.patch_size),
      "embeddings.patch_embedding.bias": (e,),
      "embeddings.position_embedding.weight": (c.num_patches, e),
      "post_layernorm.weight": (e,), "post_layernorm.bias": (e,)}

  def mlp(prefix):
    shapes.update({f"{prefix}fc1.weight": (m, e), f"{prefix}fc1.bias": (m,),
                   f"{prefix}fc2.weight": (e, m), f"{prefix}fc2.bias": (e,)})

  for i in range(c.num_hidden_layers):
    p = f"encoder.layers.{i}."
    for norm in ("layer_norm1", "layer_norm2"):
      shapes.update({f"{p}{norm}.weight": (e,), f"{p}{norm}.bias": (e,)})
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      shapes.update({f"{p}self_attn.{proj}.weight": (e, e), f"{p}self_attn.{proj}.bias": (e,)})
    mlp(p + "mlp.")
  if c.use_head:
    shapes.update({"head.probe": (1, 1, e), "head.attention.in_proj_weight": (3 * e, e),
                   "head.attention.in_proj_bias": (3 * e,),
                   "head.attention.out_proj.weight": (e, e), "head.attention.out_proj.bias": (e,),
                   "head.layernorm.weight": (e,), "head.layernorm.bias": (e,)})
    mlp("head.mlp.")
  return shapes


def params_from_hf(get: Callable[[str], np.ndarray], config: SiglipConfig) -> dict[str, Any]:
  """The `SiglipVisionModel` param tree from HF tensors (`get(name)`: torch layout, names
  without the `vision_model.` prefix). Shapes are checked by the caller (`hf_weight_shapes`)."""
  c = config
  heads, d, e = c.num_attention_heads, c.head_dim, c.hidden_size

  def linear(name):
    return {"kernel": get(name + ".weight").T, "bias": get(name + ".bias")}

  def norm(name):
    return {"scale": get(name + ".weight"), "bias": get(name + ".bias")}

  def attention(q, k, v, out):
    """Torch [out, in] weights -> the heads-split kernels of `dit.Attention`."""
    split = lambda w, b: {"kernel": w.T.reshape(e, heads, d), "bias": b.reshape(heads, d)}
    return {"query": split(*q), "key": split(*k), "value": split(*v),
            "out": {"kernel": out[0].T.reshape(heads, d, e), "bias": out[1]}}

  def mlp(prefix):
    return {"fc1": linear(prefix + "fc1"), "fc2": linear(prefix + "fc2")}

  conv = get("embeddings.patch_embedding.weight")  # [E, C, p, p] -> [p, p, C, E]
  params = {
      "patch_embedding": {"kernel": conv.transpose(2, 3, 1, 0),
                          "bias": get("embeddings.patch_embedding.bias")},
      "position_embedding": get("embeddings.position_embedding.weight"),
      "post_layernorm": norm("post_layernorm")}
  for i in range(c.num_hidden_layers):
    p = f"encoder.layers.{i}."
    pair = lambda proj: (get(f"{p}self_attn.{proj}.weight"), get(f"{p}self_attn.{proj}.bias"))
    params[f"layers_{i}"] = {
        "layer_norm1": norm(p + "layer_norm1"), "layer_norm2": norm(p + "layer_norm2"),
        "self_attn": attention(pair("q_proj"), pair("k_proj"), pair("v_proj"), pair("out_proj")),
        "mlp": mlp(p + "mlp.")}
  if c.use_head:
    w, b = get("head.attention.in_proj_weight"), get("head.attention.in_proj_bias")
    params["head"] = {
        "probe": get("head.probe").reshape(1, e),
        "attention": attention((w[:e], b[:e]), (w[e:2 * e], b[e:2 * e]), (w[2 * e:], b[2 * e:]),
                               (get("head.attention.out_proj.weight"),
                                get("head.attention.out_proj.bias"))),
        "layernorm": norm("head.layernorm"), "mlp": mlp("head.mlp.")}
  return params


def load_params(directory: str | pathlib.Path, config: SiglipConfig | None = None, *,
                param_dtype: Any = jnp.float32) -> dict[str, Any]:
  """Reads a `SiglipVisionModel.save_pretrained` directory into the tower's `params`.

  Raises:
    hf_loading.CheckpointError: a missing or unexpected tensor, or a shape mismatch (the message
      names the HF tensor and both shapes).
  """
  directory = pathlib.Path(directory)
  config = load_config(directory) if config is None else config
  reader = hf_loading.SafetensorsReader(directory)
  keys = reader.keys()
  prefix = "vision_model." if any(k.startswith("vision_model.") for k in keys) else ""
  shapes = hf_weight_shapes(config)

  def get(name: str) -> np.ndarray:
    key = prefix + name
    if key not in reader:
      raise hf_loading.CheckpointError(
          f"Checkpoint {directory} is missing tensor {key!r} (expected shape {shapes[name]}). Is "
          "it a SiglipVisionModel checkpoint matching config.json?")
    if reader.shape(key) != shapes[name]:
      raise hf_loading.CheckpointError(
          f"Shape mismatch for {key!r}: the checkpoint has {reader.shape(key)} but the model "
          f"expects {shapes[name]}. The checkpoint and config.json disagree.")
    return np.asarray(reader.get(key), np.float32)

  params = params_from_hf(get, config)
  expected = {prefix + name for name in shapes}
  unexpected = [k for k in keys if k not in expected and not k.endswith("position_ids")]
  if unexpected:
    raise hf_loading.CheckpointError(
        f"Checkpoint {directory} has {len(unexpected)} tensor(s) the SigLIP tower does not use, "
        f"e.g. {unexpected[:5]}; is it a SiglipVisionModel checkpoint (vision_use_head="
        f"{config.use_head})?")
  return jax.tree.map(lambda x: jnp.asarray(x, param_dtype), params)
