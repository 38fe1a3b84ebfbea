"""Inference bundles: what a policy needs, and nothing of training.

    <bundle>/
        params/            orbax checkpoint of the full `params` collection in one dtype
        config.json        the resolved config (model, inputs, flow, data blocks; `serving`:
                           the observation format clients use, when one was chosen)
        norm_stats.json    dataset name -> norm stats (un-normalise the sampled actions)
        tokenizer/         the tokenizer files
        lerobot_meta/<i>/meta/info.json
                           the schema of LeRobot entry i of `data.datasets` (widths of its state
                           and actions), so the bundle loads where the data is not

`load_bundle` imports only the model, the tokenizer and orbax (no optimizer, no data pipeline),
so a serving process can load a bundle without the training stack.

A run with low-rank adapters (`model.lora.rank > 0`) is exported with its adapters folded into
the right brain's kernels (`W + alpha / rank * A B`, in float32 before the cast to the bundle's
dtype), and the bundle's config says `model.lora.rank = 0` (the run's adapters are kept under
`export.merged_lora`): `Policy` and the server load it as any other bundle. `merge_lora=False`
keeps the adapters as separate params instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from twinbrain_jax.models import families
from twinbrain_jax.models.layers import KERNEL_SCALE
from twinbrain_jax.models.tokenizer import QwenTokenizer
from twinbrain_jax.models.twinbrain import merged_adapter_params

PARAMS_DIR, CONFIG_FILE, NORM_STATS_FILE, TOKENIZER_DIR = (
    "params", "config.json", "norm_stats.json", "tokenizer")
LEROBOT_META_DIR = "lerobot_meta"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def export_bundle(params: Mapping[str, Any], config: Mapping[str, Any],
                  norm_stats: Mapping[str, Any], tokenizer_dir: str | os.PathLike,
                  out_dir: str | os.PathLike, dtype: str = "bfloat16",
                  obs_format: str | None = None, merge_lora: bool = True) -> pathlib.Path:
  """Writes an inference bundle.

  Args:
    params: the model's full `params` collection (`TrainState.all_params()`), any sharding.
    config: the resolved config as JSON data (`checkpoint.config_to_json`).
    norm_stats: dataset name -> norm stats JSON (from the checkpoint).
    tokenizer_dir: a directory holding `tokenizer.json` (every file in it is copied).
    dtype: storage dtype of every floating-point parameter ("float32", "bfloat16", "float16");
      int8 kernels of a quantized left brain and their float32 scales are kept as they are.
    obs_format: recorded as `serving.obs_format`: the observation layout `scripts/serve.py`
      serves by default (a name of `serving.formats.FORMATS`).
    merge_lora: fold low-rank adapters into the kernels (the bundle has none).
  """
  if dtype not in _DTYPES:
    raise ValueError(f"Unknown export dtype {dtype!r}; choose one of {sorted(_DTYPES)}.")
  import orbax.checkpoint as ocp

  out = pathlib.Path(out_dir).absolute()
  if out.exists():
    raise FileExistsError(f"{out} exists; export into a new directory.")
  source = pathlib.Path(tokenizer_dir)
  if not (source / "tokenizer.json").exists():
    raise FileNotFoundError(f"{source} has no tokenizer.json; pass the run's tokenizer dir.")
  schemas = _lerobot_schemas(config)  # Before anything is written: the data must be readable.
  config = dict(config)
  if merge_lora:
    params, config = _merged_lora(params, config)
  out.mkdir(parents=True)
  cast = jax.tree_util.tree_map_with_path(
      lambda path, x: x if _kept_dtype(path, x) else jnp.asarray(x, _DTYPES[dtype]), dict(params))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(out / PARAMS_DIR, cast)
    checkpointer.wait_until_finished()
  config["export"] = dict(config.get("export") or {}, dtype=dtype)
  if obs_format is not None:
    config["serving"] = dict(config.get("serving") or {}, obs_format=obs_format)
  (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))
  (out / NORM_STATS_FILE).write_text(json.dumps(dict(norm_stats)))
  shutil.copytree(source, out / TOKENIZER_DIR)
  for index, info in schemas.items():
    (out / LEROBOT_META_DIR / str(index) / info.parent.name).mkdir(parents=True)
    shutil.copy(info, out / LEROBOT_META_DIR / str(index) / info.parent.name / info.name)
  return out


def _kept_dtype(path: Any, leaf: Any) -> bool:
  """Int8 kernels and their scales keep their dtypes in a bundle."""
  return (not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating)
          or getattr(path[-1], "key", None) == KERNEL_SCALE)


def _merged_lora(params: Mapping[str, Any], config: Mapping[str, Any]
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(params, config) of the same model without adapters when the run had any."""
  lora = dict(config.get("model", {}).get("lora") or {})
  if families.family(config) != "twinbrain" or not lora.get("rank"):
    return dict(params), dict(config)
  model_config = families.model_config(ml_collections.ConfigDict(dict(config)))
  params = merged_adapter_params(model_config, params)
  config = json.loads(json.dumps(config))  # A deep copy: the caller's config is left as it was.
  config["model"]["lora"]["rank"] = 0
  config["export"] = dict(config.get("export") or {}, merged_lora=lora)
  return params, config


