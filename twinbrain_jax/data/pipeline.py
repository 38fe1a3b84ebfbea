"""The grain input pipeline: step-level samples from a weighted mixture of RLDS and LeRobot
datasets (`rlds.RldsDataset`, `lerobot.LeRobotDataset`: the same episode/step interface).

Layout (all `grain.MapDataset`, i.e. random access, until the final iterator):

  per dataset d:  range(num_steps_d) -> global shuffle (reshuffled every epoch) -> repeat
  mixture:        MapDataset.mix(datasets, weights)           (endless; or concatenation)
  sample:         random_map(SampleBuilder)                   seeded per global index
  host batches:   blocks of `batch_size / process_count` consecutive samples, every
                  `process_count`-th block from block `process_index` on

Global batch b is samples [b * batch_size, (b + 1) * batch_size); process p builds only rows
[p * m, (p + 1) * m) of it (m = batch_size / process_count), so the processes' shards are
disjoint, together complete, and their concatenation in process order (what
`jax.make_array_from_process_local_data` assembles) is exactly the batch one process would build.
Because everything before the iterator is a deterministic function of the global index, the
iterator state is just the number of batches consumed (plus a fingerprint of the configuration),
and it is the same in every process: a restored run sees exactly the batches it would have seen,
with any number of worker processes and any number of JAX processes.

Worker processes (`num_workers > 0`) need absl flags parsed in the main process
(`absl.flags.FLAGS.mark_as_parsed()` or `app.run`) and an `if __name__ == "__main__"` guard.

Sample keys (one element; the batch adds a leading `[B]`):
  image          uint8   [H, W, 3]; [n_cams, H, W, 3] if num_cameras > 1; a leading [T_obs]
                         if obs_history > 1
  image_mask     bool    [n_cams]          (num_cameras > 1) False = camera absent (zeros)
  history_mask   bool    [T_obs]           (obs_history > 1) False = before the episode start
  state          float32 [S]               normalised, zero-padded to data.state_dim
  actions        float32 [H, A]            normalised, zero-padded to data.action_dim
  action_mask    bool    [H]               True = a real step, False = past the episode end
  instruction    str
  dataset_id     int32                     position in data.datasets
  episode_index  int32, step_index int32   where the sample comes from (record index in the split,
                                           step after standardisation)
  episode_id     str                       the episode's own id (episode_metadata episode_id or
                                           file_path; "record <i>" if the dataset has neither)
  <text key>     str                       every `text_keys` of the mixture's specs (e.g. the
                                           VQA `answer`); "" for a dataset without it

A dataset without actions (`action_dim` 0, question-answer data) gives samples whose
`action_mask` is all False: in a co-training mixture they add no flow-matching target.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from twinbrain_jax.data import config as data_config
from twinbrain_jax.data import lerobot, normalization, oxe_registry, rlds, transforms
from twinbrain_jax.data.normalization import DatasetStatistics


class PipelineStateError(ValueError):
  """An iterator state that does not belong to this pipeline configuration."""


@dataclasses.dataclass
class _DatasetEntry:
  """Everything a worker needs to build samples of one dataset (picklable)."""
  dataset_id: int
  source: rlds.RldsDataset | lerobot.LeRobotDataset
  stats: DatasetStatistics
  step_offsets: np.ndarray  # [num_episodes + 1] cumulative standardised lengths.

  @property
  def spec(self) -> oxe_registry.DatasetSpec:
    return self.source.spec

  def locate(self, flat_index: int) -> tuple[int, int]:
    """Flat step index -> (episode, step)."""
    episode = int(np.searchsorted(self.step_offsets, flat_index, side="right") - 1)
    return episode, int(flat_index - self.step_offsets[episode])


class _Tag(grain.transforms.Map):
  """Step index -> (dataset id, step index)."""

  def __init__(self, dataset_id: int):
    self._dataset_id = dataset_id

  def map(self, element):
    return self._dataset_id, int(element)


class SampleBuilder(grain.transforms.RandomMap):
  """(dataset id, flat step index) -> one training sample (see the module docstring)."""

  def __init__(self, entries: Sequence[_DatasetEntry], config: ml_collections.ConfigDict,
               train: bool, state_dim: int, action_dim: int):
    self._entries = list(entries)
    self._size = tuple(config.image_size)
    self._pad_multiple = int(config.pad_to_multiple)
    self._num_cameras = int(config.num_cameras)
    self._history = int(config.obs_history)
    self._horizon = int(config.action_horizon)
    self._pad_mode = config.pad_mode
    self._drop_instruction = bool(config.get("drop_instruction", False))
    self._augment = config.augment.to_dict() if (train and config.augment.enabled) else None
    self._state_dim, self._action_dim = state_dim, action_dim
    self._text_keys = sorted({key for e in self._entries for key in e.spec.text_keys})

  def random_map(self, element, rng: np.random.Generator) -> dict[str, Any]:
    dataset_id, flat_index = element
    entry = self._entries[dataset_id]
    episode_index, t = entry.locate(flat_index)
    episode = entry.source.episode(episode_index)  # Steps (and images) are decoded lazily.
    spec, stats = entry.spec, entry.stats
    if stats.standardized is not None:  # Memory-mapped from the statistics pass.
      start, stop = entry.step_offsets[episode_index], entry.step_offsets[episode_index + 1]
      steps = np.asarray(stats.standardized[start:stop])
      actions, states = steps[:, :spec.action_dim], steps[:, spec.action_dim:]
    else:
      actions, states = normalization.standardized_episode(episode)
    actions = normalization.normalize(actions, stats.action, spec.action_normalize_mask,
                                      spec.action_binarize_mask)
    chunk, action_mask = transforms.action_chunk(actions, t, self._horizon, self._pad_mode)
    if spec.action_dim == 0:
      action_mask = np.zeros_like(action_mask)
    sample = {
        "image": self._images(episode, entry.source.cameras, t, rng),
        "state": model_state(states[t], stats.state, spec, self._state_dim),
        "actions": _pad_last(chunk, self._action_dim),
        "action_mask": action_mask,
        "instruction": "" if self._drop_instruction else episode.instruction(t),
        "dataset_id": np.int32(dataset_id),
        "episode_id": episode.episode_id,
        "episode_index": np.int32(episode_index),
        "step_index": np.int32(t),
    }
    for key in self._text_keys:
      sample[key] = episode.text(t, key) if key in spec.text_keys else ""
    if self._num_cameras > 1:
      sample["image_mask"] = np.arange(self._num_cameras) < len(entry.source.cameras)
    if self._history > 1:
      sample["history_mask"] = transforms.history_steps(t, self._history)[1]
    return sample

  def _images(self, episode: rlds.Episode | lerobot.LeRobotEpisode,
              camera_keys: tuple[str, ...], t: int, rng) -> np.ndarray:
    steps, _ = transforms.history_steps(t, self._history)
    cameras = []
    for camera in range(self._num_cameras):
      # One seed per camera: every history frame of a camera gets the same augmentation.
      camera_seed = int(rng.integers(2**63))
      frames = []
      for step in steps:
        if camera >= len(camera_keys):
          frames.append(np.zeros(self._size + (3,), np.uint8))
          continue
        raw = episode.image(int(step), camera_keys[camera])
        frames.append(self._process(raw, np.random.default_rng(camera_seed)))
      cameras.append(np.stack(frames))
    images = np.stack(cameras, axis=1)  # [T_obs, n_cams, H, W, 3]
    images = transforms.pad_to_multiple(images, self._pad_multiple)
    if self._num_cameras == 1:
      images = images[:, 0]
    if self._history == 1:
      images = images[0]
    return images

  def _process(self, raw: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    aug = self._augment
    if aug is None:
      return transforms.resize(raw, self._size)
    image = transforms.random_resized_crop(raw, rng, self._size, tuple(aug["crop_scale"]),
                                           tuple(aug["crop_ratio"]))
    return transforms.color_jitter(image, rng, aug["brightness"], aug["contrast"],
                                   aug["saturation"], aug["hue"])


def _pad_last(x: np.ndarray, width: int) -> np.ndarray:
  return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])]).astype(np.float32)


def model_state(state: np.ndarray, stats: normalization.ArrayStats,
                spec: oxe_registry.DatasetSpec, width: int) -> np.ndarray:
  """A standardised state `[S]` in the dataset's units -> the model's `[width]` float32:
  normalised with the dataset's statistics, zero-padded (the policy calls this too)."""
  return _pad_last(normalization.normalize(state, stats, spec.state_normalize_mask), width)


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  """Stacks samples; strings (instruction, episode_id) become `[B]` numpy arrays of str."""
  return {k: np.asarray([s[k] for s in samples]) if isinstance(samples[0][k], str)
          else np.stack([s[k] for s in samples]) for k in samples[0]}


