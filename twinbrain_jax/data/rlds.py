"""Random access to RLDS episodes stored by TFDS in the ArrayRecord format (no TensorFlow needed).

An ArrayRecord record is one whole episode; its `steps` is a lazy per-step source. Images are
read as encoded bytes (TFDS `SkipDecoding`) and decoded only for the steps a sample needs.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from twinbrain_jax.data.oxe_registry import DatasetSpec

ARRAY_RECORD = "array_record"


class DataError(ValueError):
  """Bad input data: names the dataset, the episode and the key, and what to do."""


class EmptyEpisodeError(DataError):
  """An episode with no step to train on (0 steps, or none left after standardisation)."""


def _version_key(name: str):
  try:
    return tuple(int(p) for p in name.split("."))
  except ValueError:
    return (-1,)


def resolve_version_dir(root: str, name: str, version: str | None = None) -> str:
  """`<root>/<version>` (the newest version if None) of dataset `name`; a clear error if absent."""
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f"Dataset directory {root!r} for dataset {name!r} does not exist. Download the RLDS data "
        "(TFDS layout <data_dir>/<name>/<version>/) or fix data.data_dir / the entry's 'dir'.")
  if version is None:
    versions = sorted((v for v in os.listdir(root)
                       if os.path.isfile(os.path.join(root, v, "dataset_info.json"))),
                      key=_version_key)
    if not versions:
      raise FileNotFoundError(
          f"Dataset {name!r}: no version directory with dataset_info.json under {root!r}.")
    version = versions[-1]
  path = os.path.join(root, version)
  if not os.path.isfile(os.path.join(path, "dataset_info.json")):
    raise FileNotFoundError(f"Dataset {name!r}: {path!r} has no dataset_info.json.")
  return path


def resolve_dataset_dir(data_dir: str, name: str, version: str | None = None) -> str:
  """`<data_dir>/<name>/<version>` (the newest version if None); a clear error if absent."""
  return resolve_version_dir(os.path.join(data_dir, name), name, version)


def _flatten_features(features, prefix: str = "") -> dict:
  """FeaturesDict -> {"observation/state": feature, ...} (leaves only)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  out = {}
  for key, feature in features.items():
    path = f"{prefix}{key}"
    if isinstance(feature, tfds.features.FeaturesDict):
      out.update(_flatten_features(feature, path + "/"))
    else:
      out[path] = feature
  return out


