"""End to end on generated data, no download: train the tiny preset, stop half-way, resume,
export an inference bundle, and sample un-normalised actions from it.

  python scripts/demo.py --config=configs/twinbrain.py:tiny --workdir=/tmp/twinbrain_demo
"""

from absl import flags
from ml_collections import config_flags

from twinbrain_jax import cli, sharding
from twinbrain_jax.training import demo

_CONFIG = config_flags.DEFINE_config_file("config", "configs/twinbrain.py:tiny", "Config file:preset.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/twinbrain_demo", "Where the demo writes its files.")


def main(argv):
  del argv
  config = _CONFIG.value
  sharding.maybe_initialize_distributed(config.distributed)
  demo.run(config, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
