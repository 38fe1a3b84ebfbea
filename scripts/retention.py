"""The retention experiment as one command; re-running it resumes (docs/retention.md).

  python scripts/retention.py --config=configs/retention.py:default --output_dir=<dir>
  python scripts/retention.py --config=configs/retention.py:smoke --output_dir=<dir>   # toy scale

Makes the demonstrations, the VQA corpus and the tokenizer, trains the VLM and the five VLAs
(`configs/retention.py`), evaluates every brain on held-out questions and every VLA in closed
loop, and writes `<dir>/retention.json`, `retention.md` and `retention.png`. Each stage is skipped
when its output exists and a training run resumes from its checkpoints, so the same command picks
up where a stopped or failed run left off. Prints every command it runs.
"""

import signal
import sys

from absl import flags
from ml_collections import config_flags

from twinbrain_jax import cli
from twinbrain_jax.sim import retention

_CONFIG = config_flags.DEFINE_config_file("config", "configs/retention.py:default",
                                          "Experiment config file:preset.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where every stage writes; re-use it to "
                                  "resume.", required=True)


def main(argv):
  del argv
  # SIGTERM ends the run like Ctrl-C: the running stage's process group is stopped (a training
  # run saves a checkpoint first) instead of being left behind.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  try:
    retention.run(_CONFIG.value, _OUTPUT_DIR.value)
  except retention.StageError as e:
    sys.exit(f"error: {e}\nThe outputs of the stages before it are kept; re-run the same "
             "command to resume.")
  except (FileExistsError, ValueError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  cli.run(main)
