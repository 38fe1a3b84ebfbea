"""Meta-World demonstrations written as an RLDS dataset (TFDS, ArrayRecord).

The dataset is registry entry `metaworld` (twinbrain_jax/data/oxe_registry.py), so the pipeline,
the statistics and the training loop read it like the OXE datasets:
`data_dir=<out>`, `datasets=("metaworld",)` reads `<out>/metaworld/1.0.0/`.

Per task, the scripted expert runs from the data seeds `offset, offset + 1, ...` (disjoint from
the evaluation seeds, see `sim.metaworld`), first without rendering. With `action_noise = s` the
executed action is the expert's plus N(0, s^2) noise and the recorded action stays the expert's
at the visited state (DART-style: noise widens the states seen, labels stay clean). An episode
that succeeds within the limit is replayed with rendering (MuJoCo is deterministic; the replay is
checked to match) and written up to and including its first successful step; a failed one is
dropped and counted. Rendering only the kept episodes is what makes this affordable on a CPU.

Schema:
  steps/observation/image   uint8 [H, W, 3] PNG (lossless: training sees what evaluation renders)
  steps/observation/state   float32 [4]   hand xyz ‖ gripper opening
  steps/action              float32 [4]   xyz delta ‖ gripper effort, in [-1, 1]
  steps/reward (Meta-World's dense reward), discount, is_first, is_last, is_terminal (the last
    step reached success), language_instruction
  episode_metadata: episode_id "<task>/seed_<seed>", task, seed, action_noise
Records are in generation order (task by task, seed by seed). `metaworld_generation.json` next to
the data holds the per-task expert success rates, dropped episodes and timings.

`data_format="lerobot"` writes the same episodes as a LeRobot v3.0 dataset in
`<data_dir>/metaworld_lerobot/` (`data.lerobot.LeRobotWriter`): camera `observation.image` as
the same PNG frames, `observation.state`, `action`, the instruction as each frame's task, in the
same order; `lerobot_entry()` is its `data.datasets` entry, and it gives the same training
batches as the RLDS dataset.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from twinbrain_jax.data import lerobot
from twinbrain_jax.sim import instructed
from twinbrain_jax.sim import metaworld as mw

NAME = "metaworld"
VERSION = "1.0.0"
REPORT_FILE = "metaworld_generation.json"
FORMATS = ("rlds", "lerobot")
LEROBOT_DIR = "metaworld_lerobot"
LEROBOT_CAMERA = "observation.image"
# Meta-World advances MuJoCo 5 x 2.5 ms per action: 80 steps per second.
FPS = 80


def dataset_dir(data_dir: str, data_format: str = "rlds") -> str:
  """Where `write_dataset` puts the dataset of `data_format` under `data_dir`."""
  if data_format not in FORMATS:
    raise ValueError(f"Unknown format {data_format!r}; choose one of {', '.join(FORMATS)}.")
  if data_format == "lerobot":
    return os.path.join(data_dir, LEROBOT_DIR)
  return os.path.join(data_dir, NAME, VERSION)


def lerobot_entry() -> dict:
  """The `data.datasets` entry of the LeRobot dataset (relative to data.data_dir), read with the
  registry schema `metaworld` (actions as recorded, states normalised)."""
  return dict(name=NAME, format="lerobot", dir=LEROBOT_DIR, cameras=(LEROBOT_CAMERA,),
              spec=NAME)


@dataclasses.dataclass
class TaskReport:
  """Outcome of one task: `attempted` expert episodes, `kept` successful ones written."""
  task: str
  attempted: int = 0
  kept: int = 0
  frames: int = 0
  seconds: float = 0.0
  seeds_kept: list[int] = dataclasses.field(default_factory=list)

  @property
  def dropped(self) -> int:
    return self.attempted - self.kept

  @property
  def success_rate(self) -> float:
    return self.kept / self.attempted if self.attempted else 0.0

  def to_json(self) -> dict:
    return dict(dataclasses.asdict(self), dropped=self.dropped, success_rate=self.success_rate)


@dataclasses.dataclass
class DatasetReport:
  """What `write_dataset` wrote (also stored as JSON next to the data)."""
  path: str
  tasks: list[TaskReport]
  image_size: tuple[int, int]
  episodes_per_task: int
  action_noise: float
  seed_offset: int
  max_steps: int | None
  seconds: float = 0.0

  @property
  def frames(self) -> int:
    return sum(t.frames for t in self.tasks)

  def to_json(self) -> dict:
    return dict(path=self.path, image_size=list(self.image_size),
                episodes_per_task=self.episodes_per_task, action_noise=self.action_noise,
                seed_offset=self.seed_offset, max_steps=self.max_steps,
                seconds=self.seconds, frames=self.frames,
                frames_per_second=self.frames / self.seconds if self.seconds else 0.0,
                camera=mw.CAMERA, camera_pos=list(mw.CAMERA_POS),
                tasks=[t.to_json() for t in self.tasks])


def features(image_size: tuple[int, int]) -> tfds.features.FeaturesDict:
  """The episode schema of the module docstring, frames `image_size` = (H, W)."""
  scalar = lambda dtype: tfds.features.Scalar(dtype=dtype)
  vector = tfds.features.Tensor(shape=(mw.STATE_DIM,), dtype=np.float32)
  return tfds.features.FeaturesDict({
      "steps": tfds.features.Dataset({
          "observation": {
              "image": tfds.features.Image(shape=(*image_size, 3), dtype=np.uint8,
                                           encoding_format="png"),
              "state": vector,
          },
          "action": tfds.features.Tensor(shape=(mw.ACTION_DIM,), dtype=np.float32),
          "reward": scalar(np.float32), "discount": scalar(np.float32),
          "is_first": scalar(np.bool_), "is_last": scalar(np.bool_),
          "is_terminal": scalar(np.bool_),
          "language_instruction": tfds.features.Text(),
      }),
      "episode_metadata": {
          "episode_id": tfds.features.Text(), "task": tfds.features.Text(),
          "seed": scalar(np.int64), "action_noise": scalar(np.float32),
      },
  })


class MetaWorldRlds(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes the given `(key, episode)` examples as one "train" split, in order."""
  name = NAME
  VERSION = tfds.core.Version(VERSION)
  # No checksums or metadata files ship with this builder (see data/generate.py).
  code_path = None

  def __init__(self, *, image_size: tuple[int, int], examples: Iterator[tuple[str, dict]],
               **kwargs):
    self._image_size, self._examples = image_size, examples
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=features(self._image_size), disable_shuffling=True,
        description="Meta-World scripted-expert demonstrations (twinbrain_jax.sim).")

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    return self._examples


