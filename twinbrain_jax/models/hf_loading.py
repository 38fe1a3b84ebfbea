"""Loads a local Hugging Face Qwen2.5-VL or Qwen3-VL checkpoint directory into parameters.

    config = load_config(path)              # config.json -> Qwen25VLConfig or Qwen3VLConfig
    params = load_params(path, config, param_dtype=jnp.bfloat16, mesh=mesh, rules=rules)
    model = backbones.model_class(config)(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    out = model.apply({"params": params}, input_ids, attention_mask, pixel_values, grid)

The family comes from `config.json`'s `model_type` (`qwen2_5_vl`, `qwen3_vl`; see
`models/backbones.py`).

Handles `model.safetensors` or shards listed in `model.safetensors.index.json`, the old key
layout (`model.layers.*`, `visual.*`) and the new one (`model.language_model.*`,
`model.visual.*`), and bf16 files (read with `ml_dtypes`, which numpy alone cannot).

Tensors are memory-mapped and each parameter goes straight to its final sharding with
`jax.make_array_from_callback`: every device (and every host) copies only its own slice, one
parameter at a time, so the model never sits whole on one device.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from twinbrain_jax import sharding as sharding_lib
from twinbrain_jax.models import backbones, qwen3vl, qwen25vl

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
# Buffers some exporters write that are not parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
  """A checkpoint directory that does not match the model it is loaded into."""


# ---------------------------------------------------------------------------------------------
# Reading safetensors lazily.


def _read_header(path: pathlib.Path) -> tuple[dict[str, Any], int]:
  """The JSON header of a .safetensors file and the byte offset where tensor data starts."""
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) != 8:
      raise CheckpointError(f"{path} is not a safetensors file (shorter than 8 bytes).")
    (header_len,) = struct.unpack("<Q", prefix)
    header = json.loads(f.read(header_len))
  header.pop("__metadata__", None)
  return header, 8 + header_len


class SafetensorsReader:
  """Lazy access to the tensors of a checkpoint directory (single file or sharded)."""

  def __init__(self, directory: str | os.PathLike):
    self.directory = pathlib.Path(directory)
    if not self.directory.is_dir():
      raise CheckpointError(f"Checkpoint directory {self.directory} does not exist.")
    index_path = self.directory / INDEX_FILE
    if index_path.exists():
      weight_map = json.loads(index_path.read_text()).get("weight_map")
      if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path} has no `weight_map`; is it a safetensors index?")
      files = sorted(set(weight_map.values()))
    elif (self.directory / SINGLE_FILE).exists():
      files = [SINGLE_FILE]
    else:
      raise CheckpointError(
          f"No weights in {self.directory}: expected {SINGLE_FILE} or {INDEX_FILE} with its "
          "shards (a Hugging Face `save_pretrained` directory with safetensors).")
    self._entries: dict[str, tuple[pathlib.Path, dict[str, Any], int]] = {}
    for name in files:
      path = self.directory / name
      if not path.exists():
        raise CheckpointError(f"Shard {name} listed in {INDEX_FILE} is missing from "
                              f"{self.directory}; re-download the checkpoint.")
      header, data_start = _read_header(path)
      for key, info in header.items():
        self._entries[key] = (path, info, data_start)

  def keys(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, key: str) -> bool:
    return key in self._entries

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._entries[key][1]["shape"])

  def get(self, key: str) -> np.ndarray:
    """The tensor `key` as a read-only memory-mapped numpy array (no copy)."""
    if key not in self._entries:
      raise CheckpointError(f"Checkpoint {self.directory} has no tensor {key!r}.")
    path, info, data_start = self._entries[key]
    dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
      raise CheckpointError(f"Tensor {key!r} in {path} has unsupported dtype {info['dtype']}.")
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if begin == end:
      return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


def load_config(directory: str | os.PathLike) -> backbones.BackboneConfig:
  """`config.json` of a checkpoint directory -> `Qwen25VLConfig` or `Qwen3VLConfig`."""
  path = pathlib.Path(directory) / CONFIG_FILE
  if not path.exists():
    raise CheckpointError(f"{path} does not exist; point at a Hugging Face checkpoint directory "
                          "(it holds config.json and the safetensors weights).")
  try:
    return backbones.config_from_hf(json.loads(path.read_text()))
  except ValueError as err:
    raise CheckpointError(f"{path}: {err}") from err


def hf_config_kwargs(config: backbones.BackboneConfig) -> dict[str, Any]:
  """Keyword arguments of `transformers.Qwen2_5_VLConfig` (or `Qwen3VLConfig`) describing the
  same model.

  The inverse of `Qwen25VLConfig.from_hf`; benchmarks and tests use it to build the reference
  PyTorch model of a preset.
  """
  if config.family == qwen3vl.FAMILY:
    return qwen3vl.hf_config_kwargs(config)
  t, v = config.text, config.vision
  text = dict(
      vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
      num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
      num_key_value_heads=t.num_key_value_heads, hidden_act=t.hidden_act,
      max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
      rope_parameters=dict(rope_type="default", rope_theta=float(t.rope_theta),
                           mrope_section=list(t.mrope_section)),
      tie_word_embeddings=t.tie_word_embeddings, bos_token_id=None, eos_token_id=None)
  vision = dict(
      depth=v.depth, hidden_size=v.hidden_size, hidden_act=v.hidden_act,
      intermediate_size=v.intermediate_size, num_heads=v.num_heads, in_channels=v.in_channels,
      patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size,
      temporal_patch_size=v.temporal_patch_size, window_size=v.window_size,
      out_hidden_size=v.out_hidden_size, fullatt_block_indexes=list(v.fullatt_block_indexes))
  return dict(text_config=text, vision_config=vision, tie_word_embeddings=t.tie_word_embeddings,
              **{k: getattr(config, k) for k in qwen25vl._TOKEN_ID_FIELDS})


# ---------------------------------------------------------------------------------------------
# Name mapping.


def key_prefixes(keys: list[str]) -> tuple[str, str]:
  """(text prefix, vision prefix) of a checkpoint's key layout."""
  if any(k.startswith("model.language_model.") for k in keys):
    return "model.language_model.", "model.visual."
  if any(k.startswith("model.layers.") or k.startswith("model.embed_tokens.") for k in keys):
    return "model.", "visual."
  raise CheckpointError(
      "The checkpoint has neither `model.layers.*` nor `model.language_model.*` keys; it is not "
      f"a Qwen2.5-VL / Qwen3-VL checkpoint (first keys: {keys[:5]}).")


