"""TFRecord -> ArrayRecord conversion of published RLDS datasets (TFDS layout), without Beam.

A TFDS record is the same serialised `tf.train.Example` in both formats, so a shard converts by
copying its records in order. The source is read with `tf.data.TFRecordDataset` (the `tf` extra)
and every shard's record count is checked against `dataset_info.json`.

Two layouts come out, both readable by `rlds.RldsDataset`:
  * in place (`out_dir=None`): ArrayRecord shards next to the TFRecord ones, and
    `dataset_info.json` lists `array_record` under `alternativeFileFormats` (as `tfds
    convert_format` does);
  * `out_dir`: a complete TFDS dataset `<out_dir>/<name>/[<config>/]<version>/` (info, features,
    shards) in ArrayRecord only, so `data.data_dir=<out_dir>` reads it. The source is not touched.

Nothing half-written is ever visible: shards are written under temporary names (or into a
temporary directory) and renamed only after every shard converted and the result was opened and
its episode counts matched the source.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import logging
import os
import shutil
import uuid

ARRAY_RECORD = "array_record"


class ConversionError(RuntimeError):
  """A conversion that did not complete; nothing was published."""


@dataclasses.dataclass(frozen=True)
class ConversionResult:
  """Where the converted dataset is and what it holds.

  Attributes:
    path: the TFDS version directory that `RldsDataset` now reads.
    episodes: split -> number of episodes, checked against the source.
    shards: number of shards written.
    already_converted: True when there was nothing to do.
  """
  path: str
  episodes: dict[str, int]
  shards: int
  already_converted: bool = False


@dataclasses.dataclass(frozen=True)
class _Shard:
  split: str
  source: str
  target: str
  num_records: int


def _import_tensorflow():
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "Converting TFRecord RLDS data needs TensorFlow: pip install -c "
        "requirements/constraints.txt -e '.[tf]' (tensorflow-cpu). Already-converted ArrayRecord "
        "data is read without it.") from e
  return tf


def _read_info(dataset_dir: str):
  from tensorflow_datasets.core import dataset_info as dataset_info_lib  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(os.path.join(dataset_dir, "dataset_info.json")):
    raise FileNotFoundError(f"{dataset_dir!r} is not a TFDS dataset version directory (no "
                            "dataset_info.json); pass e.g. <data_dir>/bridge_dataset/1.0.0.")
  return dataset_info_lib.read_proto_from_builder_dir(dataset_dir)


def _source_format(info) -> str:
  # Datasets written by older TFDS versions (much of OXE) leave the field empty: TFRecord.
  return info.file_format or "tfrecord"


def _shards(info, source_dir: str, target_dir: str, target_suffix: str) -> list[_Shard]:
  """Every shard of every split: source path, target path and expected record count."""
  from tensorflow_datasets.core import dataset_info as dataset_info_lib  # pylint: disable=g-import-not-at-top
  splits = dataset_info_lib.get_split_dict_from_proto(info, data_dir=source_dir,
                                                      file_format=_source_format(info))
  shards = []
  for split in splits.values():
    template = split.filename_template
    out_template = template.replace(data_dir=target_dir, filetype_suffix=ARRAY_RECORD)
    lengths = list(split.shard_lengths)
    for index, length in enumerate(lengths):
      source = os.fspath(template.sharded_filepath(shard_index=index, num_shards=len(lengths)))
      target = os.fspath(out_template.sharded_filepath(shard_index=index,
                                                       num_shards=len(lengths)))
      shards.append(_Shard(split.name, source, target + target_suffix, int(length)))
  return shards


def _convert_shard(shard: _Shard) -> None:
  """Copies the records of one TFRecord shard into an ArrayRecord file, in order."""
  tf = _import_tensorflow()
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.exists(shard.source):
    raise FileNotFoundError(f"{shard.source} is missing ({shard.split} split).")
  writer = array_record_module.ArrayRecordWriter(shard.target, "group_size:1")
  count = 0
  try:
    for record in tf.data.TFRecordDataset(shard.source).as_numpy_iterator():
      writer.write(record)
      count += 1
  finally:
    writer.close()
  if count != shard.num_records:
    raise ConversionError(f"{shard.source} holds {count} records; dataset_info.json lists "
                          f"{shard.num_records}.")


def _convert_all(shards: list[_Shard], num_workers: int) -> None:
  """Converts every shard; any failure raises one error naming every failed shard."""
  failures = []
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    futures = {pool.submit(_convert_shard, shard): shard for shard in shards}
    for future in concurrent.futures.as_completed(futures):
      error = future.exception()
      if error is not None:
        shard = futures[future]
        failures.append(f"{shard.source}: {type(error).__name__}: "
                        f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}")
  if failures:
    raise ConversionError(f"{len(failures)} of {len(shards)} shards failed to convert (nothing "
                          "was published):\n  " + "\n  ".join(sorted(failures)))


def _check_readable(dataset_dir: str, expected: dict[str, int]) -> None:
  """Opens the converted dataset like the pipeline does and checks every split's episode count."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder_from_directory(dataset_dir)
  for split, count in expected.items():
    source = builder.as_data_source(split=split, file_format=ARRAY_RECORD)
    if len(source) != count:
      raise ConversionError(f"The converted split {split!r} in {dataset_dir} has {len(source)} "
                            f"episodes; the source has {count}.")
    if count:  # The last record parses (a truncated file fails here or in the count).
      source[count - 1]


def _dataset_info_json(info) -> str:
  from tensorflow_datasets.core import dataset_info as dataset_info_lib  # pylint: disable=g-import-not-at-top
  return dataset_info_lib.get_dataset_info_json(info)


