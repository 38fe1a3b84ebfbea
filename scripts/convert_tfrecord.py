"""Converts a published TFRecord RLDS dataset (e.g. from the OXE bucket) to ArrayRecord.

Needs the `tf` extra (`pip install 'twinbrain_jax[tf]'`).

  python scripts/convert_tfrecord.py --dataset_dir=/data/tfds/bridge_dataset/1.0.0 \
      [--out_dir=/data/tfds_ar] [--num_workers=8] [--overwrite]
"""

from absl import flags

from twinbrain_jax import cli
from twinbrain_jax.data import rlds

_DATASET_DIR = flags.DEFINE_string("dataset_dir", None, "TFDS version dir of the TFRecord data.",
                                   required=True)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output root; default: next to the input.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 8, "Parallel shard conversions.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Overwrite existing converted output.")


def main(argv):
  del argv
  rlds.convert_to_array_record(_DATASET_DIR.value, _OUT_DIR.value, _NUM_WORKERS.value,
                               _OVERWRITE.value)
  print(f"converted {_DATASET_DIR.value} to array_record"
        + (f" under {_OUT_DIR.value}" if _OUT_DIR.value else ""))


if __name__ == "__main__":
  cli.run(main)