class TensorSource(NamedTuple):
  """Where a parameter comes from: an HF tensor, its shape there, torch -> flax layout."""
  name: str
  shape: tuple[int, ...]
  transform: Callable[[np.ndarray], np.ndarray]


def text_key_map(config: qwen25vl.TextConfig | qwen3vl.TextConfig
                 ) -> dict[tuple[str, ...], TensorSource]:
  """Flax path (under `model/`, or `lm_head`) -> its `TensorSource`.

  Torch `Linear` weights are [out, in]; flax kernels are [in, out] with the head axes split
  out ([E, H, D] for q/k/v, [Hq, D, E] for o). HF names are relative to the text prefix, except
  `lm_head` (absolute, marked by a leading '/'). Qwen2.5's q/k/v have biases; Qwen3's have none
  but norm each q and k head (`q_norm`, `k_norm`).
  """
  c = config
  qwen3 = isinstance(c, qwen3vl.TextConfig)
  hq, hkv, d, e = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
  mlp, vocab = c.intermediate_size, c.vocab_size
  identity = lambda x: x
  transpose = lambda x: x.T
  in_proj = lambda heads: (lambda w: w.T.reshape(e, heads, d))
  in_bias = lambda heads: (lambda b: b.reshape(heads, d))
  out = {
      ("model", "embed_tokens", "embedding"): TensorSource(
          "embed_tokens.weight", (vocab, e), identity),
      ("model", "norm", "scale"): TensorSource("norm.weight", (e,), identity),
  }
  for i in range(c.num_hidden_layers):
    p, hf = ("model", f"layers_{i}"), f"layers.{i}."
    for norm in ("input_layernorm", "post_attention_layernorm"):
      out[(*p, norm, "scale")] = TensorSource(f"{hf}{norm}.weight", (e,), identity)
    for proj, heads in (("q_proj", hq), ("k_proj", hkv), ("v_proj", hkv)):
      out[(*p, "self_attn", proj, "kernel")] = TensorSource(
          f"{hf}self_attn.{proj}.weight", (heads * d, e), in_proj(heads))
      if not qwen3:
        out[(*p, "self_attn", proj, "bias")] = TensorSource(
            f"{hf}self_attn.{proj}.bias", (heads * d,), in_bias(heads))
    if qwen3:
      for norm in ("q_norm", "k_norm"):
        out[(*p, "self_attn", norm, "scale")] = TensorSource(
            f"{hf}self_attn.{norm}.weight", (d,), identity)
    out[(*p, "self_attn", "o_proj", "kernel")] = TensorSource(
        f"{hf}self_attn.o_proj.weight", (e, hq * d), lambda w: w.T.reshape(hq, d, e))
    for proj, shape in (("gate_proj", (mlp, e)), ("up_proj", (mlp, e)), ("down_proj", (e, mlp))):
      out[(*p, "mlp", proj, "kernel")] = TensorSource(f"{hf}mlp.{proj}.weight", shape, transpose)
  if not c.tie_word_embeddings:
    out[("lm_head", "kernel")] = TensorSource("/lm_head.weight", (vocab, e), transpose)
  return out


