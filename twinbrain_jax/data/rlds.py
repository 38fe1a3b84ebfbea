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


class DataError(ValueError):
  """Bad input data: names the dataset, the episode and the key, and what to do."""


def _version_key(name: str):
  try:
    return tuple(int(p) for p in name.split("."))
  except ValueError:
    return (-1,)


def resolve_dataset_dir(data_dir: str, name: str, version: str | None = None) -> str:
  """`<data_dir>/<name>/<version>` (the newest version if None); a clear error if absent."""
  root = os.path.join(data_dir, name)
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f"Dataset directory {root!r} for dataset {name!r} does not exist. Download the RLDS data "
        f"into {data_dir!r} (TFDS layout <name>/<version>/) or fix data.data_dir.")
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
  """

  def __init__(self, path: str, spec: DatasetSpec, split: str = "train"):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.path, self.spec, self.split = path, spec, split
    builder = tfds.builder_from_directory(path)
    file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if file_format != "array_record":
      raise DataError(
          f"Dataset {spec.name!r} at {path!r} is stored as {file_format!r}; random access needs "
          "ArrayRecord. Convert it with `python scripts/convert_tfrecord.py "
          f"--dataset_dir={path}` (needs the `tf` extra).")
    if split not in builder.info.splits:
      raise DataError(f"Dataset {spec.name!r} at {path!r} has no split {split!r}; splits: "
                      f"{', '.join(builder.info.splits)}.")
    self._check_schema(builder.info.features)
    image_decoders = {k: tfds.decode.SkipDecoding() for k in self._image_features}
    self._source = builder.as_data_source(
        split=split, decoders={"steps": _nest(image_decoders)})

  def _check_schema(self, features):
    """Every key the spec reads must exist with the expected per-step shape."""
    if "steps" not in features:
      raise DataError(f"Dataset {self.spec.name!r} at {self.path!r} has no 'steps' feature; "
                      "is it an RLDS dataset?")
    step_features = _flatten_features(features["steps"].feature)
    self._image_features = {
        k for k, f in step_features.items() if type(f).__name__ == "Image"}
    wanted = dict(self.spec.lowdim_keys)
    for key in self.spec.image_keys:
      wanted[f"observation/{key}"] = tuple(self.spec.image_shape) + (3,)
    wanted[self.spec.language_key] = ()
    for key, shape in wanted.items():
      if key not in step_features:
        raise DataError(
            f"Dataset {self.spec.name!r} at {self.path!r}: missing feature key 'steps/{key}'; "
            f"the step keys are: {', '.join(sorted(step_features))}. Check that the data matches "
            "the registry entry in twinbrain_jax/data/oxe_registry.py.")
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
      raise DataError(f"Dataset {self.spec.name!r}: cannot read episode {index} from "
                      f"{self.path!r}: {e}") from e
    return Episode(self, index, record["steps"])


class Episode:
  """One RLDS episode with lazily decoded steps."""

  def __init__(self, dataset: RldsDataset, index: int, steps: Sequence[Mapping]):
    self._dataset, self.index, self._steps = dataset, index, steps
    self._cache: dict[int, Mapping] = {}

  @property
  def spec(self) -> DatasetSpec:
    return self._dataset.spec

  def __len__(self) -> int:
    return len(self._steps)

  def _step(self, t: int) -> Mapping:
    if t not in self._cache:
      self._cache[t] = self._steps[t]
    return self._cache[t]

  def _where(self, key: str) -> str:
    return f"dataset {self._dataset.spec.name!r}, episode {self.index}, key 'steps/{key}'"

  def lowdim(self) -> dict[str, np.ndarray]:
    """Stacked `[T, ...]` float arrays of every key in `spec.lowdim_keys`."""
    out = {}
    for key, shape in self._dataset.spec.lowdim_keys.items():
      values = [np.asarray(_get_path(self._step(t), key)) for t in range(len(self))]
      array = (np.stack(values).astype(np.float32) if values
               else np.zeros((0,) + tuple(shape), np.float32))
      if array.shape[1:] != tuple(shape):
        raise DataError(f"{self._where(key)}: shape {array.shape[1:]} per step, expected "
                        f"{tuple(shape)}.")
      out[key] = array
    return out

  def instruction(self, t: int = 0) -> str:
    value = _get_path(self._step(t), self._dataset.spec.language_key)
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


def convert_to_array_record(dataset_dir: str, out_dir: str | None = None,
                            num_workers: int = 8, overwrite: bool = False) -> None:
  """Converts a published TFRecord RLDS dataset version directory to ArrayRecord.

  Reading TFRecord needs TensorFlow (the `tf` extra). With `out_dir=None` the ArrayRecord shards
  are written next to the TFRecord ones and `dataset_info.json` lists both formats.
  """
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  except ImportError as e:
    raise ImportError(
        "Converting TFRecord RLDS data needs TensorFlow: pip install 'twinbrain_jax[tf]' "
        "(tensorflow-cpu). Already-converted ArrayRecord data is read without it.") from e
  from tensorflow_datasets.scripts.cli import convert_format_utils  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(os.path.join(dataset_dir, "dataset_info.json")):
    raise FileNotFoundError(f"{dataset_dir!r} is not a TFDS dataset version directory (no "
                            "dataset_info.json); pass e.g. <data_dir>/bridge_dataset/1.0.0.")
  convert_format_utils.convert_dataset(
      out_dir=out_dir, out_file_format="array_record", dataset_version_dir=dataset_dir,
      overwrite=overwrite, num_workers=num_workers)
