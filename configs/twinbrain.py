"""TwinBrainVLA configs. Use as `--config=configs/twinbrain.py:<preset>`.

Presets: `tiny` (tests, demo), `small` (benchmarks), `qwen25vl_3b`, `qwen25vl_7b`.
Any field can be overridden on the command line, e.g. `--config.mesh.fsdp=4`.
"""

import ml_collections
from ml_collections import config_dict

from twinbrain_jax.config_lib import select_preset
from twinbrain_jax.models.backbone_presets import backbone_preset

# Logical axis name -> mesh axes. Ordered: the first rule whose mesh axes are still free wins,
# so activations `[batch, length, embed]` put batch on (data, fsdp) and leave embed whole.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("norm", None),
    ("patch", None),
    ("layers", None),
    ("action", None),
    ("state", None),
)


def _base(backbone: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Device mesh: sizes of the named axes; -1 takes all remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.logical_axis_rules = LOGICAL_AXIS_RULES
  # Multi-process start-up. Leave unset to auto-detect TPU pods / SLURM / Open MPI.
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address=config_dict.placeholder(str),
      num_processes=config_dict.placeholder(int),
      process_id=config_dict.placeholder(int),
      auto=False))
  c.model = ml_collections.ConfigDict()
  c.model.backbone = backbone_preset(backbone)
  return c


def _tiny():
  return _base("tiny")


def _small():
  return _base("small")


def _qwen25vl_3b():
  c = _base("3b")
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  return c


def _qwen25vl_7b():
  c = _base("7b")
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  return c


PRESETS = dict(tiny=_tiny, small=_small, qwen25vl_3b=_qwen25vl_3b, qwen25vl_7b=_qwen25vl_7b)


def get_config(arg=None):
  return select_preset(arg, PRESETS, "configs/twinbrain.py", default="tiny")
