"""Random access to LeRobot datasets (codebase versions v3.0 and v2.1) in a local directory.

A LeRobot dataset is `meta/info.json` (features with dtype/shape, fps, path templates), episode
metadata, tasks, `data/` parquet files (one row per frame) and, for cameras of dtype "video",
mp4 files under `videos/`. v2.1 keeps one parquet and one mp4 per episode
(`meta/episodes.jsonl`, `meta/tasks.jsonl`); v3.0 packs several episodes per file and says in
`meta/episodes/*.parquet` which data file and, per camera, which video file (and from which
time inside it) each episode uses, with `meta/tasks.parquet`.

`LeRobotDataset` yields the same episode/step records as `rlds.RldsDataset` (`len`, `episode(i)`
with `lowdim()`, `instruction(t)`, `image(t, camera)`, `where()`), so statistics, transforms
and the grain pipeline read both formats through one code path. The low-dimensional columns of
every frame are read once when the dataset is opened (pyarrow, no image column); images are
decoded only for the frames a sample needs: PNG bytes of "image" features with PIL, video
frames with PyAV at `from_timestamp + timestamp`, the frame LeRobot itself returns (the decoded
frame nearest that time, within `TIMESTAMP_TOLERANCE_S`).

The state and action features become the raw keys `observation/state` and `action` of the
dataset's `DatasetSpec`, which a `data.datasets` entry builds (`data/config.py`).
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from twinbrain_jax.data.oxe_registry import DatasetSpec
from twinbrain_jax.data.rlds import DataError

SUPPORTED_VERSIONS = ("v2.1", "v3.0")
INFO_FILE = os.path.join("meta", "info.json")
# LeRobot's own default tolerance between a requested and a decoded frame time.
TIMESTAMP_TOLERANCE_S = 1e-4
# The raw keys a LeRobot state and action feature are read as (those of `oxe_registry`'s specs).
STATE, ACTION = "observation/state", "action"
CAMERA_DTYPES = ("video", "image")


def standardize_as_recorded(raw: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """A LeRobot dataset's actions and states as recorded: `(actions [T, A], states [T, S])`."""
  return raw[ACTION].astype(np.float32), raw[STATE].astype(np.float32)


def dataset_spec(name: str, info: Mapping, cameras: Sequence[str], state: str,
                 action: str) -> DatasetSpec:
  """The schema of a LeRobot dataset read as recorded: every state and action dim normalised
  (q01..q99 -> [-1, 1]), none binarised; `image_shape` is the first camera's."""
  check_keys(info, name, "", cameras, state, action)
  features = info["features"]
  state_dim, action_dim = vector_size(features[state]), vector_size(features[action])
  return DatasetSpec(
      name=name, image_keys=tuple(cameras), image_shape=camera_shape(features[cameras[0]]),
      language_key="task", lowdim_keys={ACTION: (action_dim,), STATE: (state_dim,)},
      standardize=standardize_as_recorded, action_dim=action_dim, state_dim=state_dim,
      action_normalize_mask=(True,) * action_dim, action_binarize_mask=(False,) * action_dim,
      state_normalize_mask=(True,) * state_dim, registry_name="lerobot")


def read_info(path: str, name: str) -> dict:
  """`meta/info.json` of the dataset at `path`, with a clear error if it is absent or unreadable."""
  info_path = os.path.join(path, INFO_FILE)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Dataset directory {path!r} for dataset {name!r} does not exist; "
                            "fix data.data_dir or the entry's 'dir'.")
  if not os.path.isfile(info_path):
    raise DataError(f"Dataset {name!r}: {path!r} has no {INFO_FILE}; is it a LeRobot dataset "
                    "(the directory that holds meta/, data/ and videos/)?")
  try:
    with open(info_path) as f:
      info = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"Dataset {name!r}: cannot read {info_path!r}: {e}") from e
  version = info.get("codebase_version")
  if version not in SUPPORTED_VERSIONS:
    raise DataError(f"Dataset {name!r} at {path!r} has LeRobot codebase_version {version!r}; this "
                    f"reader supports {', '.join(SUPPORTED_VERSIONS)}. Convert it with LeRobot's "
                    "converters (src/lerobot/datasets/v30/ for v2.1 -> v3.0).")
  return info


