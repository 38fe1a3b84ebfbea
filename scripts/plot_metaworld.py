"""Figures from `scripts/eval_metaworld.py` results: per-task success, MT50 difficulty groups
beside the published rows, and a strip of recorded rollouts.

  python scripts/plot_metaworld.py --results=<eval_dir>/twinbrain.json,<eval_dir>/monolithic.json \
      --output_dir=docs/img --name=metaworld_mt50 --strip_tasks=drawer-close,button-press,door-open

Writes `<name>_success.png` (every result, per task), `<name>_groups.png` (results evaluated on
all of MT50, with `evaluation.REPORTED_MT50`'s rows; their Markdown table is printed) and, when --strip_tasks is given,
`<name>_strip.png`: the first recorded episode of each of those tasks of the first result (its
GIFs must be next to its JSON, `eval_metaworld.py --num_videos>=1`).
"""

import json
import os
import sys

from absl import flags

from twinbrain_jax import cli
from twinbrain_jax.sim import evaluation
from twinbrain_jax.sim import metaworld as mw

_RESULTS = flags.DEFINE_list("results", None, "Result JSONs of eval_metaworld.py.",
                             required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the PNGs go.", required=True)
_NAME = flags.DEFINE_string("name", "metaworld", "File name prefix.")
_REPORTED = flags.DEFINE_list("reported", ["Diffusion Policy", "TinyVLA", "π0 (3.5B-PaliGemma)",
                                           "SmolVLA (0.45B)"],
                              "Published rows in the groups plot (evaluation.REPORTED_MT50).")
_STRIP_TASKS = flags.DEFINE_list("strip_tasks", [], "Tasks whose first recorded episode goes "
                                 "in the rollout strip.")
_STRIP_FRAMES = flags.DEFINE_integer("strip_frames", 6, "Frames per episode in the strip.")


def main(argv):
  del argv
  results = []
  for path in _RESULTS.value:
    with open(path) as f:
      results.append(json.load(f))
  unknown = sorted(set(_REPORTED.value) - set(evaluation.REPORTED_MT50))
  if unknown:
    sys.exit(f"error: --reported names {unknown}; known: {sorted(evaluation.REPORTED_MT50)}.")
  chosen = []  # Checked before anything is written.
  if _STRIP_TASKS.value:
    tasks = mw.resolve_tasks(",".join(_STRIP_TASKS.value))
    recorded = evaluation.recorded_episodes(os.path.dirname(_RESULTS.value[0]), results[0])
    chosen = [next((e for e in recorded if e["task"] == t), None) for t in tasks]
    missing = [t for t, e in zip(tasks, chosen) if e is None]
    if missing:
      sys.exit(f"error: no recorded episode of {', '.join(missing)} next to "
               f"{_RESULTS.value[0]}; evaluate with --num_videos=1 or more.")
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  stem = os.path.join(_OUTPUT_DIR.value, _NAME.value)
  written = [f"{stem}_success.png"]
  evaluation.plot_success(results, written[-1])
  mt50 = [r for r in results if "difficulty_average" in r]
  if mt50:
    written.append(f"{stem}_groups.png")
    reported = {k: evaluation.REPORTED_MT50[k] for k in _REPORTED.value}
    evaluation.plot_groups(mt50, written[-1], reported)
    print(evaluation.mt50_markdown(mt50, reported))
  if chosen:
    written.append(f"{stem}_strip.png")
    evaluation.save_figure(lambda: evaluation.rollout_strip(chosen, _STRIP_FRAMES.value),
                           written[-1])
  print("wrote " + ", ".join(written))


if __name__ == "__main__":
  cli.run(main)