def _lerobot_schemas(config: Mapping[str, Any]) -> dict[int, pathlib.Path]:
  """Index in `data.datasets` -> the `meta/info.json` of every LeRobot entry whose schema comes
  from its data (not from a registry `spec`)."""
  from twinbrain_jax.data import config as data_config
  from twinbrain_jax.data import lerobot

  data = ml_collections.ConfigDict(config["data"])
  schemas = {}
  for index, (raw, entry) in enumerate(zip(data.datasets, data_config.dataset_entries(data))):
    if entry.format == "lerobot" and not (isinstance(raw, Mapping) and raw.get("spec")):
      schemas[index] = pathlib.Path(entry.directory(data.get("data_dir"))) / lerobot.INFO_FILE
  return schemas


def _with_bundled_schemas(config: ml_collections.ConfigDict, directory: pathlib.Path) -> None:
  """Points the LeRobot entries of `config.data.datasets` at the schemas the bundle holds."""
  if not (directory / LEROBOT_META_DIR).is_dir():
    return
  datasets = list(config.data.datasets)
  for schema in (directory / LEROBOT_META_DIR).iterdir():
    index = int(schema.name)
    datasets[index] = dict(datasets[index], dir=str(schema))
  config.data.datasets = datasets


@dataclasses.dataclass
class Bundle:
  """A loaded bundle: `sample_actions(bundle.model, bundle.params, obs, ...)` runs the policy
  (TwinBrain; Libra: `libra.plan` and `libra.refine`)."""
  model: families.Model
  params: dict[str, Any]
  config: ml_collections.ConfigDict
  norm_stats: dict[str, Any]
  tokenizer: QwenTokenizer


