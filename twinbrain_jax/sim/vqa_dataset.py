"""The Meta-World VQA corpus (`sim/vqa.py`) written as an RLDS dataset (TFDS, ArrayRecord).

Registry entry `metaworld_vqa` (twinbrain_jax/data/oxe_registry.py): `rlds.RldsDataset` reads it
like the demonstrations, `<data_dir>/metaworld_vqa/1.0.0/`, splits "train" (scenes from data
seeds) and "heldout" (scenes from evaluation seeds). One episode per scene, one step per question:

  steps/observation/image   uint8 [H, W, 3] PNG   the scene (the same frame in every step)
  steps/observation/state   float32 [4]           hand xyz ‖ gripper opening at the scene
  steps/question            text                  the prompt (the registry's language key)
  steps/answer              text                  the target of an answer-only loss
  steps/question_type       text                  a `vqa.QUESTION_TYPES` name
  steps/choices             text                  the closed answer set joined by "|" ("" if open)
  steps/is_first, is_last   bool
  episode_metadata: episode_id "<task>/seed_<seed>/step_<step>", task, seed, step (expert
    actions before the frame), split

Every binary type is balanced within each split (`vqa.balance`). `metaworld_vqa_generation.json`
next to the data holds per split and question type the counts, answers and dropped examples,
per task the scenes, examples and seconds, and the generation rate. The dataset is written under
a temporary directory and moved into place only when complete (as `metaworld_dataset`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from twinbrain_jax.sim import metaworld as mw
from twinbrain_jax.sim import metaworld_dataset as mwd
from twinbrain_jax.sim import vqa

NAME = "metaworld_vqa"
VERSION = "1.0.0"
REPORT_FILE = "metaworld_vqa_generation.json"
DEFAULT_TASKS = "mt50,reach-place"


@dataclasses.dataclass
class TaskReport:
  """One task of one split: `scenes` rendered, `examples` asked (before balancing)."""
  task: str
  split: str
  scenes: int = 0
  examples: int = 0
  seconds: float = 0.0

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def features(image_size: tuple[int, int]) -> tfds.features.FeaturesDict:
  """The schema of the module docstring, frames `image_size` = (H, W)."""
  return tfds.features.FeaturesDict({
      "steps": tfds.features.Dataset({
          "observation": {
              "image": tfds.features.Image(shape=(*image_size, 3), dtype=np.uint8,
                                           encoding_format="png"),
              "state": tfds.features.Tensor(shape=(mw.STATE_DIM,), dtype=np.float32),
          },
          "question": tfds.features.Text(), "answer": tfds.features.Text(),
          "question_type": tfds.features.Text(), "choices": tfds.features.Text(),
          "is_first": tfds.features.Scalar(dtype=np.bool_),
          "is_last": tfds.features.Scalar(dtype=np.bool_),
      }),
      "episode_metadata": {
          "episode_id": tfds.features.Text(), "task": tfds.features.Text(),
          "seed": tfds.features.Scalar(dtype=np.int64),
          "step": tfds.features.Scalar(dtype=np.int64), "split": tfds.features.Text(),
      },
  })


class VqaRlds(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes the given `(key, episode)` examples of each split, in order."""
  name = NAME
  VERSION = tfds.core.Version(VERSION)
  code_path = None  # No checksums or metadata files ship with this builder.

  def __init__(self, *, image_size: tuple[int, int],
               splits: dict[str, Iterator[tuple[str, dict]]], **kwargs):
    self._image_size, self._splits = image_size, splits
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=features(self._image_size), disable_shuffling=True,
        description="Meta-World scenes, questions and answers read from the simulator "
                    "(twinbrain_jax.sim.vqa).")

  def _split_generators(self, dl_manager):
    del dl_manager
    return dict(self._splits)

  def _generate_examples(self):
    raise NotImplementedError  # The splits' generators are given to __init__.


def episode_id(state: vqa.SceneState) -> str:
  return f"{state.task}/seed_{state.seed}/step_{state.step}"


def scene_example(scene: vqa.Scene, questions: Sequence[vqa.QA], split: str) -> dict:
  """One scene and its questions -> one RLDS episode (TFDS example)."""
  image, last, s = mwd.png(scene.image), len(questions) - 1, scene.state
  steps = [{"observation": {"image": image, "state": s.state},
            "question": qa.question, "answer": qa.answer, "question_type": qa.question_type,
            "choices": "|".join(qa.choices), "is_first": t == 0, "is_last": t == last}
           for t, qa in enumerate(questions)]
  return {"steps": steps, "episode_metadata": {
      "episode_id": episode_id(s), "task": s.task, "seed": s.seed, "step": s.step,
      "split": split}}


def split_examples(tasks: Sequence[str], split: str, seeds: Sequence[int], frames: int,
                   question_types: Sequence[str], image_size: tuple[int, int],
                   reports: list[TaskReport], progress: Callable[[TaskReport], None] | None = None,
                   ) -> tuple[list[tuple[vqa.Scene, vqa.QA]], dict[str, int]]:
  """Every scene of `tasks` x `seeds` (`frames` each) of one split and its questions, balanced
  (`vqa.balance`): `(scene, question)` pairs in task, seed, step order, and the dropped counts."""
  asked = []
  for task in tasks:
    report = TaskReport(task, split)
    start = time.perf_counter()
    with mw.make_env(task, image_size) as env:
      expert = mw.expert_policy(task)
      for seed in seeds:
        for scene in vqa.scenes(env, seed, frames, expert):
          rng = np.random.default_rng([int(seed), scene.state.step, 11])
          questions = vqa.ask(scene.state, question_types, rng)
          asked.extend((scene, qa) for qa in questions)
          report.scenes += 1
          report.examples += len(questions)
    report.seconds = time.perf_counter() - start
    reports.append(report)
    if progress is not None:
      progress(report)
  return vqa.balance(asked, seed=len(asked))


