"""The main job on an embedded default: everything runs on data the project generates.

  python scripts/demo.py --config=configs/twinbrain.py:tiny --workdir=/tmp/twinbrain_demo
"""

from absl import flags
from ml_collections import config_flags

from twinbrain_jax import cli, sharding

_CONFIG = config_flags.DEFINE_config_file("config", "configs/twinbrain.py:tiny", "Config file:preset.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/twinbrain_demo", "Where the demo writes its files.")


def main(argv):
  del argv
  config = _CONFIG.value
  sharding.maybe_initialize_distributed(config.distributed)
  mesh = sharding.make_mesh(config.mesh)
  sharding.logical_axis_rules(config.logical_axis_rules, mesh)
  print(f"mesh {dict(mesh.shape)} over {mesh.devices.size} devices; workdir {_WORKDIR.value}")


if __name__ == "__main__":
  cli.run(main)