def camera_shape(feature: Mapping) -> tuple[int, int]:
  """`(height, width)` of a camera feature (shape [H, W, C], or [C, H, W] as its names say)."""
  shape, names = list(feature["shape"]), list(feature.get("names") or [])
  if names[:1] == ["channels"] or (len(shape) == 3 and shape[0] == 3 and shape[2] != 3):
    return int(shape[1]), int(shape[2])
  return int(shape[0]), int(shape[1])


def vector_size(feature: Mapping) -> int:
  """Width of a 1-D feature (a shape-(1,) feature is a scalar column)."""
  return int(np.prod(feature["shape"]))


def check_keys(info: Mapping, name: str, path: str, cameras: Sequence[str], state: str,
               action: str) -> None:
  """Every configured key must be a feature of the right kind."""
  features = info.get("features", {})
  listing = ", ".join(f"{k} ({v.get('dtype')})" for k, v in features.items())
  for role, key, kinds in [("camera", c, CAMERA_DTYPES) for c in cameras] + [
      ("state", state, None), ("action", action, None)]:
    if key not in features:
      where = f" at {path!r}" if path else ""
      raise DataError(f"Dataset {name!r}{where}: the {role} key {key!r} is not among the "
                      f"features of {INFO_FILE}: {listing}. Fix the entry's "
                      f"{'cameras' if role == 'camera' else role!r}.")
    dtype = features[key].get("dtype")
    if kinds and dtype not in kinds:
      raise DataError(f"Dataset {name!r}: feature {key!r} has dtype {dtype!r}, not a camera "
                      f"({' or '.join(CAMERA_DTYPES)}).")
    if not kinds and (dtype in CAMERA_DTYPES or dtype == "string" or
                      len(features[key].get("shape", ())) != 1):
      raise DataError(f"Dataset {name!r}: the {role} feature {key!r} (dtype {dtype!r}, shape "
                      f"{features[key].get('shape')}) is not a 1-D numeric vector.")


def _read_parquet(path: str, name: str, columns: Sequence[str] | None = None):
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise DataError(f"Dataset {name!r}: missing parquet file {path!r}. Download the whole "
                    "dataset (data/ and meta/) again.")
  try:
    return pq.read_table(path, columns=list(columns) if columns is not None else None)
  except Exception as e:  # pyarrow raises ArrowInvalid/OSError for truncated or corrupt files.
    raise DataError(f"Dataset {name!r}: cannot read parquet file {path!r} (truncated or "
                    f"corrupt?): {e}") from e