def _resolve_shard(shard_options: grain.sharding.ShardOptions | None):
  if shard_options is None:
    shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  return shard_options.shard_index, shard_options.shard_count


class DataPipeline:
  """Opens the datasets of `config` (a `config.data` block), loads or computes their norm stats
  and builds the per-host batch stream.

  Attributes:
    entries: per dataset id: source, statistics, step index.
    norm_stats: dataset name -> `DatasetStatistics` (store them in checkpoints).
    samples: the global sample stream (every process holds it; nothing is built until read).
    batches: this process's part of each global batch (see the module docstring).
    per_host_batch_size: batch_size / process count.
  """

  def __init__(self, config: ml_collections.ConfigDict, *, train: bool = True,
               shard_options: grain.sharding.ShardOptions | None = None):
    self.config, self.train = config, train
    self.dataset_entries = data_config.dataset_entries(config)
    if config.pad_mode not in transforms.PAD_MODES:
      raise ValueError(f"data.pad_mode={config.pad_mode!r}; choose one of {transforms.PAD_MODES}.")
    self.shard_index, self.shard_count = _resolve_shard(shard_options)
    if config.batch_size % self.shard_count:
      raise ValueError(f"data.batch_size={config.batch_size} is not divisible by the "
                       f"{self.shard_count} processes.")
    self.per_host_batch_size = config.batch_size // self.shard_count

    self.entries = []
    for dataset_id, entry in enumerate(self.dataset_entries):
      source = entry.open(config.data_dir, config.split, int(config.num_cameras))
      stats = normalization.load_or_compute_statistics(
          source, stats_dir=config.stats_dir, skip_bad_episodes=config.skip_bad_episodes)
      offsets = np.concatenate([[0], np.cumsum(stats.episode_lengths)]).astype(np.int64)
      self.entries.append(_DatasetEntry(dataset_id, source, stats, offsets))
      if stats.empty:
        logging.info("%s: %d episodes with no step to train on are skipped.", entry.name,
                     len(stats.empty))
      if stats.skipped:
        logging.warning("%s: %d bad episodes skipped.", entry.name, len(stats.skipped))
    self.norm_stats = {e.spec.name: e.stats for e in self.entries}
    self.num_skipped = {e.spec.name: len(e.stats.skipped) for e in self.entries}
    self.num_empty = {e.spec.name: len(e.stats.empty) for e in self.entries}
    widest = lambda attr: max(getattr(e.spec, attr) for e in self.entries)
    self.state_dim = int(config.state_dim) or widest("state_dim")
    self.action_dim = int(config.action_dim) or widest("action_dim")
    for e in self.entries:
      if e.spec.state_dim > self.state_dim or e.spec.action_dim > self.action_dim:
        raise ValueError(f"data.state_dim/action_dim ({self.state_dim}/{self.action_dim}) are "
                         f"smaller than {e.spec.name}'s {e.spec.state_dim}/{e.spec.action_dim}.")
    self.samples = self._samples()
    self.batches = self._host_batches(self.samples)

  def _samples(self) -> grain.MapDataset:
    """The global stream of samples (before batching), the same in every process."""
    config = self.config
    per_dataset = []
    for e in self.entries:
      ds = grain.MapDataset.range(e.stats.num_steps)
      if config.shuffle:
        ds = ds.shuffle(seed=(config.seed + 7919 * e.dataset_id) % 2**32)
      ds = ds.map(_Tag(e.dataset_id))
      per_dataset.append(ds)
    if config.num_epochs is None:
      per_dataset = [ds.repeat() for ds in per_dataset]
      weights = [entry.weight for entry in self.dataset_entries]
      mixed = (per_dataset[0] if len(per_dataset) == 1
               else grain.MapDataset.mix(per_dataset, weights))
    else:
      mixed = grain.MapDataset.concatenate(per_dataset).repeat(config.num_epochs)
      if config.shuffle:
        mixed = mixed.shuffle(seed=config.seed)
    builder = SampleBuilder(self.entries, config, self.train, self.state_dim, self.action_dim)
    return mixed.random_map(builder, seed=config.seed)

  def _host_batches(self, samples: grain.MapDataset) -> grain.MapDataset:
    """This process's rows of every global batch (batching is lazy: only they are built).

    Sharding after the random map keeps each sample's augmentation tied to its global index.
    Training on a finite number of epochs drops the last partial global batch, so that every
    process has the same number of batches; evaluation keeps it (a process may get one batch
    more than another).
    """
    if self.config.num_epochs is not None and self.train:
      samples = samples[:len(samples) - len(samples) % int(self.config.batch_size)]
    blocks = samples.batch(self.per_host_batch_size, drop_remainder=self.train, batch_fn=collate)
    return blocks[self.shard_index::self.shard_count]

  def fingerprint(self, *, one_process_legacy: bool = False, with_dirs: bool = False) -> str:
    """Hash of everything that decides which global batches come out (not the worker or
    process count: a position saved by N processes is valid for M; not where the data lies:
    the entries' `dir` and data_dir are left out, the datasets' step counts are in).

    `one_process_legacy`: the hash that positions saved by one process before the process count
    was left out carry (their batches are the same). `with_dirs`: the hash of positions saved
    before the entries' `dir` was left out.
    """
    keep = {k: v for k, v in self.config.to_dict().items()
            if k not in ("num_workers", "read_threads", "prefetch_batches", "data_dir",
                         "stats_dir")}
    if not with_dirs:
      keep["datasets"] = [{k: v for k, v in d.items() if k != "dir"} if isinstance(d, dict) else d
                          for d in keep["datasets"]]
    keep.update(train=self.train, num_steps=[e.stats.num_steps for e in self.entries])
    if one_process_legacy:
      keep.update(shard=(0, 1))
    return hashlib.sha1(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]

  def iterator(self) -> "DataIterator":
    return DataIterator(self)

  def unnormalize_actions(self, actions: np.ndarray, dataset_id: int) -> np.ndarray:
    """Model actions `[..., A_padded]` in [-1, 1] -> raw actions `[..., A]` of one dataset."""
    spec, stats = self.entries[dataset_id].spec, self.entries[dataset_id].stats
    return normalization.unnormalize(actions[..., :spec.action_dim], stats.action,
                                     spec.action_normalize_mask, spec.action_binarize_mask)