def expert_episode(env: mw.MetaWorldEnv, seed: int, action_noise: float = 0.0,
                   expert: Callable[[np.ndarray], np.ndarray] | None = None,
                   ) -> tuple[mw.Rollout, np.ndarray] | None:
  """One expert demonstration: `(rendered rollout, expert actions [T, 4])`, None if it failed.

  The rollout's `actions` are the executed ones (noisy if `action_noise > 0`); the returned
  expert actions are what the dataset records (equal to them without noise).
  """
  expert = expert or mw.expert_policy(env.task)
  rng = np.random.default_rng(seed)

  def act(ts: mw.TimeStep) -> np.ndarray:
    action = expert(ts.raw)
    return action + rng.normal(0.0, action_noise, action.shape) if action_noise else action

  plan = mw.rollout(env, act, seed, render=False)
  if not plan.success:
    return None
  shown = mw.rollout(env, lambda ts: plan.actions[ts.step], seed, render=True)
  if not (shown.success and np.array_equal(shown.raws, plan.raws)):
    raise RuntimeError(f"{env.task} seed {seed}: the rendered replay did not reproduce the "
                       "expert's episode; MuJoCo stepping is not deterministic here.")
  return shown, np.stack([expert(raw) for raw in shown.raws]).astype(np.float32)


def png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG", compress_level=1)  # ~10x faster, ~same size.
  return buf.getvalue()


def episode_example(episode: mw.Rollout, actions: np.ndarray, action_noise: float) -> dict:
  """A rendered rollout and its recorded actions `[T, 4]` -> one RLDS episode (TFDS example)."""
  instruction, last = mw.instruction(episode.task, episode.seed), len(episode) - 1
  steps = [{
      "observation": {"image": png(episode.images[t]), "state": episode.states[t]},
      "action": actions[t], "reward": float(episode.rewards[t]), "discount": 1.0,
      "is_first": t == 0, "is_last": t == last, "is_terminal": t == last and episode.success,
      "language_instruction": instruction,
  } for t in range(len(episode))]
  metadata = {"episode_id": f"{episode.task}/seed_{episode.seed}", "task": episode.task,
              "seed": episode.seed, "action_noise": action_noise}
  return {"steps": steps, "episode_metadata": metadata}