def _read_jsonl(path: str, name: str) -> list[dict]:
  if not os.path.isfile(path):
    raise DataError(f"Dataset {name!r}: missing {path!r} (a v2.1 dataset needs it).")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _column(table, key: str) -> np.ndarray:
  """A parquet column as `[N, ...]` numpy (fixed-size lists become 2-D, scalars 1-D)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  column = table.column(key).combine_chunks()
  if pa.types.is_fixed_size_list(column.type) or pa.types.is_list(column.type):
    values = np.asarray(column.flatten().to_numpy(zero_copy_only=False))
    return values.reshape(len(column), -1)
  return np.asarray(column.to_numpy(zero_copy_only=False))


def _split_range(info: Mapping, split: str, num_episodes: int, name: str) -> range:
  splits = info.get("splits") or {"train": f"0:{num_episodes}"}
  if split not in splits:
    raise DataError(f"Dataset {name!r} has no split {split!r}; splits: {', '.join(splits)}.")
  start, stop = (int(x) for x in str(splits[split]).split(":"))
  return range(start, min(stop, num_episodes))


class LeRobotDataset:
  """The episodes of one split of a local LeRobot dataset, read by index.

  Attributes:
    spec: the schema the entry built (cameras = `spec.image_keys`, the LeRobot camera keys).
    path: the dataset directory (holding meta/).
    split: the split read (info.json's `splits`; all episodes if it has none).
    cameras: the camera keys in use (`spec.image_keys[:num_cameras]`).
    version: "v3.0" or "v2.1".
    fps: frames per second.
  """

  def __init__(self, path: str, spec: DatasetSpec, split: str = "train",
               num_cameras: int | None = None, *, state_key: str = "observation.state",
               action_key: str = "action"):
    self.path, self.spec, self.split = path, spec, split
    self.cameras = tuple(spec.image_keys[:num_cameras])
    self.state_key, self.action_key = state_key, action_key
    name = spec.name
    info = read_info(path, name)
    self.version, self.fps = info["codebase_version"], float(info["fps"])
    check_keys(info, name, path, self.cameras, state_key, action_key)
    self.features = info["features"]
    for key, role, dim in ((state_key, "state", spec.state_dim),
                           (action_key, "action", spec.action_dim)):
      if vector_size(self.features[key]) != dim:
        raise DataError(f"Dataset {name!r}: the {role} feature {key!r} has "
                        f"{vector_size(self.features[key])} dims, the entry's schema expects "
                        f"{dim}.")
    self._video_cameras = {c for c in self.cameras if self.features[c]["dtype"] == "video"}
    if self.version == "v3.0":
      episodes, self._tasks = self._v30_meta(info)
    else:
      episodes, self._tasks = self._v21_meta(info)
    self._read_frames(info, episodes)
    order = _split_range(info, split, len(self._episode_ids), name)
    self._episode_ids = self._episode_ids[order.start:order.stop]
    self._check_videos()

  # -- metadata -------------------------------------------------------------------------------

  def _v30_meta(self, info) -> tuple[dict, dict[int, str]]:
    """Episode table (column -> [E] values, sorted by episode index) and task strings."""
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    root = os.path.join(self.path, "meta", "episodes")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                   if f.endswith(".parquet"))
    if not files:
      raise DataError(f"Dataset {self.spec.name!r}: no episode metadata under {root!r} (a v3.0 "
                      "dataset keeps it in meta/episodes/chunk-XXX/file-XXX.parquet).")
    tables = [_read_parquet(f, self.spec.name) for f in files]
    wanted = ["episode_index", "length", "data/chunk_index", "data/file_index"] + [
        f"videos/{c}/{k}" for c in sorted(self._video_cameras)
        for k in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")]
    for table, file in zip(tables, files):
      for key in wanted:
        if key not in table.column_names:
          raise DataError(f"Dataset {self.spec.name!r}: episode metadata {file!r} has no column "
                          f"{key!r}.")
    table = pa.concat_tables([t.select(wanted) for t in tables])
    episodes = {k: _column(table, k) for k in wanted}
    order = np.argsort(episodes["episode_index"], kind="stable")
    episodes = {k: v[order] for k, v in episodes.items()}
    tasks_table = _read_parquet(os.path.join(self.path, "meta", "tasks.parquet"), self.spec.name)
    # pandas writes the task strings (the frame's index) as `task` or `__index_level_0__`.
    text_key = next((k for k in ("task", "__index_level_0__") if k in tasks_table.column_names),
                    None)
    if text_key is None or "task_index" not in tasks_table.column_names:
      raise DataError(f"Dataset {self.spec.name!r}: meta/tasks.parquet has columns "
                      f"{tasks_table.column_names}, expected task_index and task.")
    tasks = dict(zip(_column(tasks_table, "task_index").tolist(),
                     tasks_table.column(text_key).to_pylist()))
    return episodes, tasks

  def _v21_meta(self, info) -> tuple[dict, dict[int, str]]:
    meta = os.path.join(self.path, "meta")
    rows = sorted(_read_jsonl(os.path.join(meta, "episodes.jsonl"), self.spec.name),
                  key=lambda r: r["episode_index"])
    episodes = {"episode_index": np.array([r["episode_index"] for r in rows], np.int64),
                "length": np.array([r["length"] for r in rows], np.int64)}
    tasks = {int(r["task_index"]): r["task"]
             for r in _read_jsonl(os.path.join(meta, "tasks.jsonl"), self.spec.name)}
    return episodes, tasks

  def _data_file(self, info, episodes, row: int) -> str:
    episode = int(episodes["episode_index"][row])
    if self.version == "v3.0":
      rel = info["data_path"].format(chunk_index=int(episodes["data/chunk_index"][row]),
                                     file_index=int(episodes["data/file_index"][row]))
    else:
      rel = info["data_path"].format(episode_chunk=episode // int(info.get("chunks_size", 1000)),
                                     episode_index=episode)
    return os.path.join(self.path, rel)

  def _read_frames(self, info, episodes) -> None:
    """Reads the low-dimensional columns of every frame and each episode's rows."""
    name = self.spec.name
    columns = ["episode_index", "timestamp", "task_index", self.state_key, self.action_key]
    files = list(dict.fromkeys(self._data_file(info, episodes, r)
                               for r in range(len(episodes["episode_index"]))))
    parts = {k: [] for k in columns}
    file_ids, rows_in_file = [], []
    for file_id, file in enumerate(files):
      table = _read_parquet(file, name, columns)
      for key in columns:
        parts[key].append(_column(table, key))
      file_ids.append(np.full(table.num_rows, file_id, np.int32))
      rows_in_file.append(np.arange(table.num_rows, dtype=np.int64))
    frames = {k: np.concatenate(v) for k, v in parts.items()}
    self._files = files
    self._file_id, self._row_in_file = np.concatenate(file_ids), np.concatenate(rows_in_file)
    self._timestamp = frames["timestamp"].astype(np.float64).reshape(-1)
    self._task_index = frames["task_index"].astype(np.int64).reshape(-1)
    num_frames = len(self._timestamp)
    self._lowdim = {
        STATE: frames[self.state_key].astype(np.float32).reshape(num_frames, -1),
        ACTION: frames[self.action_key].astype(np.float32).reshape(num_frames, -1)}
    frame_episode = frames["episode_index"].astype(np.int64).reshape(-1)
    order = np.argsort(frame_episode, kind="stable")
    ids = episodes["episode_index"].astype(np.int64)
    starts = np.searchsorted(frame_episode[order], ids, side="left")
    stops = np.searchsorted(frame_episode[order], ids, side="right")
    for i, episode in enumerate(ids):
      found, expected = int(stops[i] - starts[i]), int(episodes["length"][i])
      if found != expected:
        raise DataError(f"Dataset {name!r}: episode {int(episode)} has {found} frames in the data "
                        f"files, its metadata says {expected}; the dataset is incomplete.")
    self._frame_order, self._starts, self._stops = order, starts, stops
    self._episode_ids = ids
    self._episode_meta = episodes
    self._info = info

  def _video(self, row: int, camera: str) -> tuple[str, float, float | None]:
    """(path, from_timestamp, to_timestamp or None) of `camera`'s video of episode row `row`."""
    episodes, info = self._episode_meta, self._info
    episode = int(episodes["episode_index"][row])
    if self.version == "v3.0":
      rel = info["video_path"].format(
          video_key=camera, chunk_index=int(episodes[f"videos/{camera}/chunk_index"][row]),
          file_index=int(episodes[f"videos/{camera}/file_index"][row]))
      return (os.path.join(self.path, rel), float(episodes[f"videos/{camera}/from_timestamp"][row]),
              float(episodes[f"videos/{camera}/to_timestamp"][row]))
    rel = info["video_path"].format(episode_chunk=episode // int(info.get("chunks_size", 1000)),
                                    video_key=camera, episode_index=episode)
    return os.path.join(self.path, rel), 0.0, None

  def _check_videos(self) -> None:
    """Every video file exists, and every frame's time lies inside its episode's span."""
    for row in range(len(self._episode_meta["episode_index"])):
      if self._stops[row] == self._starts[row]:
        continue
      last = float(self._timestamp[self._frame_order[self._stops[row] - 1]])
      for camera in sorted(self._video_cameras):
        path, start, stop = self._video(row, camera)
        if not os.path.isfile(path):
          raise DataError(f"Dataset {self.spec.name!r}: missing video file {path!r} (camera "
                          f"{camera!r}, episode {int(self._episode_meta['episode_index'][row])}). "
                          "Download the videos/ of the dataset too.")
        if stop is not None and start + last > stop + 0.5 / self.fps:
          raise DataError(
              f"Dataset {self.spec.name!r}: episode "
              f"{int(self._episode_meta['episode_index'][row])} has a frame at {last:.4f} s, "
              f"after the end of its part of {path!r} (from {start:.4f} s to {stop:.4f} s).")

  # -- episodes -------------------------------------------------------------------------------

  def __len__(self) -> int:
    return len(self._episode_ids)

  def episode(self, index: int) -> "LeRobotEpisode":
    if not 0 <= index < len(self):
      raise IndexError(f"Episode {index} of {len(self)} in dataset {self.spec.name!r}.")
    row = int(np.searchsorted(self._episode_meta["episode_index"], self._episode_ids[index]))
    frames = self._frame_order[self._starts[row]:self._stops[row]]
    return LeRobotEpisode(self, index, row, frames)

  # -- frames (`frame` = a row of the concatenated data files) ---------------------------------

  def episode_index(self, row: int) -> int:
    return int(self._episode_meta["episode_index"][row])

  def lowdim(self, frames: np.ndarray) -> dict[str, np.ndarray]:
    return {key: values[frames] for key, values in self._lowdim.items()}

  def timestamp(self, frame: int) -> float:
    return float(self._timestamp[frame])

  def instruction(self, frame: int) -> str:
    task_index = int(self._task_index[frame])
    if task_index not in self._tasks:
      raise DataError(f"Dataset {self.spec.name!r}: task_index {task_index} is not in the tasks "
                      "of meta/.")
    return self._tasks[task_index]

  def image(self, row: int, frame: int, camera: str, where: str) -> np.ndarray:
    """`[h, w, 3]` uint8 image of `camera` at `frame` of the episode at metadata row `row`."""
    if camera not in self.cameras:
      raise DataError(f"{where}: camera {camera!r} is not one of {self.cameras}.")
    if camera in self._video_cameras:
      path, start, _ = self._video(row, camera)
      image = decode_video_frame(path, start + self.timestamp(frame), where=where)
    else:
      encoded = _image_bytes(self._files[self._file_id[frame]], camera,
                             int(self._row_in_file[frame]))
      try:
        image = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
      except Exception as e:
        raise DataError(f"{where}: cannot decode the image: {e}") from e
    expected = camera_shape(self.features[camera]) + (3,)
    if image.shape != expected:
      raise DataError(f"{where}: image shape {image.shape}, expected {expected}.")
    return image


class LeRobotEpisode:
  """One episode of a `LeRobotDataset`; the same interface as `rlds.Episode`.

  Attributes:
    index: the episode's position in the split.
    episode_index: LeRobot's own index of the episode.
    episode_id: "episode <episode_index>".
  """

  def __init__(self, dataset: LeRobotDataset, index: int, row: int, frames: np.ndarray):
    self._dataset, self.index, self._row, self._frames = dataset, index, row, frames
    self.episode_index = dataset.episode_index(row)
    self.episode_id = f"episode {self.episode_index}"

  @property
  def spec(self) -> DatasetSpec:
    return self._dataset.spec

  def __len__(self) -> int:
    return len(self._frames)

  def where(self) -> str:
    return (f"dataset {self._dataset.spec.name!r}, episode {self.index} "
            f"(episode_index={self.episode_index})")

  def lowdim(self) -> dict[str, np.ndarray]:
    """`{"observation/state": [T, S], "action": [T, A]}` float32."""
    return self._dataset.lowdim(self._frames)

  def timestamp(self, t: int) -> float:
    return self._dataset.timestamp(int(self._frames[t]))

  def instruction(self, t: int = 0) -> str:
    return self._dataset.instruction(int(self._frames[t]))

  def image(self, t: int, camera: str) -> np.ndarray:
    """Decoded `[h, w, 3]` uint8 frame of `camera` at step `t`."""
    return self._dataset.image(self._row, int(self._frames[t]), camera,
                               where=f"{self.where()}, camera {camera!r}, step {t}")


@functools.lru_cache(maxsize=4)
def _row_groups(path: str) -> tuple:
  """`(ParquetFile, first row of each row group)` of a data file (cached per process)."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  parquet = pq.ParquetFile(path)
  sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
  return parquet, np.concatenate([[0], np.cumsum(sizes)])


@functools.lru_cache(maxsize=8)
def _row_group_images(path: str, camera: str, group: int) -> list:
  parquet, _ = _row_groups(path)
  return parquet.read_row_group(group, columns=[camera]).column(camera).to_pylist()


def _image_bytes(path: str, camera: str, row: int) -> bytes:
  """The PNG bytes of an "image" feature (`struct<bytes, path>`) at `row` of a data file."""
  try:
    _, offsets = _row_groups(path)
    group = int(np.searchsorted(offsets, row, side="right") - 1)
    value = _row_group_images(path, camera, group)[row - int(offsets[group])]
  except Exception as e:
    raise DataError(f"Cannot read image {camera!r} at row {row} of {path!r}: {e}") from e
  if isinstance(value, dict):
    if value.get("bytes") is None:
      raise DataError(f"Image {camera!r} at row {row} of {path!r} has no embedded bytes (path "
                      f"{value.get('path')!r}); datasets with external image files are not read.")
    return value["bytes"]
  return value


def decode_video_frame(path: str, time_s: float, *, where: str = "",
                       tolerance_s: float = TIMESTAMP_TOLERANCE_S) -> np.ndarray:
  """The frame of the video at `path` shown at `time_s`: `[H, W, 3]` uint8 RGB.

  Seeks to the key frame before `time_s` and decodes forward to the frame whose time is within
  `tolerance_s` of it, as LeRobot's PyAV reader does (its frames converted with the same
  `rgb24` conversion), so both return the same pixels.
  """
  import av  # pylint: disable=g-import-not-at-top
  context = f"{where}: " if where else ""
  if not os.path.isfile(path):
    raise DataError(f"{context}missing video file {path!r}.")
  try:
    with av.open(path) as container:
      stream = container.streams.video[0]
      # One decoding thread: parallelism comes from reader threads and workers (dav1d's own
      # threads oversubscribe the cores: docs/data.md, benchmarks).
      stream.codec_context.thread_count = 1
      container.seek(max(0, int(time_s / stream.time_base)), stream=stream, backward=True,
                     any_frame=False)
      last = None
      for frame in container.decode(stream):
        if frame.time is None:
          continue
        if abs(frame.time - time_s) < tolerance_s:
          return frame.to_ndarray(format="rgb24")
        if frame.time > time_s:
          break
        last = frame.time
  except av.FFmpegError as e:
    raise DataError(f"{context}cannot decode {path!r} at {time_s:.4f} s: {e}") from e
  raise DataError(f"{context}no frame at {time_s:.4f} s in {path!r} (the nearest earlier frame "
                  f"is at {last if last is None else f'{last:.4f} s'}); the frame timestamp "
                  "lies outside its video or between its frames.")


# -- writing ------------------------------------------------------------------------------------

# Columns every LeRobot frame carries besides its features (LeRobot's DEFAULT_FEATURES).
_FRAME_COLUMNS = {"timestamp": "float32", "frame_index": "int64", "episode_index": "int64",
                  "index": "int64", "task_index": "int64"}
_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"


_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
# LeRobot's own encoder settings: AV1 (SVT-AV1 preset 12), a key frame every 2 frames, crf 30.
_VIDEO_CODEC, _VIDEO_OPTIONS = "libsvtav1", {"g": "2", "crf": "30", "preset": "12"}


class LeRobotWriter:
  """Writes a LeRobot v3.0 dataset: cameras as PNG "image" features (lossless) or, with
  `video=True`, as AV1 videos encoded as LeRobot encodes them (one mp4 per episode and camera;
  lossy), states and actions as float32 vectors; one data file, one episode-metadata file,
  `meta/tasks.parquet` and `meta/info.json` (no `meta/stats.json`: the project computes its
  own statistics).

  Use: `add_episode(...)` per episode, then `close()`; `close()` writes the metadata, so a
  directory without `meta/info.json` is an incomplete one.
  """

  def __init__(self, path: str, *, fps: int, cameras: Mapping[str, tuple[int, int]],
               state_dim: int, action_dim: int, robot_type: str | None = None,
               state_key: str = "observation.state", action_key: str = "action",
               video: bool = False):
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    self.path, self.fps, self.cameras, self.video = path, fps, dict(cameras), video
    self._keys = (state_key, action_key)
    self._dims = {state_key: state_dim, action_key: action_dim}
    self._robot_type = robot_type
    self._tasks: dict[str, int] = {}
    self._episodes: list[dict] = []
    self._frames = 0
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    self._schema = pa.schema(
        [(key, image) for key in self.cameras if not video]
        + [(key, pa.list_(pa.float32(), dim)) for key, dim in self._dims.items()]
        + [(key, pa.float32() if dtype == "float32" else pa.int64())
           for key, dtype in _FRAME_COLUMNS.items()])
    data_file = os.path.join(path, _DATA_PATH.format(chunk_index=0, file_index=0))
    os.makedirs(os.path.dirname(data_file), exist_ok=True)
    self._writer = pq.ParquetWriter(data_file, self._schema, compression="snappy")

  def add_episode(self, images: Mapping[str, Sequence], states: np.ndarray,
                  actions: np.ndarray, tasks: Sequence[str]) -> None:
    """One episode: per camera `T` PNG-encoded bytes (or `[H, W, 3]` uint8 arrays), states
    `[T, S]`, actions `[T, A]`, a task string per frame."""
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    length = len(tasks)
    if length == 0:
      raise ValueError("An episode needs at least one frame.")
    columns, episode = {}, len(self._episodes)
    videos = {}
    for key in self.cameras:
      frames = images[key]
      if len(frames) != length:
        raise ValueError(f"Camera {key!r} has {len(frames)} frames for {length} steps.")
      if self.video:
        videos.update(self._encode(key, episode, frames))
      else:
        columns[key] = [{"bytes": f if isinstance(f, bytes) else _png_bytes(f), "path": None}
                        for f in frames]
    for key, values in zip(self._keys, (states, actions)):
      values = np.asarray(values, np.float32)
      if values.shape != (length, self._dims[key]):
        raise ValueError(f"{key!r} has shape {values.shape}, expected ({length}, "
                         f"{self._dims[key]}).")
      columns[key] = list(values)
    task_index = [self._tasks.setdefault(task, len(self._tasks)) for task in tasks]
    columns.update(timestamp=np.arange(length, dtype=np.float32) / np.float32(self.fps),
                   frame_index=np.arange(length), episode_index=np.full(length, episode),
                   index=self._frames + np.arange(length), task_index=np.asarray(task_index))
    self._writer.write_table(pa.table(columns, schema=self._schema))
    self._episodes.append({"episode_index": episode, "tasks": list(dict.fromkeys(tasks)),
                           "length": length, "data/chunk_index": 0, "data/file_index": 0,
                           "dataset_from_index": self._frames,
                           "dataset_to_index": self._frames + length,
                           "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
                           **videos})
    self._frames += length

  def _encode(self, key: str, episode: int, frames: Sequence) -> dict:
    """Encodes one camera's frames of one episode; returns its episode-metadata columns."""
    import av  # pylint: disable=g-import-not-at-top
    chunk, file = divmod(episode, 1000)
    path = os.path.join(self.path, _VIDEO_PATH.format(video_key=key, chunk_index=chunk,
                                                      file_index=file))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    height, width = self.cameras[key]
    with av.open(path, "w") as container:
      stream = container.add_stream(_VIDEO_CODEC, self.fps, options=dict(_VIDEO_OPTIONS))
      stream.pix_fmt, stream.width, stream.height = "yuv420p", width, height
      for frame in frames:
        image = (np.asarray(Image.open(io.BytesIO(frame)).convert("RGB"))
                 if isinstance(frame, bytes) else np.asarray(frame, np.uint8))
        container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
      container.mux(stream.encode())
    prefix = f"videos/{key}/"
    return {prefix + "chunk_index": chunk, prefix + "file_index": file,
            prefix + "from_timestamp": 0.0, prefix + "to_timestamp": len(frames) / self.fps}

  def close(self) -> None:
    """Finishes the data file and writes the episode metadata, tasks and info.json (last)."""
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    self._writer.close()
    meta = os.path.join(self.path, "meta")
    episodes_file = os.path.join(meta, "episodes", "chunk-000", "file-000.parquet")
    os.makedirs(os.path.dirname(episodes_file), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(self._episodes), episodes_file)
    # LeRobot reads the tasks with pandas and takes the task string from the frame's index.
    tasks = pa.table({"task_index": pa.array(list(self._tasks.values()), pa.int64()),
                      "task": pa.array(list(self._tasks), pa.string())})
    pandas_index = {"index_columns": ["task"], "column_indexes": [], "columns": [
        {"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
         "numpy_type": "int64", "metadata": None},
        {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object",
         "metadata": None}]}
    tasks = tasks.replace_schema_metadata({"pandas": json.dumps(pandas_index)})
    pq.write_table(tasks, os.path.join(meta, "tasks.parquet"))
    features = {key: {"dtype": "video" if self.video else "image", "shape": [h, w, 3],
                      "names": ["height", "width", "channels"]}
                for key, (h, w) in self.cameras.items()}
    features.update({key: {"dtype": "float32", "shape": [dim], "names": None}
                     for key, dim in self._dims.items()})
    features.update({key: {"dtype": dtype, "shape": [1], "names": None}
                     for key, dtype in _FRAME_COLUMNS.items()})
    info = {"codebase_version": "v3.0", "robot_type": self._robot_type,
            "total_episodes": len(self._episodes), "total_frames": self._frames,
            "total_tasks": len(self._tasks), "chunks_size": 1000, "data_files_size_in_mb": 100,
            "video_files_size_in_mb": 200, "fps": self.fps,
            "splits": {"train": f"0:{len(self._episodes)}"}, "data_path": _DATA_PATH,
            "video_path": _VIDEO_PATH if self.video else None, "features": features}
    with open(os.path.join(self.path, INFO_FILE), "w") as f:
      json.dump(info, f, indent=2)


