"""Exports a training run's latest whole checkpoint as an inference bundle (params, config, norm
stats, tokenizer).

  python scripts/export.py --checkpoint_dir=/ckpt/run1/checkpoints --out=/ckpt/run1/bundle \
      --dtype=bfloat16

`--obs_format=libero` (or droid, aloha) records the observation layout the bundle's clients send:
`scripts/serve.py` serves it by default. A damaged newer step is skipped with a warning;
`scripts/checkpoints.py` lists the whole steps. A run with low-rank adapters is exported with
the adapters folded into the weights (`--nomerge_lora` keeps them apart).
"""

import sys

from absl import flags

from twinbrain_jax import cli
from twinbrain_jax.data.rlds import DataError
from twinbrain_jax.serving import formats
from twinbrain_jax.training import checkpoint, export

_CHECKPOINT_DIR = flags.DEFINE_string("checkpoint_dir", None, "The run's checkpoint dir.",
                                      required=True)
_OUT = flags.DEFINE_string("out", None, "The bundle directory (must not exist).", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16", "float16"],
                           "Storage dtype of the exported params.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest whole one.")
_TOKENIZER = flags.DEFINE_string("tokenizer_dir", None, "Default: the run's init.tokenizer.")
_OBS_FORMAT = flags.DEFINE_enum("obs_format", None, sorted(formats.FORMATS),
                                "Record the observation layout clients send (serve.py's default).")
_MERGE_LORA = flags.DEFINE_bool("merge_lora", True, "Fold low-rank adapters into the weights "
                                "(the bundle serves as a model without adapters).")


def main(argv):
  del argv
  try:
    out = export.export_checkpoint(_CHECKPOINT_DIR.value, _OUT.value, _DTYPE.value, _STEP.value,
                                   _TOKENIZER.value, _OBS_FORMAT.value, _MERGE_LORA.value)
  except (checkpoint.DamagedCheckpointError, FileNotFoundError, FileExistsError,
          DataError) as e:
    sys.exit(f"error: {e}")
  print(f"wrote {out}")


if __name__ == "__main__":
  cli.run(main)