def _path_names(path) -> tuple[str, ...]:
  return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def _shape_error(key: str, got: tuple[int, ...], want: tuple[int, ...]) -> CheckpointError:
  return CheckpointError(
      f"Shape mismatch for {key!r}: the checkpoint has {got} but the model expects {want}. "
      "The checkpoint and config.json (or the config passed in) disagree.")


# ---------------------------------------------------------------------------------------------
# Loading.


def abstract_params(config: backbones.BackboneConfig, param_dtype: Any = jnp.float32,
                    scan_layers: bool = True) -> Any:
  """Logically annotated `jax.ShapeDtypeStruct` tree of the model's parameters (no memory)."""
  model = backbones.model_class(config)(config, dtype=param_dtype, param_dtype=param_dtype,
                                        scan_layers=scan_layers)
  return jax.eval_shape(functools.partial(qwen25vl.init_params, model), jax.random.key(0))


def _abstract_and_shardings(config: backbones.BackboneConfig, param_dtype: Any, mesh: Mesh | None,
                            rules: sharding_lib.LogicalRules | None, caller: str,
                            scan_layers: bool = True) -> tuple[Any, Any]:
  """(unboxed abstract params, their shardings): by `rules` over `mesh`, or on one device."""
  abstract = abstract_params(config, param_dtype, scan_layers)
  if mesh is not None:
    if rules is None:
      raise ValueError(f"{caller}(mesh=...) needs the logical axis rules too (rules=...).")
    return nn.unbox(abstract), sharding_lib.logical_shardings(abstract, mesh, rules)
  device = jax.local_devices()[0]
  abstract = nn.unbox(abstract)
  return abstract, jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), abstract)


