"""Orbax checkpoints of a training run: one composite checkpoint per saved step.

    <checkpoint dir>/
        <step>/
            state/        the `TrainState` (sharded arrays, restored onto any mesh)
            data/         the grain iterator state, one JSON per process
            norm_stats/   dataset name -> norm stats JSON (the policy un-normalises with these)
            config/       the resolved config JSON
        todelete/         steps dropped by retention, renamed here, then removed
        damaged/          damaged steps a resume moved out of the way (kept for inspection)

Saves are asynchronous: orbax copies the arrays to host memory, returns, and writes in the
background into a temporary directory that is renamed only once complete, so a crash during a
save leaves the previous checkpoints untouched and is never listed as a step. Retention (the last
`checkpoint.keep_last` steps, plus every step divisible by `checkpoint.keep_every`) renames a
dropped step into `todelete/` before removing it, so a kill while deleting never leaves a partly
deleted `<step>/` either.

A step is *whole* when it holds everything `save` writes, as orbax-checkpoint 0.12.8 lays it out:
the step metadata and commit marker, and for every item its commit marker and the files its
handler reads before any array data. `list_steps` tells which steps are whole; `restore` takes the
latest whole one (a damaged newer one is skipped with a warning) and tells a damaged step (which
step, which item) apart from one written for another model (which config field).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from twinbrain_jax.config_lib import ConfigError
from twinbrain_jax.data.pipeline import PipelineStateError

# Config blocks that must match for a checkpoint's state to fit the model being built.
COMPATIBLE_BLOCKS = ("model",)
# What orbax-checkpoint 0.12.8 writes into every finalized step and into every item of it.
STEP_METADATA, COMMIT_MARKER = "_CHECKPOINT_METADATA", "commit_success.txt"
ITEMS = ("state", "data", "norm_stats", "config")
TODELETE_DIR, DAMAGED_DIR = "todelete", "damaged"
_STEP_NAME = re.compile(r"0|[1-9]\d*")
_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")
# Per item, the files its handler reads before any array data (besides its commit marker).
_ITEM_FILES = {"state": ("_METADATA", "manifest.ocdbt"), "norm_stats": ("metadata",),
               "config": ("metadata",)}
# Messages of tensorstore / file errors: data that is absent or unreadable, not a tree mismatch.
_UNREADABLE = re.compile(r"NOT_FOUND|DATA_LOSS|FAILED_PRECONDITION|OUT_OF_RANGE|Error reading|"
                         r"Error opening|does not exist|not found|No such file")


class IncompatibleCheckpointError(ConfigError):
  """A checkpoint written for another model configuration."""


class DamagedCheckpointError(ValueError):
  """A checkpoint step with files missing or unreadable (a kill while deleting, or by hand)."""


@dataclasses.dataclass(frozen=True)
class StepStatus:
  """A step directory and what a whole step has that it lacks (paths relative to it)."""
  step: int
  missing: tuple[str, ...]

  @property
  def whole(self) -> bool:
    return not self.missing


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The resolved config as plain JSON data (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def make_manager(directory: str, checkpoint_config: ml_collections.ConfigDict
                 ) -> ocp.CheckpointManager:
  """A `CheckpointManager` for `directory` (created if missing)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(checkpoint_config.keep_last),
      keep_period=checkpoint_config.keep_every or None,
      # Orbax removes a dropped step's files in place (a kill leaves a partial step it still
      # lists); renamed first, the step disappears atomically and `purge_deleted` removes it.
      todelete_subdir=TODELETE_DIR,
      create=True,
      enable_async_checkpointing=bool(checkpoint_config.async_save))
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def purge_deleted(directory: str | os.PathLike) -> None:
  """Removes the steps retention renamed into `todelete/` (the primary process only).

  Entries are removed one by one and the folder is kept: orbax may be renaming the next one in.
  """
  trash = epath.Path(directory) / TODELETE_DIR
  if jax.process_index() != 0 or not trash.is_dir():
    return
  for entry in trash.iterdir():
    if entry.is_dir():
      entry.rmtree()
    else:
      entry.unlink()


def save(manager: ocp.CheckpointManager, step: int, state: Any, *,
         data_iterator: grain.DatasetIterator | None, norm_stats: Mapping[str, Any],
         config: Mapping[str, Any], force: bool = False) -> bool:
  """Starts an (async) save of the composite checkpoint at `step`; returns whether it saved."""
  items = dict(state=ocp.args.StandardSave(state), norm_stats=ocp.args.JsonSave(dict(norm_stats)),
               config=ocp.args.JsonSave(dict(config)))
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  saved = manager.save(step, args=ocp.args.Composite(**items), force=force)
  # `manager.save` first waited for the previous save, whose retention renamed old steps away.
  purge_deleted(manager.directory)
  return saved


