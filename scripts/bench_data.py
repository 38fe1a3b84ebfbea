"""Data pipeline throughput (samples/s at 224x224 with 0, 1, 2 worker processes) and the time to
compute norm stats, on generated bridge/fractal datasets (or --data_dir); then the same bridge
episodes read from RLDS (PNG frames) and from a LeRobot dataset with AV1 video cameras (encoded
as LeRobot encodes them), at the same image size, with 0 and 2 workers.

  python scripts/bench_data.py [--data_dir=/data/tfds] [--num_episodes=200] [--batch_size=32]
      [--lerobot_episodes=60]
"""

import os
import tempfile
import time

import grain
from absl import flags

from twinbrain_jax import cli
from twinbrain_jax.data import config as data_config
from twinbrain_jax.data import generate, lerobot, normalization, oxe_registry, pipeline, rlds

_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir; default: generate one.")
_NUM_EPISODES = flags.DEFINE_integer("num_episodes", 200, "Generated bridge episodes.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Per-host batch.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 20, "Timed batches per setting.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed batches (worker start-up) per setting.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Worker process counts.")
_READ_THREADS = flags.DEFINE_integer("read_threads", 4, "Reader threads per process.")
_LEROBOT_EPISODES = flags.DEFINE_integer(
    "lerobot_episodes", 60, "Generated bridge episodes for the RLDS vs LeRobot-video table "
    "(0: skip it).")
_LEROBOT_WORKERS = flags.DEFINE_list("lerobot_workers", ["0", "2"],
                                     "Worker counts of the RLDS vs LeRobot table.")


def _throughput(config, workers):
  config.num_workers = workers
  pipe = pipeline.DataPipeline(config, shard_options=grain.sharding.ShardOptions(0, 1))
  it = pipe.iterator()
  start = time.perf_counter()
  for _ in range(_WARMUP.value):
    next(it)
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(_NUM_BATCHES.value):
    next(it)
  seconds = time.perf_counter() - start
  it.close()
  return _NUM_BATCHES.value * config.batch_size / seconds, first


def main(argv):
  del argv
  data_dir = _DATA_DIR.value
  if data_dir is None:
    data_dir = tempfile.mkdtemp(prefix="bench_data_")
    start = time.perf_counter()
    generate.generate_dataset(generate.BRIDGE, data_dir, num_episodes=_NUM_EPISODES.value,
                              min_steps=20, max_steps=40)
    generate.generate_dataset(generate.FRACTAL, data_dir, num_episodes=_NUM_EPISODES.value // 4,
                              min_steps=20, max_steps=40)
    print(f"generated datasets in {data_dir} ({time.perf_counter() - start:.1f}s)")

  print(f"\nnorm stats ({os.cpu_count()} CPUs)")
  print(f"{'dataset':24s} {'episodes':>8s} {'steps':>8s} {'seconds':>8s} {'steps/s':>9s}")
  for name in (generate.BRIDGE, generate.FRACTAL):
    dataset = rlds.RldsDataset(rlds.resolve_dataset_dir(data_dir, name),
                               oxe_registry.get_spec(name))
    start = time.perf_counter()
    stats = normalization.load_or_compute_statistics(dataset, recompute=True)
    seconds = time.perf_counter() - start
    print(f"{name:24s} {len(dataset):8d} {stats.num_steps:8d} {seconds:8.2f} "
          f"{stats.num_steps / seconds:9.0f}")

  config = data_config.default_data_config()
  config.data_dir = data_dir
  config.batch_size = _BATCH_SIZE.value
  config.read_threads = _READ_THREADS.value
  config.prefetch_batches = 2 * _READ_THREADS.value
  print(f"\npipeline, bridge+fractal 1:1, 224x224, batch {config.batch_size}, "
        f"{config.read_threads} reader threads/process")
  print(f"{'workers':>7s} {'augment':>7s} {'samples/s':>10s} {'first batches (s)':>18s}")
  for workers in map(int, _WORKERS.value):
    for augment in (False, True):
      config.augment.enabled = augment
      rate, first = _throughput(config, workers)
      print(f"{workers:7d} {str(augment):>7s} {rate:10.1f} {first:18.2f}")
  if _LEROBOT_EPISODES.value:
    _formats_table(config)


def _formats_table(config):
  """The same generated bridge episodes as RLDS and as a LeRobot dataset with video cameras."""
  root = tempfile.mkdtemp(prefix="bench_lerobot_")
  generate.generate_dataset(generate.BRIDGE, root, num_episodes=_LEROBOT_EPISODES.value,
                            min_steps=20, max_steps=40, seed=7)
  spec = oxe_registry.get_spec(generate.BRIDGE)
  source = rlds.RldsDataset(rlds.resolve_dataset_dir(root, generate.BRIDGE), spec, num_cameras=1)
  start = time.perf_counter()
  lerobot.copy_episodes(source, f"{root}/bridge_lerobot", fps=5, video=True)
  print(f"\nwrote {len(source)} bridge episodes as LeRobot v3.0 with AV1 video "
        f"({time.perf_counter() - start:.1f}s)")
  entries = {
      "RLDS (PNG)": generate.BRIDGE,
      "LeRobot (AV1 video)": dict(name=generate.BRIDGE, format="lerobot", dir="bridge_lerobot",
                                  cameras=("observation.images.image_0",),
                                  spec=generate.BRIDGE)}
  config.data_dir, config.augment.enabled, config.weights = root, False, (1.0,)
  print(f"RLDS vs LeRobot, the same {len(source)} episodes ({spec.image_shape[0]}x"
        f"{spec.image_shape[1]} frames), 224x224, batch {config.batch_size}, no augmentation")
  print(f"{'format':>20s} {'workers':>7s} {'samples/s':>10s} {'first batches (s)':>18s}")
  for name, entry in entries.items():
    config.datasets = (entry,)
    config.stats_dir = f"{root}/stats_{entry if isinstance(entry, str) else 'lerobot'}"
    for workers in map(int, _LEROBOT_WORKERS.value):
      rate, first = _throughput(config, workers)
      print(f"{name:>20s} {workers:7d} {rate:10.1f} {first:18.2f}")


if __name__ == "__main__":
  cli.run(main)