def _write_text_atomically(path: str, text: str) -> None:
  """A crash leaves the old file or the new one, never a partial one."""
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _write_info(info, directory: str) -> None:
  _write_text_atomically(os.path.join(directory, "dataset_info.json"), _dataset_info_json(info))


def _expected_episodes(shards: list[_Shard]) -> dict[str, int]:
  counts: dict[str, int] = {}
  for shard in shards:
    counts[shard.split] = counts.get(shard.split, 0) + shard.num_records
  return counts


def _already_converted(info, dataset_dir: str) -> ConversionResult:
  shards = _shards(info, dataset_dir, dataset_dir, "")
  return ConversionResult(dataset_dir, _expected_episodes(shards), len(shards),
                          already_converted=True)


def _convert_in_place(dataset_dir: str, info, num_workers: int,
                      overwrite: bool) -> ConversionResult:
  if ARRAY_RECORD in info.alternative_file_formats and not overwrite:
    return _already_converted(info, dataset_dir)
  suffix = f".incomplete-{uuid.uuid4().hex[:8]}"
  shards = _shards(info, dataset_dir, dataset_dir, suffix)
  finals = [shard.target[:-len(suffix)] for shard in shards]
  info_path = os.path.join(dataset_dir, "dataset_info.json")
  with open(info_path) as f:
    info_on_failure = f.read()
  if ARRAY_RECORD in info.alternative_file_formats:
    # Overwriting shards listed in the info: should this fail, the info stops listing them (the
    # TFRecord shards are untouched, so the dataset stays valid, only unconverted).
    unconverted = copy.deepcopy(info)
    unconverted.alternative_file_formats.remove(ARRAY_RECORD)
    info_on_failure = _dataset_info_json(unconverted)
  published = False
  try:
    _convert_all(shards, num_workers)
    for shard, final in zip(shards, finals):
      os.replace(shard.target, final)
    if ARRAY_RECORD not in info.alternative_file_formats:
      info.alternative_file_formats.append(ARRAY_RECORD)
    _write_info(info, dataset_dir)
    expected = _expected_episodes(shards)
    _check_readable(dataset_dir, expected)
    published = True
  finally:
    if not published:  # Back to a valid state: the old (or unconverted) info, no new shards.
      _write_text_atomically(info_path, info_on_failure)
      for path in [shard.target for shard in shards] + finals:
        if os.path.exists(path):
          os.remove(path)
  return ConversionResult(dataset_dir, expected, len(shards))


def _convert_to_out_dir(dataset_dir: str, info, out_dir: str, num_workers: int,
                        overwrite: bool) -> ConversionResult:
  parts = [info.name] + ([info.config_name] if info.config_name else []) + [info.version]
  final = os.path.abspath(os.path.join(out_dir, *parts))
  if os.path.abspath(dataset_dir) == final:
    raise ValueError(f"--out_dir={out_dir!r} would write into the source {dataset_dir!r}; "
                     "leave out_dir unset to convert in place.")
  if os.path.exists(final) and not overwrite:
    raise FileExistsError(f"{final} exists; pass overwrite=True (--overwrite) to replace it.")
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  staging = os.path.join(parent, f".{os.path.basename(final)}.incomplete-{uuid.uuid4().hex[:8]}")
  os.mkdir(staging)
  try:
    shards = _shards(info, dataset_dir, staging, "")
    _convert_all(shards, num_workers)
    for name in os.listdir(dataset_dir):
      # features.json, image/label metadata: everything but the info (rewritten) and the shards.
      if name.endswith((".json", ".txt")) and name != "dataset_info.json":
        shutil.copy(os.path.join(dataset_dir, name), staging)
    info.file_format = ARRAY_RECORD
    del info.alternative_file_formats[:]
    _write_info(info, staging)
    expected = _expected_episodes(shards)
    _check_readable(staging, expected)
    if os.path.exists(final):  # overwrite: the old copy goes only once the new one is complete.
      old = f"{staging}.old"
      os.replace(final, old)
      os.replace(staging, final)
      shutil.rmtree(old)
    else:
      os.replace(staging, final)
  finally:
    if os.path.exists(staging):
      shutil.rmtree(staging)
  return ConversionResult(final, expected, len(shards))


def convert_to_array_record(dataset_dir: str, out_dir: str | None = None, num_workers: int = 8,
                            overwrite: bool = False) -> ConversionResult:
  """Converts a published TFRecord RLDS dataset version directory to ArrayRecord.

  Args:
    dataset_dir: `<data_dir>/<name>/<version>` holding `dataset_info.json` and TFRecord shards.
    out_dir: None converts in place; otherwise the root of a new TFDS data dir.
    num_workers: shards converted in parallel (threads).
    overwrite: in place, rewrite existing ArrayRecord shards; with `out_dir`, replace an
      existing converted copy (the old one is removed only after the new one is complete).

  Raises:
    ConversionError: a shard failed (all failed shards are named) or the result did not open
      with the source's episode counts; nothing was published.
  """
  _import_tensorflow()
  dataset_dir = os.path.abspath(dataset_dir)
  info = _read_info(dataset_dir)
  source_format = _source_format(info)
  if source_format == ARRAY_RECORD:
    if out_dir is None:
      return _already_converted(info, dataset_dir)
    raise ValueError(f"{dataset_dir} is already ArrayRecord; copy it instead of converting.")
  if source_format != "tfrecord":
    raise ValueError(f"{dataset_dir} is stored as {source_format!r}; only TFRecord converts.")
  logging.info("Converting %s (%s) to ArrayRecord%s.", dataset_dir, source_format,
               f" under {out_dir}" if out_dir else " in place")
  if out_dir is None:
    return _convert_in_place(dataset_dir, info, num_workers, overwrite)
  return _convert_to_out_dir(dataset_dir, info, out_dir, num_workers, overwrite)
