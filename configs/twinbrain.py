"""TwinBrainVLA configs. Use as `--config=configs/twinbrain.py:<preset>`.

Presets: `tiny` (tests, demo), `small` (benchmarks), `qwen25vl_3b`, `qwen25vl_7b`.
Any field can be overridden on the command line, e.g. `--config.mesh.fsdp=4`.
"""

import ml_collections
from ml_collections import config_dict

from twinbrain_jax.config_lib import select_preset
from twinbrain_jax.data.config import default_data_config
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
    ("embodiment", None),
)

# `<|action|>` / `<|propri|>` ids of the right tokenizer: unused rows of each embedding table.
_SPECIAL_TOKEN_IDS = dict(tiny=(496, 497), small=(4086, 4087), **{"3b": (151665, 151666),
                                                                  "7b": (151665, 151666)})


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
  c.data = default_data_config()
  c.data.state_dim = 8  # bridge 7 / fractal 8, zero-padded to the model's state width
  c.data.pad_to_multiple = 28
  # Pipeline batch -> model batch (twinbrain_jax/inputs.py): fixed, left-padded prompt lengths.
  c.inputs = ml_collections.ConfigDict(dict(max_left_tokens=128, max_right_tokens=160))
  m = c.model
  m.variant = "twinbrain"  # or "monolithic": one trainable VLM, no left brain (Qwen-GR00T)
  m.mask_mode = "all_left"  # or "index_causal" (public-code alignment), "full_joint" (ablation)
  m.num_action_queries = 8
  m.action_token_id, m.propri_token_id = _SPECIAL_TOKEN_IDS[backbone]
  m.conditioning = "action_queries"  # or "all_right"
  m.state_dim = 8
  m.state_hidden_dim = 1024
  m.num_embodiments = 1
  m.dtype = "float32"  # compute dtype
  m.param_dtype = "float32"  # trainable parts
  m.left_param_dtype = "bfloat16"  # frozen left brain storage
  m.remat_policy = "none"  # "full" or "dots" (save matmul outputs)
  m.action_expert = ml_collections.ConfigDict(dict(
      num_layers=16, num_heads=12, head_dim=64, action_dim=7, action_horizon=16, state_dim=8,
      num_future_tokens=32, hidden_dim=1024, dropout=0.2))
  # Flow matching: R noise draws per VLM forward; the ODE sampler.
  c.flow = ml_collections.ConfigDict(dict(num_repeats=4, num_steps=4, method="euler"))
  return c


def _tiny():
  c = _base("tiny")
  c.data.image_size = (112, 112)  # 16 merged image tokens keep the demo fast
  c.inputs.update(max_left_tokens=96, max_right_tokens=128)
  c.model.state_hidden_dim = 32
  c.model.action_expert.update(num_layers=2, num_heads=2, head_dim=16, num_future_tokens=4,
                               hidden_dim=32, dropout=0.0)
  return c


def _small():
  c = _base("small")
  c.model.action_expert.update(num_layers=4, num_heads=4, head_dim=64, num_future_tokens=32,
                               hidden_dim=256)
  return c


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