def _names(path: epath.Path) -> set[str]:
  return {p.name for p in path.iterdir()} if path.is_dir() else set()


def _item_missing(step_dir: epath.Path, item: str) -> list[str]:
  """What `step_dir/item` lacks of the files its handler writes (before any array data)."""
  item_dir = step_dir / item
  names = _names(item_dir)
  if not names:
    return [f"{item}/"]
  missing = [n for n in [COMMIT_MARKER, *_ITEM_FILES.get(item, ())] if n not in names]
  if item == "state":  # OCDBT: the merged tree in d/, each process's shards in ocdbt.process_i/.
    processes = sorted(n for n in names if n.startswith("ocdbt.process_"))
    missing += [] if _names(item_dir / "d") else ["d/"]
    missing += [] if processes else ["ocdbt.process_0/"]
    missing += [f"{p}/manifest.ocdbt" for p in processes
                if "manifest.ocdbt" not in _names(item_dir / p)]
  elif item == "data":  # grain: process_<i>-of-<n>.json for every process i of the job.
    count = max((int(m.group(2)) for m in map(_DATA_FILE.fullmatch, names) if m), default=1)
    missing += [f"process_{i}-of-{count}.json" for i in range(count)
                if f"process_{i}-of-{count}.json" not in names]
  return [f"{item}/{n}" for n in missing]


