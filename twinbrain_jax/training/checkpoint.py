"""Orbax checkpoints of a training run: one composite checkpoint per saved step.

    <checkpoint dir>/<step>/
        state/        the `TrainState` (sharded arrays, restored onto any mesh)
        data/         the grain iterator state, one JSON per process
        norm_stats/   dataset name -> norm stats JSON (the policy un-normalises with these)
        config/       the resolved config JSON

Saves are asynchronous: orbax copies the arrays to host memory, returns, and writes in the
background into a temporary directory that is renamed only once complete, so a crash during a
save leaves the previous checkpoints untouched and `latest_step()` never returns a partial one.
Retention: the last `checkpoint.keep_last` steps, plus every step divisible by
`checkpoint.keep_every`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import grain
import ml_collections
import orbax.checkpoint as ocp

from twinbrain_jax.config_lib import ConfigError

# Config blocks that must match for a checkpoint's state to fit the model being built.
COMPATIBLE_BLOCKS = ("model",)


class IncompatibleCheckpointError(ConfigError):
  """A checkpoint written for another model configuration."""


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The resolved config as plain JSON data (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def make_manager(directory: str, checkpoint_config: ml_collections.ConfigDict
                 ) -> ocp.CheckpointManager:
  """A `CheckpointManager` for `directory` (created if missing)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(checkpoint_config.keep_last),
      keep_period=checkpoint_config.keep_every or None,
      create=True,
      enable_async_checkpointing=bool(checkpoint_config.async_save))
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, *,
         data_iterator: grain.DatasetIterator | None, norm_stats: Mapping[str, Any],
         config: Mapping[str, Any], force: bool = False) -> bool:
  """Starts an (async) save of the composite checkpoint at `step`; returns whether it saved."""
  items = dict(state=ocp.args.StandardSave(state), norm_stats=ocp.args.JsonSave(dict(norm_stats)),
               config=ocp.args.JsonSave(dict(config)))
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
  """Raises `IncompatibleCheckpointError` naming the first differing field of the model."""

  def first_difference(a, b, path):
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
          return f"{path}.{key}", a.get(key, "<absent>"), b.get(key, "<absent>")
        found = first_difference(a[key], b[key], f"{path}.{key}")
        if found:
          return found
      return None
    return None if a == b else (path, a, b)

  for block in COMPATIBLE_BLOCKS:
    found = first_difference(saved.get(block, {}), current.get(block, {}), block)
    if found:
      field, old, new = found
      raise IncompatibleCheckpointError(
          f"The checkpoint {where} was written for another model: config.{field} is {old!r} "
          f"there but {new!r} now. Resume with the config it was trained with, or use another "
          "--workdir / checkpoint.dir.")


def read_metadata(manager: ocp.CheckpointManager, step: int) -> tuple[dict, dict]:
  """(config JSON, norm stats JSON) of the checkpoint at `step`."""
  restored = manager.restore(step, args=ocp.args.Composite(
      config=ocp.args.JsonRestore(), norm_stats=ocp.args.JsonRestore()))
  return dict(restored["config"]), dict(restored["norm_stats"])


def restore(manager: ocp.CheckpointManager, abstract_state: Any, *,
            data_iterator: grain.DatasetIterator | None, config: Mapping[str, Any],
            step: int | None = None) -> tuple[int, Any, dict]:
  """Restores the latest (or `step`'s) checkpoint onto the shardings of `abstract_state`.

  The state lands on whatever mesh `abstract_state`'s shardings name (it may differ from the
  mesh that wrote it). `data_iterator` is set to the saved position.

  Returns:
    (step, state, norm stats JSON).

  Raises:
    FileNotFoundError: no complete checkpoint.
    IncompatibleCheckpointError: the checkpoint's model config differs from `config`'s.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No complete checkpoint in {manager.directory}.")
  where = os.path.join(str(manager.directory), str(step))
  saved_config, norm_stats = read_metadata(manager, step)
  check_compatible(saved_config, config, where)
  items = dict(state=ocp.args.StandardRestore(abstract_state))
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError) as err:
    raise IncompatibleCheckpointError(
        f"The train state in {where} does not fit the model being built ({err}). Resume with "
        "the config it was trained with.") from err
  return step, restored["state"], norm_stats
