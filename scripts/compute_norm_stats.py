"""Computes per-dataset action/state statistics (q01, q99, mean, std, min, max) as JSON.

Only the low-dimensional arrays are read; images are never decoded. The JSON lands next to the
data (`<data_dir>/<dataset>/<version>/norm_stats.<split>.json`) or under --stats_dir.

  python scripts/compute_norm_stats.py --data_dir=/data/tfds \
      --datasets=bridge_dataset,fractal20220817_data [--skip_bad_episodes] [--recompute]
"""

import time

from absl import flags

from twinbrain_jax import cli
from twinbrain_jax.data import normalization, oxe_registry, rlds

_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir.", required=True)
_DATASETS = flags.DEFINE_list("datasets", ["bridge_dataset", "fractal20220817_data"],
                              "Registry names.")
_SPLIT = flags.DEFINE_string("split", "train", "Split.")
_STATS_DIR = flags.DEFINE_string("stats_dir", None, "Write here instead of next to the data.")
_SKIP_BAD = flags.DEFINE_bool("skip_bad_episodes", False, "Skip (and count) bad episodes.")
_RECOMPUTE = flags.DEFINE_bool("recompute", True, "Recompute even if a JSON exists.")


def main(argv):
  del argv
  print(f"{'dataset':24s} {'episodes':>8s} {'steps':>8s} {'skipped':>7s} {'seconds':>8s}  file")
  for name in _DATASETS.value:
    spec = oxe_registry.get_spec(name)
    dataset = rlds.RldsDataset(rlds.resolve_dataset_dir(_DATA_DIR.value, name), spec,
                               _SPLIT.value)
    start = time.perf_counter()
    stats = normalization.load_or_compute_statistics(
        dataset, stats_dir=_STATS_DIR.value, skip_bad_episodes=_SKIP_BAD.value,
        recompute=_RECOMPUTE.value)
    seconds = time.perf_counter() - start
    path = normalization.stats_path(dataset.path, _SPLIT.value, _STATS_DIR.value, name)
    print(f"{name:24s} {len(dataset):8d} {stats.num_steps:8d} {len(stats.skipped):7d} "
          f"{seconds:8.2f}  {path}")


if __name__ == "__main__":
  cli.run(main)
