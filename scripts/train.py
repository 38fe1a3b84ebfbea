"""Trains TwinBrainVLA; re-running the same command resumes from the latest checkpoint.

  python scripts/train.py --config=configs/twinbrain.py:qwen25vl_3b --workdir=/ckpt/run1 \
      --config.data.data_dir=/data/tfds --config.init.hf_checkpoint=/models/Qwen2.5-VL-3B-Instruct

SIGTERM (preemption) saves a checkpoint at the next step boundary and exits with status 0.
"""

from absl import flags
from ml_collections import config_flags

from twinbrain_jax import cli, sharding
from twinbrain_jax.training import loop

_CONFIG = config_flags.DEFINE_config_file("config", "configs/twinbrain.py:tiny", "Config file:preset.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and TensorBoard events.", required=True)


def main(argv):
  del argv
  config = _CONFIG.value
  sharding.maybe_initialize_distributed(config.distributed)
  result = loop.train(config, _WORKDIR.value)
  last = max(result.losses) if result.losses else None
  print(f"stopped at step {result.final_step} (started at {result.start_step}, "
        f"preempted={result.preempted}); last loss "
        f"{result.losses[last] if last else float('nan'):.4f}", flush=True)


if __name__ == "__main__":
  cli.run(main)
