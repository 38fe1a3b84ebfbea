"""Trains TwinBrainVLA; re-running the same command resumes from the latest whole checkpoint.

  python scripts/train.py --config=configs/twinbrain.py:qwen25vl_3b --workdir=/ckpt/run1 \
      --config.data.data_dir=/data/tfds --config.init.hf_checkpoint=/models/Qwen2.5-VL-3B-Instruct

SIGTERM (preemption) or SIGINT saves a checkpoint at the next step boundary and exits with
status 0; during start-up (imports included) it exits with status 0 before writing anything.
In a multi-process job (docs/training.md, "One machine, several GPUs, a TPU pod") a signal to
any one process stops all of them at the same step boundary; only process 0 prints the summary line.
"""

import os
import signal
import sys

# Before the (slow) imports: until `train` installs its own handler nothing has been written, so
# a preemption notice or Ctrl-C ends the process at once with status 0. (`sys.exit` would not do:
# its SystemExit is swallowed when the handler happens to run inside a gc callback.)
for _signum in (signal.SIGTERM, signal.SIGINT):
  signal.signal(_signum, lambda *_: os._exit(0))

import jax  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from twinbrain_jax import cli, sharding  # noqa: E402
from twinbrain_jax.data.rlds import DataError  # noqa: E402
from twinbrain_jax.training import checkpoint, loop  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/twinbrain.py:tiny", "Config file:preset.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and TensorBoard events.", required=True)


def main(argv):
  del argv
  config = _CONFIG.value
  sharding.maybe_initialize_distributed(config.distributed)
  try:
    result = loop.train(config, _WORKDIR.value)
  # FileNotFoundError: a data directory that does not exist.
  except (checkpoint.DamagedCheckpointError, DataError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  if jax.process_index() != 0:  # The result is the same in every process.
    return
  last = max(result.losses) if result.losses else None
  print(f"stopped at step {result.final_step} (started at {result.start_step}, "
        f"preempted={result.preempted}); "
        f"{f'last loss {result.losses[last]:.4f}' if last else 'no step run'}", flush=True)


if __name__ == "__main__":
  cli.run(main)
