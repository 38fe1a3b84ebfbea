"""The `config.data` block: which datasets, how samples are built, how they are loaded."""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping

import ml_collections
from ml_collections import config_dict

from twinbrain_jax.data import oxe_registry


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults of the OXE recipe: bridge + fractal weight 1 each, one camera at 224x224, H = 16."""
  c = ml_collections.ConfigDict()
  # TFDS data dir holding `<dataset>/<version>/` ArrayRecord RLDS datasets.
  c.data_dir = config_dict.placeholder(str)
  # Each entry: a registry name (twinbrain_jax/data/oxe_registry.py) read from
  # `<data_dir>/<name>/<newest version>/`, or a dict mapping a directory to a registry schema:
  #   dict(name="my_widowx", spec="bridge_orig", dir="/data/my_widowx/1.0.0", weight=0.5)
  # (keys: name; spec = registry entry, default name; dir = version dir or dataset dir, relative
  # to data_dir; or version; weight). A LeRobot dataset (v3.0 or v2.1, data/lerobot.py) says
  # which of its features are the cameras, the state and the action:
  #   dict(name="my_so100", format="lerobot", dir="/data/my_so100",
  #        cameras=("observation.images.top",), state="observation.state", action="action")
  # (every state/action dim normalised, none binarised; or spec="<registry entry>" to take that
  # schema's masks and standardisation). See `dataset_entries`.
  c.datasets = ("bridge_dataset", "fractal20220817_data")
  # Mixture weights, one per entry; () takes each entry's `weight` (default 1).
  c.weights = (1.0, 1.0)
  c.split = "train"
  # True: every sample's instruction is "" (the instruction-blind ablation); a policy of such a
  # run is evaluated with "" too (sim/evaluation.py reads this flag from the run's config).
  c.drop_instruction = False
  # Norm stats JSON location; None writes/reads `norm_stats.<split>.json` next to the data.
  c.stats_dir = config_dict.placeholder(str)
  # False: a malformed episode is an error. True: it is skipped, counted and logged. Episodes
  # with no step to train on (e.g. 1-step bridge episodes) are always skipped and counted.
  c.skip_bad_episodes = False
  c.seed = 0
  c.shuffle = True
  # None: endless weighted mixture (training). N: every step of every dataset N times, no
  # weighting (evaluation, statistics).
  c.num_epochs = config_dict.placeholder(int)
  # Global batch; each process gets batch_size / process_count.
  c.batch_size = 128
  # Images: resized to image_size, then zero-padded (bottom/right) to a multiple of
  # pad_to_multiple (28 = Qwen2.5-VL patch 14 x merge 2; 0 = no padding).
  c.image_size = (224, 224)
  c.pad_to_multiple = 0
  c.num_cameras = 1
  c.obs_history = 1
  c.action_horizon = 16
  # Past the episode end: "repeat_last" repeats the last action, "zero" writes zeros (both
  # masked out in `action_mask`).
  c.pad_mode = "repeat_last"
  # Zero-pad states/actions of every dataset to this width; 0 = the widest in the mixture.
  c.state_dim = 0
  c.action_dim = 0
  c.augment = ml_collections.ConfigDict(dict(
      enabled=True, crop_scale=(0.9, 1.0), crop_ratio=(0.9, 1.1), brightness=0.2,
      contrast=0.2, saturation=0.2, hue=0.05))
  # Loading: worker processes (0 = in the main process), reader threads per process, and
  # batches buffered ahead.
  c.num_workers = 0
  c.read_threads = 8
  c.prefetch_batches = 4
  return c


_ENTRY_KEYS = ("name", "spec", "dir", "version", "weight", "format", "cameras", "state",
               "action")
FORMATS = ("rlds", "lerobot")
_LEROBOT_KEYS = ("cameras", "state", "action")


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
  """One dataset of the mixture, resolved from `data.datasets` (no file system access, except a
  LeRobot entry without `spec`, whose schema comes from its `meta/info.json`).

  Attributes:
    name: the dataset's name in this run: norm stats, logs and bundles are keyed by it.
    spec: the registry schema, carrying `name` (and `registry_name` = the schema's entry).
    dir: the directory given in the config (absolute, or relative to data_dir), or None for
      `<data_dir>/<name>`.
    version: a version under the dataset directory; None = the newest.
    weight: mixture weight.
    format: "rlds" (TFDS ArrayRecord) or "lerobot".
    state_key, action_key: the LeRobot features read as state and action (format "lerobot").
  """
  name: str
  spec: oxe_registry.DatasetSpec
  dir: str | None
  version: str | None
  weight: float
  format: str = "rlds"
  state_key: str = ""
  action_key: str = ""

  def root(self, data_dir: str | None) -> str:
    """`dir` (absolute, or under data_dir), or `<data_dir>/<name>`."""
    if self.dir is None or not os.path.isabs(self.dir):
      if not data_dir:
        raise ValueError(f"data.data_dir is not set and dataset {self.name!r} has no absolute "
                         "'dir'; pass --config.data.data_dir=/path/to/data.")
    return os.path.join(data_dir or "", self.dir if self.dir is not None else self.name)

  def directory(self, data_dir: str | None) -> str:
    """The directory to read: the TFDS version directory, or the LeRobot dataset directory
    (`FileNotFoundError` naming it if absent)."""
    from twinbrain_jax.data import rlds  # pylint: disable=g-import-not-at-top
    root = self.root(data_dir)
    if self.format == "lerobot":
      if not os.path.isdir(root):
        raise FileNotFoundError(f"Dataset directory {root!r} for dataset {self.name!r} does not "
                                "exist; fix data.data_dir or the entry's 'dir'.")
      return root
    if self.dir is not None and os.path.isfile(os.path.join(root, "dataset_info.json")):
      return root
    return rlds.resolve_version_dir(root, self.name, self.version)

  def open(self, data_dir: str | None, split: str = "train", num_cameras: int | None = None):
    """The episode source: an `rlds.RldsDataset` or a `lerobot.LeRobotDataset`."""
    from twinbrain_jax.data import lerobot, rlds  # pylint: disable=g-import-not-at-top
    path = self.directory(data_dir)
    if self.format == "lerobot":
      return lerobot.LeRobotDataset(path, self.spec, split, num_cameras,
                                    state_key=self.state_key, action_key=self.action_key)
    return rlds.RldsDataset(path, self.spec, split, num_cameras=num_cameras)


def _entry_error(index: int, message: str) -> ValueError:
  return ValueError(f"data.datasets[{index}]: {message}")


def dataset_entries(data_config: ml_collections.ConfigDict) -> list[DatasetEntry]:
  """Resolves `data.datasets` and `data.weights` into entries, with clear errors."""
  raw = list(data_config.datasets)
  weights = list(data_config.weights or ())
  if weights and len(weights) != len(raw):
    raise ValueError(f"data.datasets has {len(raw)} entries but data.weights has {len(weights)}; "
                     "give one weight per entry, or data.weights=() to use each entry's weight.")
  entries = []
  for index, item in enumerate(raw):
    fields = {"name": item} if isinstance(item, str) else item
    if not isinstance(fields, Mapping):
      raise _entry_error(index, f"{item!r} is neither a registry name nor a dict with keys "
                                f"{', '.join(_ENTRY_KEYS)}.")
    fields = dict(fields)
    for key in fields:
      if key not in _ENTRY_KEYS:
        close = difflib.get_close_matches(key, _ENTRY_KEYS, n=1)
        raise _entry_error(index, f"unknown key {key!r}"
                                  + (f" (did you mean {close[0]!r}?)" if close else "")
                                  + f"; the keys are {', '.join(_ENTRY_KEYS)}.")
    if not fields.get("name"):
      raise _entry_error(index, f"{fields} has no 'name'.")
    name = str(fields["name"])
    if fields.get("dir") and fields.get("version"):
      raise _entry_error(index, f"{name!r} sets both 'dir' and 'version'; 'dir' names the "
                                "directory itself, 'version' one under <data_dir>/<name>.")
    if weights and "weight" in fields:
      raise _entry_error(index, f"{name!r} has a 'weight' and data.weights is set too; use one.")
    data_format = str(fields.get("format") or "rlds")
    if data_format not in FORMATS:
      raise _entry_error(index, f"{name!r} has format {data_format!r}; choose one of "
                                f"{', '.join(FORMATS)}.")
    weight = float(weights[index] if weights else fields.get("weight", 1.0))
    if not weight > 0:
      raise _entry_error(index, f"{name!r} has weight {weight}; weights must be positive.")
    entry = DatasetEntry(name=name, spec=None, dir=fields.get("dir") or None,
                         version=fields.get("version") or None, weight=weight, format=data_format)
    if data_format == "lerobot":
      entry = _lerobot_entry(index, entry, fields, data_config.get("data_dir"))
    else:
      extra = [k for k in _LEROBOT_KEYS if k in fields]
      if extra:
        raise _entry_error(index, f"{name!r} sets {', '.join(extra)}, which only a "
                                  "format='lerobot' entry reads.")
      spec = oxe_registry.get_spec(str(fields.get("spec") or name))
      entry = dataclasses.replace(entry, spec=dataclasses.replace(
          spec, name=name, registry_name=spec.registry_name))
    entries.append(entry)
  names = [e.name for e in entries]
  for name in names:
    if names.count(name) > 1:
      raise ValueError(f"data.datasets names {name!r} twice; every entry needs its own name "
                       "(norm stats are kept per name).")
  if not entries:
    raise ValueError("data.datasets is empty; name at least one dataset.")
  return entries


def _lerobot_entry(index: int, entry: DatasetEntry, fields: Mapping,
                  data_dir: str | None) -> DatasetEntry:
  """The schema of a LeRobot entry: a registry schema with the entry's cameras (`spec`), or one
  read from the dataset's `meta/info.json`."""
  from twinbrain_jax.data import lerobot  # pylint: disable=g-import-not-at-top
  name = entry.name
  if entry.version:
    raise _entry_error(index, f"{name!r}: a LeRobot entry has no 'version'; 'dir' names the "
                              "dataset directory (the one holding meta/).")
  cameras = fields.get("cameras")
  if isinstance(cameras, str):
    cameras = (cameras,)
  if not cameras:
    raise _entry_error(index, f"{name!r}: a LeRobot entry needs cameras=(...), its camera "
                              "feature keys (e.g. 'observation.images.top'), primary first.")
  cameras = tuple(str(c) for c in cameras)
  state = str(fields.get("state") or "observation.state")
  action = str(fields.get("action") or "action")
  entry = dataclasses.replace(entry, state_key=state, action_key=action)
  if fields.get("spec"):
    spec = oxe_registry.get_spec(str(fields["spec"]))
    if set(spec.lowdim_keys) != {lerobot.ACTION, lerobot.STATE}:
      raise _entry_error(index, f"{name!r}: schema {spec.registry_name!r} reads "
                                f"{sorted(spec.lowdim_keys)}; a LeRobot entry can only use a "
                                f"schema that reads {lerobot.ACTION!r} and {lerobot.STATE!r}.")
    return dataclasses.replace(entry, spec=dataclasses.replace(
        spec, name=name, image_keys=cameras, registry_name=spec.registry_name))
  path = entry.directory(data_dir)
  return dataclasses.replace(entry, spec=lerobot.dataset_spec(
      name, lerobot.read_info(path, name), cameras, state, action))


def dataset_spec(data_config: ml_collections.ConfigDict, name: str) -> oxe_registry.DatasetSpec:
  """The spec of the entry `name` of `data.datasets` (policies un-normalise with it)."""
  for entry in dataset_entries(data_config):
    if entry.name == name:
      return entry.spec
  raise oxe_registry.UnknownDatasetError(f"Dataset {name!r} is not in data.datasets "
                 f"({', '.join(e.name for e in dataset_entries(data_config))}).")
