"""Converts a published TFRecord RLDS dataset (e.g. from the OXE bucket) to ArrayRecord.

Needs the `tf` extra (`pip install -c requirements/constraints.txt -e '.[tf]'`).

  # In place: ArrayRecord shards next to the TFRecord ones.
  python scripts/convert_tfrecord.py --dataset_dir=/data/tfds/bridge_dataset/1.0.0
  # Into a new TFDS data dir (the source is not touched): /data/tfds_ar/bridge_dataset/1.0.0
  python scripts/convert_tfrecord.py --dataset_dir=/data/tfds/bridge_dataset/1.0.0 \
      --out_dir=/data/tfds_ar [--num_workers=8] [--overwrite]

Prints "converted" only after the result was opened and its episode counts matched the source;
any failed shard exits non-zero naming it, with nothing published.
"""

import sys

from absl import flags

from twinbrain_jax import cli
from twinbrain_jax.data import convert

_DATASET_DIR = flags.DEFINE_string("dataset_dir", None, "TFDS version dir of the TFRecord data.",
                                   required=True)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Root of a new TFDS data dir; default: in place.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 8, "Shards converted in parallel.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing converted output.")


def main(argv):
  del argv
  try:
    result = convert.convert_to_array_record(_DATASET_DIR.value, _OUT_DIR.value,
                                             _NUM_WORKERS.value, _OVERWRITE.value)
  except (convert.ConversionError, OSError, ValueError, ImportError) as e:
    sys.exit(f"error: {e}")
  episodes = ", ".join(f"{split} {n}" for split, n in sorted(result.episodes.items()))
  if result.already_converted:
    print(f"already converted: {result.path} ({episodes} episodes); pass --overwrite to redo")
  else:
    print(f"converted {_DATASET_DIR.value} -> {result.path}: {result.shards} shards, "
          f"{episodes} episodes (checked against the source)")


if __name__ == "__main__":
  cli.run(main)