def _task_episodes(task: str, seeds: Sequence[int], image_size, max_steps,
                   action_noise) -> tuple[TaskReport, list[tuple[str, dict]]]:
  """One task's expert episodes on `seeds`: its report and the kept `(key, example)` pairs (a
  worker's unit of work: the whole task, so each worker builds one env at a time)."""
  report = TaskReport(task)
  start = time.perf_counter()
  kept = []
  with mw.make_env(task, image_size, max_steps) as env:
    expert = mw.expert_policy(task)
    for seed in seeds:
      result = expert_episode(env, seed, action_noise, expert)
      report.attempted += 1
      if result is None:
        continue
      episode, actions = result
      kept.append((f"{task}/seed_{seed}", episode_example(episode, actions, action_noise)))
      report.kept += 1
      report.frames += len(episode)
      report.seeds_kept.append(int(seed))
  report.seconds = time.perf_counter() - start
  return report, kept


def _quiet_worker() -> None:
  """A worker ignores the scripted policies' warnings about their own gains, as the script does
  (the simulator clips actions)."""
  warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")


def _task_episodes_star(args) -> tuple[TaskReport, list[tuple[str, dict]]]:
  return _task_episodes(*args)


def _examples(tasks: Sequence[str], seeds: Sequence[int], image_size, max_steps, action_noise,
              reports: list[TaskReport], progress,
              num_workers: int = 0) -> Iterator[tuple[str, dict]]:
  """Runs the experts task by task (`num_workers` > 0: that many tasks at once, in spawned
  processes), filling `reports`, and yields the kept episodes in task order."""
  jobs = [(task, tuple(seeds), image_size, max_steps, action_noise) for task in tasks]
  if num_workers > 0:
    import multiprocessing  # pylint: disable=g-import-not-at-top
    # spawn: a forked child would inherit the parent's GL context and TFDS threads.
    pool = multiprocessing.get_context("spawn").Pool(min(num_workers, len(jobs)),
                                                     initializer=_quiet_worker)
    results = pool.imap(_task_episodes_star, jobs)
  else:
    pool, results = None, map(_task_episodes_star, jobs)
  try:
    for report, kept in results:
      reports.append(report)
      yield from kept
      if progress is not None:
        progress(report)
  finally:
    if pool is not None:
      pool.terminate()
      pool.join()
  if not any(r.kept for r in reports):
    raise RuntimeError(f"No expert episode succeeded on {', '.join(tasks)}; nothing to write "
                       "(lower action_noise or raise max_steps).")


def _write_lerobot(path: str, image_size: tuple[int, int],
                   examples: Iterator[tuple[str, dict]]) -> None:
  """The RLDS examples as a LeRobot dataset at `path` (the same PNG bytes, states, actions)."""
  writer = lerobot.LeRobotWriter(path, fps=FPS, cameras={LEROBOT_CAMERA: image_size},
                                 state_dim=mw.STATE_DIM, action_dim=mw.ACTION_DIM,
                                 robot_type="sawyer")
  for _, example in examples:
    steps = example["steps"]
    writer.add_episode({LEROBOT_CAMERA: [s["observation"]["image"] for s in steps]},
                       np.stack([s["observation"]["state"] for s in steps]),
                       np.stack([s["action"] for s in steps]),
                       [s["language_instruction"] for s in steps])
  writer.close()