def _step_items(step_dir: epath.Path) -> list[str] | None:
  """The items the step's metadata lists, or None if it is missing or unreadable."""
  try:
    return sorted(json.loads((step_dir / STEP_METADATA).read_text())["item_handlers"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def missing_parts(step_dir: str | os.PathLike) -> tuple[str, ...]:
  """What a whole step has and `step_dir` lacks, relative to it (empty: the step is whole)."""
  step_dir = epath.Path(step_dir)
  names = _names(step_dir)
  items = _step_items(step_dir)
  missing = ([] if items is not None else [STEP_METADATA]) + (
      [] if COMMIT_MARKER in names else [COMMIT_MARKER])
  # Without the metadata, the items every save writes (the data item is optional).
  for item in items if items is not None else [i for i in ITEMS if i != "data" or i in names]:
    missing += _item_missing(step_dir, item)
  return tuple(missing)


def list_steps(directory: str | os.PathLike) -> list[StepStatus]:
  """Every step orbax would list in `directory` (finalized: no temporary suffix), ascending,
  with what each lacks of a whole step."""
  root = epath.Path(directory)
  if not root.is_dir():
    return []
  steps = [StepStatus(int(p.name), missing_parts(p)) for p in root.iterdir()
           if _STEP_NAME.fullmatch(p.name) and p.is_dir()]
  return sorted(steps, key=lambda s: s.step)


def _describe(missing: Sequence[str]) -> str:
  return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"


def _damaged(directory: str, step: int, what: str) -> DamagedCheckpointError:
  """The error for a damaged `step`: what is wrong and which whole step to use instead."""
  whole = [s.step for s in list_steps(directory) if s.whole and s.step != step]
  earlier = [s for s in whole if s < step]
  if earlier:
    fix = (f"The latest whole step before it is {earlier[-1]}: export it with scripts/export.py "
           f"--step={earlier[-1]}; ")
  elif whole:
    fix = f"Whole steps: {', '.join(map(str, whole))} (scripts/export.py --step=...); "
  else:
    fix = (f"No whole step is left: move {directory} away (or use another --workdir) to train "
           "from scratch. ")
  if whole:
    fix += (f"re-running the training resumes from step {whole[-1]}"
            f"{f' (moving step {step} to {DAMAGED_DIR}/)' if step > whole[-1] else ''}. ")
  return DamagedCheckpointError(
      f"Checkpoint step {step} in {directory} is damaged or incomplete: {what} (killed while "
      f"being deleted, or files removed by hand?). {fix}scripts/checkpoints.py "
      f"--checkpoint_dir={directory} lists the whole steps.")


def check_whole(directory: str | os.PathLike, step: int) -> None:
  """Raises `DamagedCheckpointError` (or `FileNotFoundError`) unless `step` is whole."""
  directory = str(directory)
  path = epath.Path(directory) / str(step)
  if not path.is_dir():
    whole = [s.step for s in list_steps(directory) if s.whole]
    raise FileNotFoundError(f"No checkpoint step {step} in {directory}; whole steps: "
                            f"{', '.join(map(str, whole)) or 'none'}.")
  missing = missing_parts(path)
  if missing:
    raise _damaged(directory, step, _describe(missing))


def whole_steps(directory: str | os.PathLike) -> Iterator[int]:
  """The whole steps, newest first; warns about each damaged step it passes over."""
  for status in reversed(list_steps(directory)):
    if status.whole:
      yield status.step
    else:
      logging.warning("Skipping checkpoint step %d in %s: damaged or incomplete (%s).",
                      status.step, directory, _describe(status.missing))


def _nothing_whole(directory: str) -> Exception:
  """The error for a directory without a whole step: what each step lacks."""
  steps = list_steps(directory)
  if not steps:
    return FileNotFoundError(f"No checkpoint in {directory}.")
  details = "; ".join(f"step {s.step}: {_describe(s.missing) if s.missing else 'unreadable'}"
                      for s in steps)
  return DamagedCheckpointError(
      f"No whole checkpoint step in {directory} ({details}). Move it away (or use another "
      "--workdir) to train from scratch.")


def latest_whole_step(directory: str | os.PathLike) -> int:
  """The latest whole step; a damaged newer one is skipped with a warning.

  Raises:
    FileNotFoundError: no step at all.
    DamagedCheckpointError: no whole step.
  """
  latest = next(whole_steps(directory), None)
  if latest is None:
    raise _nothing_whole(str(directory))
  return latest


def set_aside(directory: str | os.PathLike, after: int) -> list[str]:
  """Moves every step directory after step `after` into `damaged/` (primary process only), so
  that the resumed run can save those steps again; returns the new paths. Nothing is deleted."""
  root = epath.Path(directory)
  if jax.process_index() != 0:
    return []
  moved = []
  for status in list_steps(root):
    if status.step > after:
      target = root / DAMAGED_DIR / str(status.step)
      n = 0
      while target.exists():
        n += 1
        target = root / DAMAGED_DIR / f"{status.step}-{n}"
      target.parent.mkdir(parents=True, exist_ok=True)
      (root / str(status.step)).rename(target)
      moved.append(str(target))
  return moved


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
    old_block, new_block = _comparable(saved.get(block, {})), _comparable(current.get(block, {}))
    # The adapter rank first: it tells full fine-tuning from adapters.
    ranks = old_block["lora"]["rank"], new_block["lora"]["rank"]
    found = ((f"{block}.lora.rank", *ranks) if ranks[0] != ranks[1]
             else first_difference(old_block, new_block, block))
    if found:
      field, old, new = found
      hint = ""
      if field.startswith("model.lora"):
        hint = (" A full fine-tuning checkpoint cannot resume as a low-rank adapter run, nor the "
                "reverse (nor with another rank or targets): they hold different trainable "
                "params and optimizer state.")
      raise IncompatibleCheckpointError(
          f"The checkpoint {where} was written for another model: config.{field} is {old!r} "
          f"there but {new!r} now.{hint} Resume with the config it was trained with, or use "
          "another --workdir / checkpoint.dir.")


def _comparable(model: Any) -> Any:
  """A `model` config block with fields that do not change the model left out or filled in:
  the adapter settings when `lora.rank` is 0 (or absent: written before adapters existed), and
  `left_quantization` / `left_dtype` as runs before those fields had them ("none", the compute
  dtype)."""
  if not isinstance(model, Mapping):
    return {}
  model = dict(model)
  if not (model.get("lora") or {}).get("rank"):
    model["lora"] = {"rank": 0}
  model.setdefault("left_quantization", "none")
  if "dtype" in model:
    model.setdefault("left_dtype", model["dtype"])
  return model


def read_metadata(manager: ocp.CheckpointManager, step: int) -> tuple[dict, dict]:
  """(config JSON, norm stats JSON) of the checkpoint at `step` (which must be whole)."""
  check_whole(manager.directory, step)
  restored = manager.restore(step, args=ocp.args.Composite(
      config=ocp.args.JsonRestore(), norm_stats=ocp.args.JsonRestore()))
  return dict(restored["config"]), dict(restored["norm_stats"])


def _causes(error: BaseException) -> list[BaseException]:
  """`error` and the errors it was raised from, outermost first."""
  chain = [error]
  while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  return chain


def _short(error: BaseException) -> str:
  """The innermost cause's first line, without tensorstore's spec dump."""
  text = str(_causes(error)[-1]).strip() or type(error).__name__
  return text.splitlines()[0].split(" [tensorstore_spec")[0][:300]


def _unreadable(error: BaseException) -> bool:
  return any(_UNREADABLE.search(str(e)) for e in _causes(error))


def _restore_step(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
                  data_iterator: grain.DatasetIterator | None, config: Mapping[str, Any]
                  ) -> tuple[Any, dict]:
  directory = str(manager.directory)
  saved_config, norm_stats = read_metadata(manager, step)
  check_compatible(saved_config, config, os.path.join(directory, str(step)))
  try:
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))["state"]
  except Exception as err:  # Orbax wraps tensorstore's read errors in plain `Exception`s.
    if _unreadable(err):
      raise _damaged(directory, step, f"state/ could not be read ({_short(err)})") from err
    if isinstance(err, (ValueError, KeyError, TypeError)):
      raise IncompatibleCheckpointError(
          f"The train state of step {step} in {directory} does not fit the state being built "
          f"although config.model matches ({_short(err)}): it was probably written by another "
          "version of twinbrain_jax. Restore it with that version, or use another --workdir / "
          "checkpoint.dir.") from err
    raise
  if data_iterator is not None:
    _restore_data(manager, step, data_iterator)
  return state, norm_stats


