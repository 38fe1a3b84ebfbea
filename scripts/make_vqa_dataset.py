"""The Meta-World VQA corpus as the RLDS dataset `metaworld_vqa` (needs the `sim` extra).

  python scripts/make_vqa_dataset.py --data_dir=<data_dir> --tasks=mt50,reach-place \
      --train_seeds=20 --heldout_seeds=5 --frames_per_seed=2

Renders `--frames_per_seed` scenes per task and seed (steps of the scripted expert's episode),
asks each question type (`--question_types`, default all of `sim/vqa.py`) about each scene with
the answer read from the simulator's state, balances the binary types, and writes
`<data_dir>/metaworld_vqa/1.0.0/` with splits "train" (data seeds) and "heldout" (evaluation
seeds). Prints per task the scenes, examples and examples/s, then per question type the examples
and answers of each split (also in `metaworld_vqa_generation.json` next to the data).
"""

import sys
import warnings

import tensorflow_datasets as tfds
from absl import flags

from twinbrain_jax import cli
from twinbrain_jax.data import oxe_registry
from twinbrain_jax.sim import metaworld as mw
from twinbrain_jax.sim import vqa
from twinbrain_jax.sim import vqa_dataset as vd

_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir to write into.", required=True)
_TASKS = flags.DEFINE_string("tasks", vd.DEFAULT_TASKS, "Tasks and groups whose scenes are "
                             "asked about: " + ", ".join(mw.TASK_GROUPS) + ", or names.")
_TYPES = flags.DEFINE_string("question_types", "all", "Comma-separated question types: "
                             + ", ".join(vqa.QUESTION_TYPES) + " (or all).")
_TRAIN = flags.DEFINE_integer("train_seeds", 20, "Scene seeds per task of the train split.")
_HELDOUT = flags.DEFINE_integer("heldout_seeds", 5, "Scene seeds per task of the heldout split.")
_FRAMES = flags.DEFINE_integer("frames_per_seed", 2, "Scenes per seed (expert steps).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 112, "Square frame size in pixels.")
_SEED_OFFSET = flags.DEFINE_integer("seed_offset", 0, "First seed of each split's range.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing dataset.")


def main(argv):
  del argv
  warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
  tfds.disable_progress_bar()
  print(f"{'task':<30} {'split':<8} {'scenes':>6} {'examples':>8} {'examples/s':>10}", flush=True)
  progress = lambda t: print(f"{t.task:<30} {t.split:<8} {t.scenes:>6} {t.examples:>8} "
                             f"{t.examples / t.seconds if t.seconds else 0:>10.1f}", flush=True)
  try:
    report = vd.write_dataset(
        _DATA_DIR.value, _TASKS.value, train_seeds=_TRAIN.value, heldout_seeds=_HELDOUT.value,
        frames_per_seed=_FRAMES.value, question_types=_TYPES.value, image_size=_IMAGE_SIZE.value,
        seed_offset=_SEED_OFFSET.value, overwrite=_OVERWRITE.value, progress=progress)
  except (mw.UnknownTaskError, vqa.UnknownQuestionTypeError, FileExistsError, ValueError) as e:
    sys.exit(f"error: {e}")
  print(f"\n{'question type':<14} {'split':<8} {'examples':>8} {'dropped':>7}  answers")
  for split in vqa.SPLITS:
    for name in report["question_types"]:
      answers = report["answers"][split].get(name, {})
      print(f"{name:<14} {split:<8} {sum(answers.values()):>8} "
            f"{report['dropped_by_balance'][split].get(name, 0):>7}  "
            + ", ".join(f"{k}: {v}" for k, v in sorted(answers.items())))
  total = sum(report["examples"].values())
  print(f"\nwrote {total} examples ({report['examples']['train']} train, "
        f"{report['examples']['heldout']} heldout) of {sum(report['scenes'].values())} scenes to "
        f"{report['path']} in {report['seconds']:.0f}s ({report['examples_per_second']:.1f} "
        f"examples/s; report: {vd.REPORT_FILE} there)")
  expected = oxe_registry.get_spec(vd.NAME).image_shape
  if tuple(report["image_size"]) != tuple(expected):
    print(f"note: the registry entry {vd.NAME!r} reads {expected[0]}x{expected[1]} frames; these "
          f"are {report['image_size'][0]}x{report['image_size'][1]}: read them with a DatasetSpec "
          f"of that image_shape (dataclasses.replace(get_spec({vd.NAME!r}), image_shape=...)).")


if __name__ == "__main__":
  cli.run(main)