def write_dataset(data_dir: str, tasks: str | Sequence[str] = "mt10", *,
                  episodes_per_task: int = 50,
                  image_size: int | Sequence[int] = mw.DEFAULT_IMAGE_SIZE,
                  action_noise: float = 0.0, seed_offset: int = 0,
                  max_steps: int | None = None, overwrite: bool = False,
                  progress: Callable[[TaskReport], None] | None = None,
                  data_format: str = "rlds", num_workers: int = 0) -> DatasetReport:
  """Writes `<data_dir>/metaworld/1.0.0/` (or, `data_format="lerobot"`,
  `<data_dir>/metaworld_lerobot/`) and returns the report (see the module docstring).

  Args:
    data_dir: TFDS data dir.
    tasks: task names or groups (`sim.metaworld.resolve_tasks`), default MT10; a family's
      (`sim.instructed`, e.g. "reach-place") with its seen phrasings only.
    episodes_per_task: expert episodes attempted per task; the failed ones are dropped.
    image_size: `(H, W)` or one int; the registry entry reads 112x112.
    action_noise: std of the Gaussian noise added to the executed actions.
    seed_offset: the first data seed.
    max_steps: episode limit (None: Meta-World's 500).
    overwrite: replace an existing dataset; otherwise that is an error.
    progress: called with each task's report when the task is done.
    data_format: "rlds" or "lerobot".
    num_workers: tasks generated at once in worker processes (0: in this process); the dataset
      is the same whatever the number (records in task order).

  The dataset is written under a temporary directory in `data_dir` and moved into place only
  when complete, so an interrupted or failed run never leaves or damages a dataset.
  """
  tasks = mw.resolve_tasks(tasks)
  heldout = instructed.heldout_tasks(tasks)
  if heldout:
    raise ValueError(f"{', '.join(heldout)} use held-out phrasings, which never go into VLA "
                     "training data (they are for evaluation and the VQA corpus); write "
                     f"{', '.join(t.removesuffix(instructed.HELDOUT_SUFFIX) for t in heldout)} "
                     "instead.")
  seeds = mw.data_seeds(episodes_per_task, seed_offset)
  size = mw.image_hw(image_size)
  if num_workers < 0:
    raise ValueError(f"num_workers must be >= 0; got {num_workers}.")
  if not action_noise >= 0:
    raise ValueError(f"action_noise must be >= 0; got {action_noise}.")
  final = dataset_dir(data_dir, data_format)
  tmp = scratch_dir(data_dir, final, NAME, overwrite)
  start = time.perf_counter()
  reports: list[TaskReport] = []
  try:
    examples = _examples(tasks, seeds, size, max_steps, action_noise, reports, progress,
                         num_workers)
    if data_format == "lerobot":
      written = os.path.join(tmp, LEROBOT_DIR)
      _write_lerobot(written, size, examples)
    else:
      builder = MetaWorldRlds(image_size=size, data_dir=tmp, file_format="array_record",
                              examples=examples)
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
      written = str(builder.data_path)
    report = DatasetReport(path=final, tasks=reports, image_size=size,
                           episodes_per_task=episodes_per_task, action_noise=action_noise,
                           seed_offset=seed_offset, max_steps=max_steps,
                           seconds=time.perf_counter() - start)
    with open(os.path.join(written, REPORT_FILE), "w") as f:
      json.dump(report.to_json(), f, indent=1)
    move_into_place(written, final, data_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return report


def scratch_dir(data_dir: str, final: str, name: str, overwrite: bool) -> str:
  """A new temporary directory in `data_dir` to write dataset `name` into before it moves to
  `final` (`move_into_place`); an existing `final` is an error unless `overwrite`."""
  if os.path.exists(final) and not overwrite:
    raise FileExistsError(f"{final} exists; pass overwrite=True (--overwrite) to replace it, or "
                          "choose another data dir.")
  os.makedirs(data_dir, exist_ok=True)
  return tempfile.mkdtemp(prefix=f".{name}-incomplete-", dir=data_dir)


def move_into_place(written: str, final: str, data_dir: str) -> None:
  """Renames the complete dataset `written` to `final` (both in `data_dir`); an existing `final`
  is swapped out first and deleted only once the new one is in place."""
  os.makedirs(os.path.dirname(final), exist_ok=True)
  if os.path.exists(final):
    old = tempfile.mkdtemp(prefix=".dataset-old-", dir=data_dir)
    os.rename(final, os.path.join(old, "dataset"))
    os.rename(written, final)
    shutil.rmtree(old)
  else:
    os.rename(written, final)


def read_report(dataset_dir: str) -> dict:
  """The generation report stored next to a dataset (`<data_dir>/metaworld/<version>`)."""
  with open(os.path.join(dataset_dir, REPORT_FILE)) as f:
    return json.load(f)


def write_tokenizer(directory: str, model_config) -> None:
  """A synthetic tokenizer for a model trained from scratch on Meta-World (`config.model`): its
  BPE is learned from the 50 instructions and the prompt templates (`demo_data.CORPUS`)."""
  from twinbrain_jax.training import demo_data  # pylint: disable=g-import-not-at-top
  corpus = [*mw.INSTRUCTIONS.values()] * 10 + demo_data.CORPUS
  demo_data.write_tokenizer(directory, model_config, corpus)