def load_params(directory: str | os.PathLike, config: backbones.BackboneConfig | None = None, *,
                param_dtype: Any = jnp.float32, mesh: Mesh | None = None,
                rules: sharding_lib.LogicalRules | None = None,
                scan_layers: bool = True) -> dict[str, Any]:
  """Reads a checkpoint into the (unboxed) parameter tree of `Qwen25VL(config)` / `Qwen3VL`.

  Args:
    directory: a Hugging Face checkpoint directory (config.json + safetensors).
    config: the model config; read from `config.json` when None.
    param_dtype: dtype of the returned parameters (e.g. jnp.float32 or jnp.bfloat16).
    mesh, rules: when given, every parameter is created directly with the `NamedSharding` its
      logical axes map to under `rules`; otherwise on the default device.
    scan_layers: the layout of `Qwen25VL` / `Qwen3VL(scan_layers=...)`: per-layer tensors stacked on a
      leading `layers` axis (`model/layers`, `visual/blocks`), or unrolled.

  Returns:
    The `params` collection (plain nested dict of jax arrays).

  Raises:
    CheckpointError: a missing file, a missing or unexpected tensor, or a shape mismatch (the
      message names the tensor and both shapes).
  """
  directory = pathlib.Path(directory)
  config = load_config(directory) if config is None else config
  reader = SafetensorsReader(directory)
  keys = reader.keys()
  text_prefix, vision_prefix = key_prefixes(keys)

  abstract, shardings = _abstract_and_shardings(config, param_dtype, mesh, rules, "load_params",
                                                scan_layers)
  np_dtype = np.dtype(jnp.dtype(param_dtype))
  used: set[str] = set()

  def source_for(path: tuple[str, ...], text_map) -> tuple[str, np.ndarray]:
    source = text_map[path]
    key = source.name[1:] if source.name.startswith("/") else text_prefix + source.name
    if key not in reader:
      raise CheckpointError(
          f"Checkpoint {directory} is missing tensor {key!r} (for parameter "
          f"{'/'.join(path)}). Is it a {config.family} checkpoint matching config.json?")
    if reader.shape(key) != source.shape:
      raise _shape_error(key, reader.shape(key), source.shape)
    used.add(key)
    return key, source.transform(reader.get(key))

  def stacked_source_for(rest: tuple[str, ...], text_map) -> tuple[str, _StackedLayers]:
    """The per-layer tensors of `model/layers/<rest>`, each checked, read as one [L, ...]."""
    layers = [source_for(("model", f"layers_{i}", *rest), text_map)
              for i in range(config.text.num_hidden_layers)]
    return layers[0][0], _StackedLayers([layer for _, layer in layers])

  # The vision tower's tree comes from its own converter, reading through the vision prefix.
  def get_vision(name: str) -> np.ndarray:
    key = vision_prefix + name
    if key not in reader:
      raise CheckpointError(f"Checkpoint {directory} is missing tensor {key!r} of the vision "
                            f"tower. Is it a {config.family} checkpoint matching config.json?")
    used.add(key)
    return reader.get(key)

  try:
    vision_tree = backbones.family(config.family).vision_params_from_hf(
        get_vision, config.vision, scan_layers)
  except CheckpointError:
    raise
  except (KeyError, ValueError) as err:  # The converter names the tensor and both shapes.
    raise CheckpointError(f"{directory}: {err}") from err
  vision_flat = {
      _path_names(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(vision_tree)[0]}

  text_map = text_key_map(config.text)
  flat_abstract = jax.tree_util.tree_flatten_with_path(abstract)[0]
  flat_shardings = jax.tree.leaves(shardings)
  arrays = []
  for (path, leaf), sharding in zip(flat_abstract, flat_shardings):
    names = _path_names(path)
    if names[0] == "visual":
      key = vision_prefix + ".".join(names[1:])
      if names[1:] not in vision_flat:
        raise CheckpointError(f"The vision converter gave no parameter {'/'.join(names)}.")
      source = np.asarray(vision_flat[names[1:]])
    elif names in text_map:
      key, source = source_for(names, text_map)
    elif names[:2] == ("model", "layers"):
      key, source = stacked_source_for(names[2:], text_map)
    else:
      raise CheckpointError(f"No checkpoint tensor is mapped to parameter {'/'.join(names)}.")
    if tuple(source.shape) != tuple(leaf.shape):
      raise _shape_error(key, tuple(source.shape), tuple(leaf.shape))
    arrays.append(_to_device(source, leaf.shape, np_dtype, sharding))

  unexpected = [k for k in keys if k not in used and not k.endswith(_IGNORED_SUFFIXES)
                # A tied model ignores a stored copy of the embedding matrix.
                and not (k == "lm_head.weight" and config.text.tie_word_embeddings)]
  if unexpected:
    raise CheckpointError(
        f"Checkpoint {directory} has {len(unexpected)} tensor(s) the model does not use, e.g. "
        f"{unexpected[:5]}. The checkpoint and config.json disagree (layer count, tied "
        f"embeddings) or it is not a {config.family} checkpoint.")
  return jax.tree.unflatten(jax.tree.structure(abstract), arrays)


class _StackedLayers:
  """Per-layer arrays (memory-mapped or transformed) read as one `[L, ...]` array, slice by
  slice: a device's shard stacks the slices of the layers it holds, so the stack is never
  materialised whole."""

  def __init__(self, layers: list[np.ndarray]):
    shapes = {tuple(layer.shape) for layer in layers}
    if len(shapes) != 1:
      raise CheckpointError(f"Layers of one parameter have different shapes {sorted(shapes)}.")
    self.layers = layers
    self.shape = (len(layers), *shapes.pop())

  def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
    index = tuple(index) if isinstance(index, tuple) else (index,)
    first, rest = (index[0] if index else slice(None)), index[1:]
    return np.stack([np.asarray(self.layers[i][rest])
                     for i in range(len(self.layers))[first]])


def _to_device(source: np.ndarray, shape: tuple[int, ...], dtype: np.dtype,
               sharding: jax.sharding.Sharding) -> jax.Array:
  """A global array of `shape` whose shards are cut from the (memory-mapped) `source`."""
  return jax.make_array_from_callback(
      tuple(shape), sharding, lambda index: np.asarray(source[index], dtype=dtype))


def load_pretrained(directory: str | os.PathLike, *, dtype: Any = jnp.float32,
                    param_dtype: Any | None = None, mesh: Mesh | None = None,
                    rules: sharding_lib.LogicalRules | None = None, scan_layers: bool = True
                    ) -> tuple[qwen25vl.Qwen25VL | qwen3vl.Qwen3VL, dict[str, Any]]:
  """(model, params) from a checkpoint directory; `param_dtype` defaults to `dtype`."""
  config = load_config(directory)
  param_dtype = dtype if param_dtype is None else param_dtype
  params = load_params(directory, config, param_dtype=param_dtype, mesh=mesh, rules=rules,
                       scan_layers=scan_layers)
  return backbones.model_class(config)(config, dtype=dtype, param_dtype=param_dtype,
                                       scan_layers=scan_layers), params


# ---------------------------------------------------------------------------------------------
# Orbax conversion: load once from safetensors, then restore quickly (and resharded) from orbax.

ORBAX_PARAMS_DIR = "params"


def save_orbax(params: Any, directory: str | os.PathLike, hf_directory: str | os.PathLike) -> None:
  """Writes `params` as an orbax checkpoint at `directory/params` with the HF config.json."""
  import orbax.checkpoint as ocp  # Heavy import; only the converter needs it.

  directory = pathlib.Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  (directory / CONFIG_FILE).write_text((pathlib.Path(hf_directory) / CONFIG_FILE).read_text())
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / ORBAX_PARAMS_DIR, params, force=True)
    checkpointer.wait_until_finished()


def restore_orbax(directory: str | os.PathLike, *, param_dtype: Any = jnp.float32,
                  mesh: Mesh | None = None, rules: sharding_lib.LogicalRules | None = None
                  ) -> tuple[backbones.BackboneConfig, dict[str, Any]]:
  """(config, params) from a directory written by `save_orbax`, in `param_dtype`, sharded by
  `rules` over `mesh` when given."""
  import orbax.checkpoint as ocp

  directory = pathlib.Path(directory).absolute()
  config = load_config(directory)
  abstract, shardings = _abstract_and_shardings(config, param_dtype, mesh, rules, "restore_orbax")
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  path = directory / ORBAX_PARAMS_DIR
  if not path.exists():
    raise CheckpointError(f"{path} does not exist; write it with scripts/convert_hf_to_orbax.py.")
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(path, target)
  return config, params