class DataIterator(grain.DatasetIterator):
  """Checkpointable iterator over a pipeline's batches.

  `get_state()` is `{"next_batch": k, "fingerprint": ...}`; it works with orbax through
  `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`. Restoring into a pipeline with
  another configuration (other than the worker/thread/process counts) raises
  `PipelineStateError`.
  """

  def __init__(self, pipeline: DataPipeline):
    super().__init__()
    self._pipeline = pipeline
    self._fingerprint = pipeline.fingerprint()
    self._accepted = {pipeline.fingerprint(one_process_legacy=legacy, with_dirs=dirs)
                      for legacy in (False, True) for dirs in (False, True)}
    self._next_batch = 0
    self._inner = None

  def _open(self):
    config = self._pipeline.config
    threads = int(config.read_threads)
    ds = self._pipeline.batches[self._next_batch:].to_iter_dataset(grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=max(threads, int(config.prefetch_batches))))
    if config.num_workers > 0:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=int(config.num_workers),
          per_worker_buffer_size=max(1, int(config.prefetch_batches) // int(config.num_workers))))
    self._inner = iter(ds)

  def __next__(self) -> dict[str, np.ndarray]:
    if self._inner is None:
      self._open()
    batch = next(self._inner)
    self._next_batch += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"next_batch": self._next_batch, "fingerprint": self._fingerprint}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("fingerprint") not in self._accepted:
      raise PipelineStateError(
          f"Data iterator state {state} was saved by a pipeline with another configuration "
          f"(fingerprint {state.get('fingerprint')} != {self._fingerprint}): datasets, weights, "
          "seed, (global) batch size, sample options and dataset sizes must match; only "
          "num_workers/read_threads/prefetch_batches and the number of processes may change.")
    self.close()
    self._next_batch = int(state["next_batch"])

  def start_prefetch(self) -> None:
    if self._inner is None:
      self._open()
    self._inner.start_prefetch()

  def close(self) -> None:
    if self._inner is not None:
      self._inner.close()
      self._inner = None
