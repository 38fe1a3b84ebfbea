"""Lists a training run's checkpoint steps: which are whole, and what the damaged ones lack.

  python scripts/checkpoints.py --checkpoint_dir=/ckpt/run1/checkpoints

Resuming and `scripts/export.py` take the latest whole step; exits 1 when there is none.
"""

import sys

from absl import flags

from twinbrain_jax import cli
from twinbrain_jax.training import checkpoint

_CHECKPOINT_DIR = flags.DEFINE_string("checkpoint_dir", None, "The run's checkpoint dir.",
                                      required=True)


def main(argv):
  del argv
  steps = checkpoint.list_steps(_CHECKPOINT_DIR.value)
  if not steps:
    sys.exit(f"error: no checkpoint step in {_CHECKPOINT_DIR.value}")
  print(f"{'step':>8}  status   missing")
  for status in steps:
    print(f"{status.step:>8}  {'whole' if status.whole else 'damaged':<7}  "
          f"{', '.join(status.missing)}".rstrip())
  whole = [s.step for s in steps if s.whole]
  if not whole:
    sys.exit(f"error: no whole step in {_CHECKPOINT_DIR.value}")
  print(f"latest whole step: {whole[-1]}")


if __name__ == "__main__":
  cli.run(main)
