"""Prints the resolved config and the device mesh it builds.

  python scripts/show_config.py --config=configs/twinbrain.py:tiny --config.mesh.fsdp=2
"""

from absl import flags
from ml_collections import config_flags

from twinbrain_jax import cli, sharding

_CONFIG = config_flags.DEFINE_config_file("config", "configs/twinbrain.py:tiny", "Config file:preset.")


def main(argv):
  del argv
  config = _CONFIG.value
  sharding.maybe_initialize_distributed(config.distributed)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_axis_rules(config.logical_axis_rules, mesh)
  print(config)
  print("mesh:", dict(mesh.shape))
  for name, axes in rules:
    print(f"  {name:>10} -> {axes}")


if __name__ == "__main__":
  cli.run(main)
