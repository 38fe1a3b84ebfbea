"""Per-dataset action/state statistics, normalisation to [-1, 1] and its inverse.

Statistics are computed over standardised actions and states only (never images), vectorised
over all steps at once. They are written as JSON next to the data
(`<dataset dir>/norm_stats.<split>.json`) and belong in every training checkpoint, because the
inverse transform at inference must use the statistics the model was trained with.

Normalisation per dim (`normalize_mask` True): `y = clip(2 (x - q01) / (q99 - q01) - 1, -1, 1)`;
a dim with q99 == q01 maps to 0. Dims in `binarize_mask` (grippers) become `x > 0.5` in {0, 1}.
Other dims pass through. `unnormalize` inverts exactly every value inside [q01, q99].
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence

import numpy as np

from twinbrain_jax.data.rlds import DataError, EmptyEpisodeError, Episode, RldsDataset

STATS_VERSION = 2


@dataclasses.dataclass
class ArrayStats:
  """Per-dimension statistics of `[N, D]` values (all `[D]` float32 arrays)."""
  mean: np.ndarray
  std: np.ndarray
  min: np.ndarray
  max: np.ndarray
  q01: np.ndarray
  q99: np.ndarray
  count: int

  @classmethod
  def compute(cls, values: np.ndarray) -> "ArrayStats":
    """Statistics of `values [N, D]`, accumulated in float64."""
    values = np.asarray(values, np.float64)
    if values.ndim != 2 or values.shape[0] == 0:
      raise ValueError(f"Statistics need a non-empty [N, D] array, got shape {values.shape}.")
    q01, q99 = np.quantile(values, [0.01, 0.99], axis=0)
    f32 = lambda x: np.asarray(x, np.float32)
    return cls(mean=f32(values.mean(0)), std=f32(values.std(0)), min=f32(values.min(0)),
               max=f32(values.max(0)), q01=f32(q01), q99=f32(q99), count=int(values.shape[0]))

  def to_json(self) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v)
            for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_json(cls, d: dict) -> "ArrayStats":
    return cls(**{k: (int(v) if k == "count" else np.asarray(v, np.float32))
                  for k, v in d.items()})


@dataclasses.dataclass
class DatasetStatistics:
  """Statistics of one dataset split plus the step index the pipeline samples from.

  Attributes:
    dataset: registry name.
    split: TFDS split.
    action: stats of standardised actions `[A]`.
    state: stats of standardised states `[S]`.
    episode_lengths: standardised number of steps of every episode (0 for skipped ones).
    skipped: record index (as str, JSON keys) -> why the malformed episode was skipped
      (only with `skip_bad_episodes`).
    empty: record index -> why the episode has no step to train on (always skipped).
    spec: the registry entry's description at computation time.
    num_records: number of episodes in the split when computed.
    standardized: optional `[num_steps, A + S]` float32 standardised actions ‖ states of all
      kept episodes in order, saved as `<stats>.steps.npy` and memory-mapped by the pipeline so
      a sample never re-decodes a whole episode's low-dimensional data.
  """
  dataset: str
  split: str
  action: ArrayStats
  state: ArrayStats
  episode_lengths: list[int]
  skipped: dict[str, str]
  empty: dict[str, str]
  spec: dict
  num_records: int
  standardized: np.ndarray | None = dataclasses.field(default=None, repr=False)

  def __getstate__(self):
    # Worker processes re-open the memory map instead of receiving a pickled copy.
    state = dict(self.__dict__)
    if isinstance(self.standardized, np.memmap):
      state["standardized"] = ("memmap", self.standardized.filename)
    return state

  def __setstate__(self, state):
    if isinstance(state.get("standardized"), tuple):
      state["standardized"] = np.load(state["standardized"][1], mmap_mode="r")
    self.__dict__.update(state)

  @property
  def num_steps(self) -> int:
    return int(sum(self.episode_lengths))

  def to_json(self) -> dict:
    return dict(version=STATS_VERSION, dataset=self.dataset, split=self.split,
                action=self.action.to_json(), state=self.state.to_json(),
                episode_lengths=list(map(int, self.episode_lengths)), skipped=self.skipped,
                empty=self.empty, spec=self.spec, num_records=self.num_records)

  @classmethod
  def from_json(cls, d: dict) -> "DatasetStatistics":
    if d.get("version") != STATS_VERSION:
      raise ValueError(f"Norm stats version {d.get('version')} != {STATS_VERSION}; recompute them "
                       "with scripts/compute_norm_stats.py.")
    return cls(dataset=d["dataset"], split=d["split"], action=ArrayStats.from_json(d["action"]),
               state=ArrayStats.from_json(d["state"]),
               episode_lengths=[int(x) for x in d["episode_lengths"]],
               skipped=dict(d["skipped"]), empty=dict(d["empty"]), spec=d["spec"],
               num_records=int(d["num_records"]))

  def save(self, path: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if self.standardized is not None:
      tmp = f"{path}.tmp{os.getpid()}.npy"
      np.save(tmp, np.asarray(self.standardized, np.float32))
      os.replace(tmp, _steps_path(path))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(self.to_json(), f)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "DatasetStatistics":
    with open(path) as f:
      stats = cls.from_json(json.load(f))
    steps = _steps_path(path)
    if os.path.exists(steps):
      standardized = np.load(steps, mmap_mode="r")
      width = len(stats.action.mean) + len(stats.state.mean)
      if standardized.shape == (stats.num_steps, width):
        stats.standardized = standardized
    return stats


def _steps_path(stats_json: str) -> str:
  return stats_json[:-len(".json")] + ".steps.npy"


def stats_path(dataset_dir: str, split: str, stats_dir: str | None = None,
               dataset: str | None = None) -> str:
  """Where the statistics of a split live: next to the data, or in `stats_dir/<dataset>/`."""
  if stats_dir:
    return os.path.join(stats_dir, dataset or os.path.basename(os.path.dirname(dataset_dir)),
                        f"norm_stats.{split}.json")
  return os.path.join(dataset_dir, f"norm_stats.{split}.json")


def standardized_episode(episode: Episode) -> tuple[np.ndarray, np.ndarray]:
  """`(actions [T', A], states [T', S])` of one episode, validated.

  Raises:
    EmptyEpisodeError: no step to train on (0 raw steps, or none after standardisation, e.g. a
      1-step bridge episode once the last step is dropped).
    DataError: a malformed episode (missing key, wrong shape, non-finite value).
  """
  spec = episode.spec
  if len(episode) == 0:
    raise EmptyEpisodeError(f"{episode.where()}: empty episode (0 steps).")
  raw = episode.lowdim()
  for key, array in raw.items():
    if not np.all(np.isfinite(array)):
      bad = np.argwhere(~np.isfinite(array))[0]
      raise DataError(f"{episode.where()}, key 'steps/{key}': non-finite value "
                      f"{array[tuple(bad)]} at step {bad[0]}.")
  actions, states = spec.standardize(raw)
  if actions.shape[0] == 0:
    raise EmptyEpisodeError(f"{episode.where()}: no steps left after standardisation "
                            f"({len(episode)} raw steps).")
  if actions.shape[1:] != (spec.action_dim,) or states.shape[1:] != (spec.state_dim,):
    raise DataError(f"{episode.where()}: standardised actions {actions.shape} / states "
                    f"{states.shape}, expected [T, {spec.action_dim}] / [T, {spec.state_dim}].")
  return actions, states


def compute_dataset_statistics(dataset: RldsDataset, skip_bad_episodes: bool = False,
                               log_every: int = 0) -> DatasetStatistics:
  """One pass over every episode's low-dimensional arrays; images are never decoded.

  Empty episodes are skipped and recorded in `empty`; malformed ones are an error unless
  `skip_bad_episodes`, which records them in `skipped`.
  """
  actions, states, lengths, skipped, empty = [], [], [], {}, {}
  start = time.perf_counter()
  for index in range(len(dataset)):
    try:
      a, s = standardized_episode(dataset.episode(index))
    except EmptyEpisodeError as e:
      empty[str(index)] = str(e)
      lengths.append(0)
      continue
    except DataError as e:
      if not skip_bad_episodes:
        raise DataError(f"{e} Fix the data or set data.skip_bad_episodes=True to skip (and "
                        "count) bad episodes.") from e
      skipped[str(index)] = str(e)
      lengths.append(0)
      continue
    actions.append(a)
    states.append(s)
    lengths.append(a.shape[0])
    if log_every and (index + 1) % log_every == 0:
      logging.info("%s: %d/%d episodes, %.1fs", dataset.spec.name, index + 1, len(dataset),
                   time.perf_counter() - start)
  if not actions:
    raise DataError(f"Dataset {dataset.spec.name!r} at {dataset.path!r}: no usable episode "
                    f"({len(empty)} empty, {len(skipped)} skipped as bad).")
  if empty:
    logging.warning("%s: %d of %d episodes have no step to train on and are skipped (e.g. %s).",
                    dataset.spec.name, len(empty), len(dataset), next(iter(empty.values())))
  if skipped:
    logging.warning("%s: skipped %d bad episodes of %d.", dataset.spec.name, len(skipped),
                    len(dataset))
  actions, states = np.concatenate(actions), np.concatenate(states)
  return DatasetStatistics(
      dataset=dataset.spec.name, split=dataset.split,
      action=ArrayStats.compute(actions), state=ArrayStats.compute(states),
      episode_lengths=lengths, skipped=skipped, empty=empty, spec=dataset.spec.description(),
      num_records=len(dataset), standardized=np.concatenate([actions, states], axis=1))


def load_or_compute_statistics(dataset: RldsDataset, *, stats_dir: str | None = None,
                               skip_bad_episodes: bool = False,
                               recompute: bool = False) -> DatasetStatistics:
  """Reads the statistics JSON of `dataset` or computes and writes it.

  A file that was computed for another standardisation or episode count is an error, not
  silently reused.
  """
  path = stats_path(dataset.path, dataset.split, stats_dir, dataset.spec.name)
  if os.path.exists(path) and not recompute:
    stats = DatasetStatistics.load(path)
    json_spec = json.loads(json.dumps(dataset.spec.description()))
    if stats.spec != json_spec or stats.num_records != len(dataset):
      raise DataError(
          f"Norm stats {path!r} were computed for another version of dataset "
          f"{dataset.spec.name!r} ({stats.num_records} episodes, spec {stats.spec}); now "
          f"{len(dataset)} episodes, spec {json_spec}. Recompute them with "
          "scripts/compute_norm_stats.py --recompute.")
    if stats.skipped and not skip_bad_episodes:
      raise DataError(
          f"Norm stats {path!r} skip {len(stats.skipped)} bad episodes of {dataset.spec.name!r} "
          f"(e.g. {next(iter(stats.skipped.values()))}); set data.skip_bad_episodes=True to "
          "accept that.")
    return stats
  stats = compute_dataset_statistics(dataset, skip_bad_episodes=skip_bad_episodes)
  try:
    stats.save(path)
  except OSError as e:  # Read-only data directories are common on clusters.
    logging.warning("Could not write norm stats to %s (%s); set data.stats_dir.", path, e)
    return stats
  return DatasetStatistics.load(path)


def _as_mask(mask: Sequence[bool] | np.ndarray | None, dim: int) -> np.ndarray:
  if mask is None:
    return np.ones(dim, bool)
  mask = np.asarray(mask, bool)
  if mask.shape != (dim,):
    raise ValueError(f"Mask of shape {mask.shape} for {dim} dims.")
  return mask


def _masks(normalize_mask, binarize_mask, dim: int) -> tuple[np.ndarray, np.ndarray]:
  """[D] bool masks: normalise every dim by default, binarise none."""
  binarize = np.zeros(dim, bool) if binarize_mask is None else _as_mask(binarize_mask, dim)
  return _as_mask(normalize_mask, dim), binarize


def normalize(x: np.ndarray, stats: ArrayStats, normalize_mask=None,
              binarize_mask=None) -> np.ndarray:
  """`x [..., D]` -> normalised float32 (see the module docstring)."""
  x = np.asarray(x, np.float32)
  dim = x.shape[-1]
  normalize_mask, binarize_mask = _masks(normalize_mask, binarize_mask, dim)
  low, high = stats.q01, stats.q99
  span = high - low
  scaled = 2.0 * (x - low) / np.where(span > 0, span, 1.0) - 1.0
  scaled = np.where(span > 0, np.clip(scaled, -1.0, 1.0), 0.0)
  out = np.where(normalize_mask, scaled, x)
  out = np.where(binarize_mask, (x > 0.5).astype(np.float32), out)
  return out.astype(np.float32)


def unnormalize(y: np.ndarray, stats: ArrayStats, normalize_mask=None,
                binarize_mask=None) -> np.ndarray:
  """Inverse of `normalize` for model outputs `y [..., D]` (values clipped to [-1, 1] first)."""
  y = np.asarray(y, np.float32)
  dim = y.shape[-1]
  normalize_mask, binarize_mask = _masks(normalize_mask, binarize_mask, dim)
  low, high = stats.q01, stats.q99
  x = (np.clip(y, -1.0, 1.0) + 1.0) / 2.0 * (high - low) + low
  out = np.where(normalize_mask, x, y)
  out = np.where(binarize_mask, (y > 0.5).astype(np.float32), out)
  return out.astype(np.float32)
