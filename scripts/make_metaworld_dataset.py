"""Meta-World scripted-expert demonstrations as the RLDS dataset `metaworld` (needs the `sim` extra).

  python scripts/make_metaworld_dataset.py --data_dir=/data/mw --tasks=mt10 --episodes_per_task=50

Writes `<data_dir>/metaworld/1.0.0/` (read it with `--config.data.data_dir=<data_dir>
--config.data.datasets=metaworld --config.data.weights=1`), or with `--format=lerobot` the same
episodes as a LeRobot v3.0 dataset in `<data_dir>/metaworld_lerobot/` (the script prints the
`--config.data.datasets` entry that reads it), and prints, per task, the expert's success rate
and the episodes it dropped (also in `metaworld_generation.json` next to the data).
`--tokenizer_dir=DIR` also writes the synthetic tokenizer (BPE learned from the 50 instructions)
that a model trained from scratch with `--config` (default the `metaworld_tiny` preset) reads via
`--config.init.tokenizer=DIR`; `--tokenizer_only` writes just that.
"""

import sys
import warnings

import tensorflow_datasets as tfds
from absl import flags
from ml_collections import config_flags

from twinbrain_jax import cli
from twinbrain_jax.data import oxe_registry
from twinbrain_jax.sim import metaworld as mw
from twinbrain_jax.sim import metaworld_dataset as mwd

_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir to write into.", required=True)
_TASKS = flags.DEFINE_string("tasks", "mt10", "Comma-separated tasks and groups: "
                             + ", ".join(mw.TASK_GROUPS) + ", or names like pick-place-v3.")
_EPISODES = flags.DEFINE_integer("episodes_per_task", 50, "Expert episodes tried per task.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 112, "Square frame size in pixels.")
_NOISE = flags.DEFINE_float("action_noise", 0.0, "Std of Gaussian noise on executed actions.")
_SEED_OFFSET = flags.DEFINE_integer("seed_offset", 0, "First data seed (< "
                                    f"{mw.EVAL_SEED_START}, where evaluation seeds start).")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Episode limit (default Meta-World's 500).")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "Tasks generated at once in worker "
                                    "processes (0: in this process); same dataset either way.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing dataset.")
_FORMAT = flags.DEFINE_enum("format", "rlds", list(mwd.FORMATS),
                            "rlds (TFDS ArrayRecord) or lerobot (LeRobot v3.0, PNG frames).")
_TOKENIZER_DIR = flags.DEFINE_string("tokenizer_dir", None, "Also write a synthetic tokenizer "
                                     "for --config's backbone here.")
_TOKENIZER_ONLY = flags.DEFINE_bool("tokenizer_only", False, "Write only the tokenizer.")
_CONFIG = config_flags.DEFINE_config_file("config", "configs/twinbrain.py:metaworld_tiny",
                                          "The run the tokenizer is for (its backbone's ids).")


def _row(name, attempted, kept, frames, seconds) -> str:
  rate = f"{100 * kept / attempted:.1f}%" if attempted else "-"
  fps = f"{frames / seconds:.1f}" if seconds else "-"
  return (f"{name:<30} {attempted:>9} {kept:>5} {attempted - kept:>7} {rate:>14} {frames:>7} "
          f"{fps:>9}")


def main(argv):
  del argv
  # Meta-World's scripted policies warn about their own gains; the simulator clips actions.
  warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
  tfds.disable_progress_bar()  # One line per task instead (logs of background runs stay short).
  if _TOKENIZER_ONLY.value and not _TOKENIZER_DIR.value:
    sys.exit("error: --tokenizer_only needs --tokenizer_dir.")
  if _TOKENIZER_DIR.value:
    mwd.write_tokenizer(_TOKENIZER_DIR.value, _CONFIG.value.model)
    print(f"wrote the tokenizer for {_CONFIG.value.model.backbone.name!r} to "
          f"{_TOKENIZER_DIR.value}", flush=True)
    if _TOKENIZER_ONLY.value:
      return
  header = (f"{'task':<30} {'attempted':>9} {'kept':>5} {'dropped':>7} {'expert success':>14} "
            f"{'frames':>7} {'frames/s':>9}")
  print(header, flush=True)
  progress = lambda t: print(_row(t.task, t.attempted, t.kept, t.frames, t.seconds), flush=True)
  try:
    report = mwd.write_dataset(
        _DATA_DIR.value, _TASKS.value, episodes_per_task=_EPISODES.value,
        image_size=_IMAGE_SIZE.value, action_noise=_NOISE.value, seed_offset=_SEED_OFFSET.value,
        max_steps=_MAX_STEPS.value, overwrite=_OVERWRITE.value, progress=progress,
        data_format=_FORMAT.value, num_workers=_NUM_WORKERS.value)
  except (mw.UnknownTaskError, FileExistsError, ValueError) as e:
    sys.exit(f"error: {e}")
  tasks = report.tasks
  print(_row("total", sum(t.attempted for t in tasks), sum(t.kept for t in tasks),
             report.frames, report.seconds))
  print(f"wrote {sum(t.kept for t in tasks)} episodes to {report.path} in {report.seconds:.0f}s "
        f"(report: {mwd.REPORT_FILE} there)")
  if _FORMAT.value == "lerobot":
    print(f"train from it with --config.data.data_dir={_DATA_DIR.value} "
          f"\"--config.data.datasets=({mwd.lerobot_entry()!r},)\"")
  expected = oxe_registry.get_spec(mwd.NAME).image_shape
  if _FORMAT.value == "rlds" and tuple(report.image_size) != tuple(expected):
    print(f"note: the registry entry {mwd.NAME!r} reads {expected[0]}x{expected[1]} frames; "
          f"these are {report.image_size[0]}x{report.image_size[1]}: read them with a DatasetSpec "
          f"of that image_shape (dataclasses.replace(get_spec({mwd.NAME!r}), image_shape=...)).")


if __name__ == "__main__":
  cli.run(main)