def _with_stored_layout(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A TwinBrain config written before layers were scanned has no `model.scan_layers`: its
  params are unrolled. Returns `config.model`."""
  if families.family(config) == "twinbrain" and "scan_layers" not in config.model:
    config.model.scan_layers = False
  return config.model


def load_bundle(directory: str | os.PathLike, compute_dtype: str | None = None) -> Bundle:
  """Loads a bundle written by `export_bundle` onto the default device.

  Args:
    compute_dtype: the model's compute dtype; default the config's.
  """
  import orbax.checkpoint as ocp

  directory = pathlib.Path(directory).absolute()
  for name in (PARAMS_DIR, CONFIG_FILE, NORM_STATS_FILE, TOKENIZER_DIR):
    if not (directory / name).exists():
      raise FileNotFoundError(f"{directory} is not an inference bundle: {name} is missing. "
                              "Write one with scripts/export.py.")
  config = ml_collections.ConfigDict(json.loads((directory / CONFIG_FILE).read_text()))
  _with_bundled_schemas(config, directory)
  model_block = _with_stored_layout(config)
  stored = config.export.dtype
  model_block.param_dtype = stored
  if "left_param_dtype" in model_block:
    model_block.left_param_dtype = stored
  if compute_dtype is not None:
    model_block.dtype = compute_dtype
  model = families.build_model(families.model_config(config))
  with ocp.StandardCheckpointer() as checkpointer:
    # Onto the default device, whatever mesh wrote the bundle (its sharding metadata names
    # devices this host may not have).
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          checkpointer.metadata(directory / PARAMS_DIR).item_metadata)
    params = checkpointer.restore(directory / PARAMS_DIR, target)
  params = jax.tree.map(jnp.asarray, params)
  norm_stats = json.loads((directory / NORM_STATS_FILE).read_text())
  return Bundle(model=model, params=params, config=config, norm_stats=norm_stats,
                tokenizer=QwenTokenizer.from_file(directory / TOKENIZER_DIR))


def unnormalize_actions(bundle: Bundle, actions: np.ndarray, dataset: str) -> np.ndarray:
  """Model actions `[..., A]` in [-1, 1] -> raw actions of `dataset` with the bundle's stats."""
  from twinbrain_jax.data import config as data_config
  from twinbrain_jax.data import normalization

  if dataset not in bundle.norm_stats:
    raise KeyError(f"The bundle has no norm stats for {dataset!r}; it has "
                   f"{sorted(bundle.norm_stats)}.")
  # The run's dataset entries say which registry schema (masks, widths) the name stands for.
  spec = data_config.dataset_spec(bundle.config.data, dataset)
  stats = normalization.ArrayStats.from_json(bundle.norm_stats[dataset]["action"])
  return normalization.unnormalize(np.asarray(actions)[..., :spec.action_dim], stats,
                                   spec.action_normalize_mask, spec.action_binarize_mask)


def restore_checkpoint(checkpoint_dir: str | os.PathLike, step: int | None = None
                       ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  """The full `params` collection, config JSON and norm stats of the latest whole (or `step`'s)
  checkpoint of a training run (`checkpoint.DamagedCheckpointError` if that step is damaged).

  The params are restored onto all local devices (`data` mesh axis) whatever mesh wrote them,
  in their training dtypes.
  """
  # The training stack is needed to read a train state, not to load a bundle.
  from twinbrain_jax import sharding as sharding_lib
  from twinbrain_jax.training import checkpoint as checkpoint_lib
  from twinbrain_jax.training import optimizer as optimizer_lib
  from twinbrain_jax.training import state as state_lib

  checkpoint_config = ml_collections.ConfigDict(dict(keep_last=1000, keep_every=None,
                                                     async_save=False))
  # The latest *whole* step: a damaged newer one is skipped with a warning.
  step = checkpoint_lib.latest_whole_step(checkpoint_dir) if step is None else step
  manager = checkpoint_lib.make_manager(str(checkpoint_dir), checkpoint_config)
  config_json, norm_stats = checkpoint_lib.read_metadata(manager, step)
  config = ml_collections.ConfigDict(config_json)
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.logical_axis_rules(config.logical_axis_rules, mesh)
  _with_stored_layout(config)
  model = families.build_model(families.model_config(config))
  tx = optimizer_lib.make_optimizer(config.train,
                                    families.TRAINABLE_GROUPS[families.family(config)])
  abstract, _ = state_lib.abstract_state(model, tx, mesh, rules, config.seed)
  _, state, _ = checkpoint_lib.restore(manager, abstract, data_iterator=None,
                                       config=config_json, step=step)
  manager.close()
  return state.all_params(), config_json, norm_stats


def _run_tokenizer_dir(config_json: Mapping[str, Any],
                       tokenizer_dir: str | os.PathLike | None) -> str | os.PathLike:
  init = config_json.get("init", {})
  tokenizer_dir = tokenizer_dir or init.get("tokenizer") or init.get("hf_checkpoint")
  if not tokenizer_dir:
    raise ValueError("The run's config names no tokenizer dir; pass tokenizer_dir.")
  return tokenizer_dir


def export_checkpoint(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike,
                      dtype: str = "bfloat16", step: int | None = None,
                      tokenizer_dir: str | os.PathLike | None = None,
                      obs_format: str | None = None, merge_lora: bool = True) -> pathlib.Path:
  """Exports the latest (or `step`'s) checkpoint of a training run as an inference bundle.

  The config and norm stats come from the checkpoint itself; the tokenizer from
  `tokenizer_dir` or the run's `init.tokenizer` / `init.hf_checkpoint`.
  """
  params, config_json, norm_stats = restore_checkpoint(checkpoint_dir, step)
  return export_bundle(params, config_json, norm_stats,
                       _run_tokenizer_dir(config_json, tokenizer_dir), out_dir, dtype, obs_format,
                       merge_lora)


def bundle_from_checkpoint(checkpoint_dir: str | os.PathLike, step: int | None = None,
                           tokenizer_dir: str | os.PathLike | None = None,
                           compute_dtype: str | None = None) -> Bundle:
  """What `load_bundle` returns, read straight from a training checkpoint (no export step):
  params in their training dtypes on the default device."""
  params, config_json, norm_stats = restore_checkpoint(checkpoint_dir, step)
  config = ml_collections.ConfigDict(config_json)
  _with_stored_layout(config)
  if compute_dtype is not None:
    config.model.dtype = compute_dtype
  tokenizer = QwenTokenizer.from_file(_run_tokenizer_dir(config_json, tokenizer_dir))
  params = jax.device_put(jax.device_get(params))  # Off the mesh, onto one device.
  return Bundle(model=families.build_model(families.model_config(config)),
                params=params, config=config, norm_stats=norm_stats, tokenizer=tokenizer)


def load_bundle_or_checkpoint(path: str | os.PathLike, step: int | None = None,
                              tokenizer_dir: str | os.PathLike | None = None,
                              compute_dtype: str | None = None) -> Bundle:
  """An exported bundle (it has `config.json`) or a training run's checkpoint dir (the latest or
  `step`'s whole checkpoint), as a `Bundle`."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"{path} is not a directory; pass an exported bundle or a "
                            "training run's checkpoint dir.")
  if (path / CONFIG_FILE).exists():
    return load_bundle(path, compute_dtype)
  try:
    return bundle_from_checkpoint(path, step, tokenizer_dir, compute_dtype)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{path} is neither an inference bundle (it has no {CONFIG_FILE}) "
                            f"nor a training checkpoint dir: {e}") from e