def _restore_data(manager: ocp.CheckpointManager, step: int,
                  data_iterator: grain.DatasetIterator) -> None:
  """Sets `data_iterator` to the position saved at `step`.

  A job with the saving job's number of processes restores each process's own file through
  orbax. The pipeline's position is global (the same in every process, see
  `twinbrain_jax/data/pipeline.py`), so a job with another number of processes takes the one
  position all saved files agree on.
  """
  directory = str(manager.directory)
  data_dir = epath.Path(directory) / str(step) / "data"
  names = _names(data_dir)
  if not names:
    raise _damaged(directory, step, "data/ is missing (no data iterator position)")
  mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  try:
    if mine in names:
      manager.restore(step, args=ocp.args.Composite(
          data=grain.checkpoint.CheckpointRestore(data_iterator)))
    else:
      data_iterator.set_state(_one_position(data_dir, names, directory, step))
  except PipelineStateError:
    raise
  except Exception as err:
    if _unreadable(err):
      raise _damaged(directory, step, f"data/ could not be read ({_short(err)})") from err
    raise


def _one_position(data_dir: epath.Path, names: set[str], directory: str, step: int) -> dict:
  """The iterator state every process of the saving job wrote (they must agree)."""
  files = sorted(n for n in names if _DATA_FILE.fullmatch(n))
  states = [json.loads((data_dir / n).read_text()) for n in files]
  if not states or any(state != states[0] for state in states):
    raise PipelineStateError(
        f"Checkpoint step {step} in {directory} holds the data positions {files}, which do not "
        f"agree on one position, and none is of this job's process "
        f"(process_{jax.process_index()}-of-{jax.process_count()}.json): resume with the number "
        "of processes that wrote it, or use another --workdir / checkpoint.dir.")
  return states[0]


def restore(manager: ocp.CheckpointManager, abstract_state: Any, *,
            data_iterator: grain.DatasetIterator | None, config: Mapping[str, Any],
            step: int | None = None) -> tuple[int, Any, dict]:
  """Restores the latest whole (or `step`'s) checkpoint onto the shardings of `abstract_state`.

  The state lands on whatever mesh `abstract_state`'s shardings name (it may differ from the
  mesh that wrote it). `data_iterator` is set to the saved position. Without `step`, damaged
  steps after the latest whole one are skipped with a warning, and so is a whole-looking step
  whose files turn out unreadable.

  Returns:
    (step, state, norm stats JSON).

  Raises:
    FileNotFoundError: no checkpoint at all (or no step `step`).
    DamagedCheckpointError: `step` (or every step) is damaged; the message names what is
      missing and the latest whole step.
    IncompatibleCheckpointError: the checkpoint's model config differs from `config`'s.
    PipelineStateError: the data iterator position is of another pipeline.
  """
  directory = str(manager.directory)
  if step is not None:
    return (step, *_restore_step(manager, step, abstract_state, data_iterator, config))
  for candidate in whole_steps(directory):
    try:
      return (candidate,
              *_restore_step(manager, candidate, abstract_state, data_iterator, config))
    except DamagedCheckpointError as err:  # Whole-looking, but its files are unreadable.
      logging.warning("Skipping checkpoint step %d: %s", candidate, err)
  raise _nothing_whole(directory)