def _episodes(pairs: Sequence[tuple[vqa.Scene, vqa.QA]], split: str
              ) -> Iterator[tuple[str, dict]]:
  """Groups consecutive questions of one scene into one episode each."""
  groups: dict[str, list] = collections.OrderedDict()
  for scene, qa in pairs:
    groups.setdefault(episode_id(scene.state), [scene, []])[1].append(qa)
  for key, (scene, questions) in groups.items():
    yield key, scene_example(scene, questions, split)


def counts(pairs: Sequence[tuple[vqa.Scene, vqa.QA]]) -> dict[str, dict[str, int]]:
  """Question type -> `vqa.answer_key` ("(open)" for open answers) -> count."""
  out: dict[str, collections.Counter] = {}
  for _, qa in pairs:
    out.setdefault(qa.question_type, collections.Counter())[vqa.answer_key(qa) or "(open)"] += 1
  return {t: dict(c) for t, c in out.items()}


def write_dataset(data_dir: str, tasks: str | Sequence[str] = DEFAULT_TASKS, *,
                  train_seeds: int = 20, heldout_seeds: int = 5, frames_per_seed: int = 2,
                  question_types: str | Sequence[str] | None = None,
                  image_size: int | Sequence[int] = mw.DEFAULT_IMAGE_SIZE,
                  seed_offset: int = 0, overwrite: bool = False,
                  progress: Callable[[TaskReport], None] | None = None) -> dict:
  """Writes `<data_dir>/metaworld_vqa/1.0.0/` and returns its report (also stored next to it).

  Args:
    tasks: task names or groups (`mw.resolve_tasks`); default all of MT50 and reach-place.
    train_seeds, heldout_seeds: scene seeds per task of each split (`vqa.scene_seeds`).
    frames_per_seed: scenes per seed (distinct steps of the expert's episode).
    question_types: names or "all"/None (`vqa.resolve_question_types`).
    image_size: `(H, W)` or one int; the registry entry reads 112x112.
    seed_offset: the first seed of each split's range.
    overwrite: replace an existing dataset; otherwise that is an error.
    progress: called with each task's report of each split when it is done.
  """
  tasks = mw.resolve_tasks(tasks)
  types = vqa.resolve_question_types(question_types)
  size = mw.image_hw(image_size)
  seeds = {vqa.TRAIN: vqa.scene_seeds(vqa.TRAIN, train_seeds, seed_offset),
           vqa.HELDOUT: vqa.scene_seeds(vqa.HELDOUT, heldout_seeds, seed_offset)}
  mw.check_seeds_disjoint(seeds[vqa.TRAIN], seeds[vqa.HELDOUT])
  if frames_per_seed < 1 or min(train_seeds, heldout_seeds) < 1:
    raise ValueError(f"frames_per_seed ({frames_per_seed}), train_seeds ({train_seeds}) and "
                     f"heldout_seeds ({heldout_seeds}) must be >= 1.")
  final = os.path.join(data_dir, NAME, VERSION)
  tmp = mwd.scratch_dir(data_dir, final, NAME, overwrite)
  start = time.perf_counter()
  reports: list[TaskReport] = []
  try:
    kept, dropped = {}, {}
    for split in vqa.SPLITS:
      kept[split], dropped[split] = split_examples(tasks, split, seeds[split], frames_per_seed,
                                                   types, size, reports, progress)
      if not kept[split]:
        raise RuntimeError(f"No question of types {', '.join(types)} could be asked about the "
                           f"{split} scenes of {', '.join(tasks)}; nothing to write.")
    generated = time.perf_counter() - start
    builder = VqaRlds(image_size=size, data_dir=tmp, file_format="array_record",
                      splits={s: _episodes(kept[s], s) for s in vqa.SPLITS})
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    written = str(builder.data_path)
    seconds = time.perf_counter() - start
    total = sum(len(v) for v in kept.values())
    report = dict(
        path=final, image_size=list(size), tasks=list(tasks), question_types=list(types),
        frames_per_seed=frames_per_seed, seed_offset=seed_offset,
        seeds={s: [min(v), max(v)] for s, v in seeds.items()},
        examples={s: len(kept[s]) for s in vqa.SPLITS},
        scenes={s: len({episode_id(sc.state) for sc, _ in kept[s]}) for s in vqa.SPLITS},
        answers={s: counts(kept[s]) for s in vqa.SPLITS}, dropped_by_balance=dropped,
        per_task=[r.to_json() for r in reports], generation_seconds=generated,
        seconds=seconds, examples_per_second=total / seconds if seconds else 0.0,
        camera=mw.CAMERA, camera_pos=list(mw.CAMERA_POS), margins=dict(vqa.MARGINS))
    with open(os.path.join(written, REPORT_FILE), "w") as f:
      json.dump(report, f, indent=1)
    mwd.move_into_place(written, final, data_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return report


def read_report(dataset_dir: str) -> dict:
  """The generation report stored next to a dataset (`<data_dir>/metaworld_vqa/<version>`)."""
  with open(os.path.join(dataset_dir, REPORT_FILE)) as f:
    return json.load(f)
