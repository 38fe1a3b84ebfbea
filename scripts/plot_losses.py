"""Scalar curves (loss, grad norm, ...) of several training runs side by side, from their
TensorBoard event files, without starting TensorBoard.

  python scripts/plot_losses.py --runs=full=<runs_dir>/full,lora_r8=<runs_dir>/lora_r8 \
      --tags=train/loss,eval/loss --smooth=10 --output=docs/img/lora_vs_full_loss.png

`--runs` takes training workdirs (`scripts/train.py --workdir`; their events are in
`<workdir>/tensorboard`) or TensorBoard directories, each `<label>=<dir>` or `<dir>` (labelled by
its base name). Prints a Markdown table of each run's (smoothed) value of each tag at 10, 50 and
100 % of its last step (or at `--at_steps`) and that last step; with `--output`, writes one panel
per tag (PNG).
"""

import os
import sys

from absl import flags

from twinbrain_jax import cli
from twinbrain_jax.sim import evaluation
from twinbrain_jax.training import summaries

_RUNS = flags.DEFINE_list("runs", None, "Runs to compare: <label>=<workdir> or <workdir>, "
                          "comma-separated.", required=True)
_TAGS = flags.DEFINE_list("tags", ["train/loss"], "Scalar tags, one panel each.")
_SMOOTH = flags.DEFINE_integer("smooth", 0, "Moving-average window in logged points (0: none); "
                               "the raw curve is drawn faintly behind the smoothed one.")
_AT_STEPS = flags.DEFINE_list("at_steps", [], "Steps for the table's columns (default: 10, 50 "
                              "and 100 % of each run's last step).")
_OUTPUT = flags.DEFINE_string("output", None, "The PNG to write (none: print the table only).")
_LOG_SCALE = flags.DEFINE_bool("log_scale", False, "Logarithmic y axis.")
_TENSORBOARD_DIR = flags.DEFINE_string("tensorboard_dir", summaries.DEFAULT_TENSORBOARD_DIR,
                                       "The runs' config.train.tensorboard_dir.")


def main(argv):
  del argv
  if _SMOOTH.value < 0:
    sys.exit(f"error: --smooth={_SMOOTH.value}; pass 0 (none) or a positive window.")
  try:
    at_steps = [int(s) for s in _AT_STEPS.value]
  except ValueError:
    sys.exit(f"error: --at_steps={','.join(_AT_STEPS.value)}; pass integer steps.")
  try:
    runs = {label: summaries.read_run(directory, _TENSORBOARD_DIR.value)
            for label, directory in summaries.parse_runs(_RUNS.value)}
    summaries.check_tags(runs, _TAGS.value)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  for tag in _TAGS.value:
    lacking = [label for label, scalars in runs.items() if tag not in scalars]
    if lacking:
      print(f"note: {', '.join(lacking)} {'has' if len(lacking) == 1 else 'have'} no {tag}.")
  print(cli.markdown_table(*summaries.table(runs, _TAGS.value, _SMOOTH.value, at_steps)))
  if _OUTPUT.value:
    if os.path.dirname(_OUTPUT.value):
      os.makedirs(os.path.dirname(_OUTPUT.value), exist_ok=True)
    evaluation.save_figure(lambda: summaries.curves_figure(runs, _TAGS.value, _SMOOTH.value,
                                                           _LOG_SCALE.value), _OUTPUT.value)
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  cli.run(main, compilation_cache=False, info_logs=False)