def _png_bytes(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def copy_episodes(source, path: str, *, fps: int, video: bool = True) -> str:
  """Writes every episode of an episode source (e.g. an `rlds.RldsDataset` whose schema reads
  `action` and `observation/state`) as a LeRobot v3.0 dataset at `path`: its cameras in use
  (`source.cameras`, keyed `observation.images.<camera>`), raw state and action, instruction
  per step. Returns `path`."""
  spec = source.spec
  missing = {ACTION, STATE} - set(spec.lowdim_keys)
  if missing:
    raise ValueError(f"Dataset {spec.name!r} reads {sorted(spec.lowdim_keys)}; copying needs "
                     f"{ACTION!r} and {STATE!r}.")
  cameras = {f"observation.images.{c}": c for c in source.cameras}
  writer = LeRobotWriter(path, fps=fps, video=video,
                         cameras={key: tuple(spec.image_shape) for key in cameras},
                         state_dim=spec.lowdim_keys[STATE][0],
                         action_dim=spec.lowdim_keys[ACTION][0])
  for index in range(len(source)):
    episode = source.episode(index)
    steps = range(len(episode))
    raw = episode.lowdim()
    writer.add_episode({key: [episode.image(t, camera) for t in steps]
                        for key, camera in cameras.items()},
                       raw[STATE], raw[ACTION], [episode.instruction(t) for t in steps])
  writer.close()
  return path