def _nest(flat: Mapping[str, object]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def _get_path(step: Mapping, path: str):
  node = step
  for part in path.split("/"):
    node = node[part]
  return node


class RldsDataset:
  """Episodes of one split of one TFDS RLDS dataset, read by index.

  Attributes:
    spec: the registry entry that says which keys are read.
    path: the TFDS version directory.
    split: the split read.
    cameras: the observation keys of the cameras in use (`spec.image_keys[:num_cameras]`); only
      these must exist in the data.
  """

  def __init__(self, path: str, spec: DatasetSpec, split: str = "train",
               num_cameras: int | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.path, self.spec, self.split = path, spec, split
    self.cameras = tuple(spec.image_keys[:num_cameras])
    builder = tfds.builder_from_directory(path)
    # In-place conversions keep `fileFormat: tfrecord` and list ArrayRecord as an alternative.
    formats = {str(getattr(f, "value", f)) for f in builder.info.available_file_formats()}
    if ARRAY_RECORD not in formats:
      raise DataError(
          f"Dataset {spec.name!r} at {path!r} is stored as {' + '.join(sorted(formats))!r}; "
          "random access needs ArrayRecord. Convert it with `python scripts/convert_tfrecord.py "
          f"--dataset_dir={path}` (needs the `tf` extra).")
    if split not in builder.info.splits:
      raise DataError(f"Dataset {spec.name!r} at {path!r} has no split {split!r}; splits: "
                      f"{', '.join(builder.info.splits)}.")
    self._check_schema(builder.info.features)
    image_decoders = {k: tfds.decode.SkipDecoding() for k in self._image_features}
    self._source = builder.as_data_source(
        split=split, decoders={"steps": _nest(image_decoders)}, file_format=ARRAY_RECORD)

  def _check_schema(self, features):
    """Every key the spec reads must exist with the expected per-step shape."""
    if "steps" not in features:
      raise DataError(f"Dataset {self.spec.name!r} at {self.path!r} has no 'steps' feature; "
                      "is it an RLDS dataset?")
    step_features = _flatten_features(features["steps"].feature)
    self._image_features = {
        k for k, f in step_features.items() if type(f).__name__ == "Image"}
    wanted = dict(self.spec.lowdim_keys)
    for key in self.cameras:
      wanted[f"observation/{key}"] = tuple(self.spec.image_shape) + (3,)
    wanted[self.spec.language_key] = ()
    for key, shape in wanted.items():
      if key not in step_features:
        raise DataError(
            f"Dataset {self.spec.name!r} at {self.path!r}: missing feature key 'steps/{key}'; "
            f"the step keys are: {', '.join(sorted(step_features))}. Check that the data matches "
            f"the registry entry {self.spec.registry_name!r} in "
            "twinbrain_jax/data/oxe_registry.py"
            + (" (or use fewer cameras: data.num_cameras)." if "image" in key else "."))
      found = tuple(step_features[key].shape)
      if found != tuple(shape):
        raise DataError(
            f"Dataset {self.spec.name!r} at {self.path!r}: feature 'steps/{key}' has shape "
            f"{found}, the registry expects {tuple(shape)}.")

  def __len__(self) -> int:
    return len(self._source)

  def episode(self, index: int) -> "Episode":
    try:
      record = self._source[index]
    except Exception as e:  # ArrayRecord/proto errors carry no episode context.
      raise DataError(f"Dataset {self.spec.name!r}: cannot read record {index} from "
                      f"{self.path!r}: {e}") from e
    return Episode(self, index, record["steps"], record.get("episode_metadata") or {})


def _metadata_text(value) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  return str(value.item() if isinstance(value, np.ndarray) and value.size == 1 else value)


class Episode:
  """One RLDS episode with lazily decoded steps.

  Attributes:
    index: the record index in the split.
    episode_id: the dataset's own name of the episode: `episode_metadata/episode_id`, else
      `episode_metadata/file_path`, else "record <index>".
  """

  def __init__(self, dataset: RldsDataset, index: int, steps: Sequence[Mapping],
               metadata: Mapping | None = None):
    self._dataset, self.index, self._steps = dataset, index, steps
    self._cache: dict[int, Mapping] = {}
    metadata = metadata or {}
    self._names = {k: _metadata_text(metadata[k]) for k in ("episode_id", "file_path")
                   if k in metadata}
    self.episode_id = next(iter(self._names.values()), f"record {index}")

  @property
  def spec(self) -> DatasetSpec:
    return self._dataset.spec

  def __len__(self) -> int:
    return len(self._steps)

  def _step(self, t: int) -> Mapping:
    if t not in self._cache:
      self._cache[t] = self._steps[t]
    return self._cache[t]

  def where(self) -> str:
    """`dataset 'x', record 3 (episode_id=..., file_path=...)`: enough to find the episode."""
    names = ", ".join(f"{k}={v!r}" for k, v in self._names.items())
    return (f"dataset {self._dataset.spec.name!r}, record {self.index}"
            + (f" ({names})" if names else ""))

  def _where(self, key: str) -> str:
    return f"{self.where()}, key 'steps/{key}'"

  def lowdim(self) -> dict[str, np.ndarray]:
    """Stacked `[T, ...]` float arrays of every key in `spec.lowdim_keys`."""
    out = {}
    for key, shape in self._dataset.spec.lowdim_keys.items():
      try:
        values = [np.asarray(_get_path(self._step(t), key)) for t in range(len(self))]
      except KeyError as e:
        raise DataError(f"{self._where(key)}: missing in this episode ({e}).") from e
      array = (np.stack(values).astype(np.float32) if values
               else np.zeros((0,) + tuple(shape), np.float32))
      if array.shape[1:] != tuple(shape):
        raise DataError(f"{self._where(key)}: shape {array.shape[1:]} per step, expected "
                        f"{tuple(shape)}.")
      out[key] = array
    return out

  def instruction(self, t: int = 0) -> str:
    return self.text(t, self._dataset.spec.language_key)

  def text(self, t: int, key: str) -> str:
    """The text feature at step key path `key` ("language_instruction", "answer") of step `t`."""
    try:
      value = _get_path(self._step(t), key)
    except KeyError as e:
      raise DataError(f"{self._where(key)}: missing in this episode ({e}).") from e
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)

  def image(self, t: int, camera: str) -> np.ndarray:
    """Decoded `[h, w, 3]` uint8 image of `camera` at step `t`."""
    key = f"observation/{camera}"
    encoded = _get_path(self._step(t), key)
    try:
      image = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
    except Exception as e:
      raise DataError(f"{self._where(key)}, step {t}: cannot decode the image: {e}") from e
    expected = tuple(self._dataset.spec.image_shape) + (3,)
    if image.shape != expected:
      raise DataError(f"{self._where(key)}, step {t}: image shape {image.shape}, expected "
                      f"{expected}.")
    return image
