"""Computes per-dataset action/state statistics (q01, q99, mean, std, min, max) as JSON.

Only the low-dimensional arrays are read; no camera is opened or decoded, so the data needs
none of the schema's cameras. The JSON lands next to the data
(`<dataset dir>/norm_stats.<split>.json`) or under --stats_dir, where training reads it.

  # Registry names under a TFDS data dir:
  python scripts/compute_norm_stats.py --data_dir=/data/tfds \
      --datasets=bridge_dataset,fractal20220817_data [--skip_bad_episodes] [--recompute]
  # Every entry of a training config's data.datasets (names, dicts with spec/dir, LeRobot
  # datasets), with its data_dir, split, stats_dir and skip_bad_episodes:
  python scripts/compute_norm_stats.py --config=configs/twinbrain.py:metaworld_tiny \
      --config.data.data_dir=/data/mw
"""

import sys
import time

from absl import flags
from ml_collections import config_flags

from twinbrain_jax import cli
from twinbrain_jax.data import config as data_config
from twinbrain_jax.data import normalization, rlds

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A training config: its data.datasets entries are computed (instead of "
    "--datasets).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (default: the config's).")
_DATASETS = flags.DEFINE_list("datasets", ["bridge_dataset", "fractal20220817_data"],
                              "Registry names (without --config).")
_SPLIT = flags.DEFINE_string("split", None, "Split (default: the config's, else train).")
_STATS_DIR = flags.DEFINE_string("stats_dir", None, "Write here instead of next to the data.")
_SKIP_BAD = flags.DEFINE_bool("skip_bad_episodes", None, "Skip (and count) bad episodes.")
_RECOMPUTE = flags.DEFINE_bool("recompute", True, "Recompute even if a JSON exists.")


def _data_block():
  """The `config.data` block to read: the config's, or one listing --datasets."""
  data = (_CONFIG.value.data if _CONFIG.value is not None
          else data_config.default_data_config())
  if _CONFIG.value is None:
    data.datasets, data.weights = tuple(_DATASETS.value), ()
  for field, flag in (("data_dir", _DATA_DIR), ("split", _SPLIT), ("stats_dir", _STATS_DIR),
                      ("skip_bad_episodes", _SKIP_BAD)):
    if flag.value is not None:
      data[field] = flag.value
  return data


def main(argv):
  del argv
  data = _data_block()
  try:
    entries = data_config.dataset_entries(data)
  except (ValueError, KeyError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(f"{'dataset':24s} {'episodes':>8s} {'steps':>8s} {'skipped':>7s} {'seconds':>8s}  file")
  for entry in entries:
    try:
      # No camera: statistics never decode an image, and the data may have fewer cameras.
      dataset = entry.open(data.data_dir, data.split, num_cameras=0)
      start = time.perf_counter()
      stats = normalization.load_or_compute_statistics(
          dataset, stats_dir=data.stats_dir, skip_bad_episodes=data.skip_bad_episodes,
          recompute=_RECOMPUTE.value)
    except (FileNotFoundError, rlds.DataError, ValueError) as e:
      sys.exit(f"error: {e}")
    seconds = time.perf_counter() - start
    path = normalization.stats_path(dataset.path, data.split, data.stats_dir, entry.name)
    print(f"{entry.name:24s} {len(dataset):8d} {stats.num_steps:8d} {len(stats.skipped):7d} "
          f"{seconds:8.2f}  {path}")


if __name__ == "__main__":
  cli.run(main)
