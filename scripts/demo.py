"""The closed loop on Meta-World, no download: demonstrations -> training -> export -> policy
server -> evaluation through it with openpi-client, next to the scripted expert and random actions.

  python scripts/demo.py --workdir=/tmp/twinbrain_demo       # what `make demo` runs

The demonstrations stay in `<workdir>/data` and are reused; the run, bundle and evaluation are
made anew. Prints every command it runs, the success table, and where the plot and videos are.
"""

import sys

from absl import flags

from twinbrain_jax import cli
from twinbrain_jax.sim import demo

_DEFAULTS = demo.DemoSettings()
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/twinbrain_demo", "Where the demo writes.")
_TASKS = flags.DEFINE_string("tasks", _DEFAULTS.tasks, "Meta-World tasks (names or groups).")
_EPISODES = flags.DEFINE_integer("episodes_per_task", _DEFAULTS.episodes_per_task,
                                 "Expert demonstrations tried per task.")
_CONFIG = flags.DEFINE_string("config", _DEFAULTS.config, "Training config file:preset.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", None, "Default: the config's num_steps.")
_EVAL_EPISODES = flags.DEFINE_integer("eval_episodes", _DEFAULTS.eval_episodes,
                                      "Evaluation episodes per task.")
_MAX_STEPS = flags.DEFINE_integer("max_steps", _DEFAULTS.max_steps, "Episode limit.")
_NUM_VIDEOS = flags.DEFINE_integer("num_videos", _DEFAULTS.num_videos,
                                   "Recorded episodes per task.")
_DATA_FORMAT = flags.DEFINE_enum("data_format", _DEFAULTS.data_format, ["rlds", "lerobot"],
                                 "The demonstrations as RLDS or as a LeRobot v3.0 dataset; "
                                 "training reads either.")


def main(argv):
  del argv
  try:
    settings = demo.DemoSettings(
        tasks=_TASKS.value, episodes_per_task=_EPISODES.value, config=_CONFIG.value,
        train_steps=_TRAIN_STEPS.value, eval_episodes=_EVAL_EPISODES.value,
        max_steps=_MAX_STEPS.value, num_videos=_NUM_VIDEOS.value,
        data_format=_DATA_FORMAT.value)
    demo.run(settings, _WORKDIR.value)
  except (demo.StageError, FileExistsError, ValueError) as e:  # ValueError: a misspelt task
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  cli.run(main)
