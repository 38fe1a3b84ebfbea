"""End to end on generated data, no download: train the tiny preset, stop half-way, resume,
export an inference bundle, and sample un-normalised actions from it.

  python scripts/demo.py --config=configs/twinbrain.py:tiny --workdir=/tmp/twinbrain_demo
"""

import tensorflow_datasets as tfds
from absl import flags, logging
from ml_collections import config_flags

from twinbrain_jax import cli, sharding
from twinbrain_jax.training import demo

_CONFIG = config_flags.DEFINE_config_file("config", "configs/twinbrain.py:tiny", "Config file:preset.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/twinbrain_demo", "Where the demo writes its files.")


def main(argv):
  del argv
  # The demo prints its own summary and a progress bar; library INFO logs would drown them.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  tfds.disable_progress_bar()
  config = _CONFIG.value
  sharding.maybe_initialize_distributed(config.distributed)
  demo.run(config, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
