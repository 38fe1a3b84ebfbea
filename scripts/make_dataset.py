"""Writes a small synthetic RLDS dataset in the bridge or fractal schema (ArrayRecord).

  python scripts/make_dataset.py --data_dir=/tmp/tfds --kind=bridge_dataset --num_episodes=200
"""

import time

from absl import flags

from twinbrain_jax import cli
from twinbrain_jax.data import generate

_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir to write into.", required=True)
_KIND = flags.DEFINE_enum("kind", generate.BRIDGE, [generate.BRIDGE, generate.FRACTAL],
                          "Schema.")
_NUM_EPISODES = flags.DEFINE_integer("num_episodes", 20, "Episodes.")
_MIN_STEPS = flags.DEFINE_integer("min_steps", 20, "Shortest episode.")
_MAX_STEPS = flags.DEFINE_integer("max_steps", 40, "Longest episode.")
_SEED = flags.DEFINE_integer("seed", 0, "Contents seed.")


def main(argv):
  del argv
  start = time.perf_counter()
  path = generate.generate_dataset(_KIND.value, _DATA_DIR.value, num_episodes=_NUM_EPISODES.value,
                                   min_steps=_MIN_STEPS.value, max_steps=_MAX_STEPS.value,
                                   seed=_SEED.value)
  print(f"wrote {_NUM_EPISODES.value} episodes to {path} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
  cli.run(main)
