"""Libra-VLA configs. Use as `--config=configs/libra.py:<preset>`.

Presets: `tiny` (tests), `small` (benchmarks), `metaworld_tiny` (Meta-World MT10, the data and
tokenizer of `configs/twinbrain.py:metaworld_tiny`, docs/libra.md). Each starts from the
TwinBrain preset of the same name (mesh, data, training recipe, checkpoints) and replaces the
model: the same Qwen2.5-VL backbone as planner, a coarse-action head, a SigLIP + DiT refiner.
N = num_bins, M = num_segments, H = segment_length; data.action_horizon = L = M x H.
Any field can be overridden on the command line, e.g. `--config.model.curriculum=none`.
"""

import pathlib

import ml_collections
from ml_collections import config_dict

from twinbrain_jax.config_lib import preset_from_file, select_preset


def _twinbrain(preset: str) -> ml_collections.ConfigDict:
  return preset_from_file(pathlib.Path(__file__).with_name("twinbrain.py"), preset)


def _libra(preset: str, *, head: dict, siglip: dict, num_segments: int = 2,
           segment_length: int = 5) -> ml_collections.ConfigDict:
  c = _twinbrain(preset)
  c.family = "libra"
  expert = c.model.action_expert.to_dict()
  expert.pop("context_dim", None)  # The refiner reads SigLIP's width.
  expert.update(action_horizon=segment_length)
  m = ml_collections.ConfigDict()
  m.backbone = c.model.backbone
  m.planner_head = ml_collections.ConfigDict(head)
  m.siglip = ml_collections.ConfigDict(siglip)
  m.refiner = ml_collections.ConfigDict(expert)
  m.action_dim = expert["action_dim"]
  m.num_bins, m.num_segments, m.segment_length = 10, num_segments, segment_length
  m.state_dim = c.model.state_dim
  m.num_embodiments = c.model.num_embodiments
  # "dynamic": ground-truth bins until the planner's token accuracy reaches tau, then its own;
  # "teacher_forcing" / "none" for the ablation. tau is not published; 0.9 is our choice.
  m.curriculum, m.accuracy_threshold = "dynamic", 0.9
  m.fine_loss_weight, m.plan_loss_weight = 1.0, 1.0
  m.dtype, m.param_dtype, m.remat_policy = "float32", "float32", c.model.remat_policy
  c.model = m
  c.data.action_horizon = num_segments * segment_length
  c.inputs.max_right_tokens = 0  # The planner reads the left (image + instruction) prompt only.
  # A chunk is one refined segment, executed whole.
  c.execution.update(replan_steps=segment_length, ensemble="none", horizon=segment_length)
  # Serving: "interleaved" (plan when the intent buffer is empty, as the paper) or "async" (plan
  # in a background thread); the first `blend_steps` actions of a chunk that follows a fresh plan
  # are blended from the last executed action (serving/libra.py).
  c.runtime = ml_collections.ConfigDict(dict(mode="interleaved", blend_steps=2))
  lr = c.train.optimizer.lr
  c.train.optimizer.lr = ml_collections.ConfigDict(dict(
      planner=lr.right, plan_head=lr.action_expert, refiner=lr.action_expert))
  # Optional HF SiglipVisionModel dir for the refiner's encoder (None = random init).
  c.init.siglip_checkpoint = config_dict.placeholder(str)
  return c


_TINY_HEAD = dict(num_layers=2, width=64, num_heads=4, mlp_ratio=2)
_TINY_SIGLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, image_size=112, patch_size=16, use_head=False)


def _tiny():
  return _libra("tiny", head=_TINY_HEAD, siglip=_TINY_SIGLIP)


def _metaworld_tiny():
  """MT10 with H = 4: a chunk of 4 executed steps, as TwinBrain's `metaworld_tiny` executes
  4 of its 8-step chunks; M = 2 gives L = 8, the same action window."""
  c = _libra("metaworld_tiny", head=dict(_TINY_HEAD, width=128), siglip=_TINY_SIGLIP,
             segment_length=4)
  c.train.num_steps = 1400
  return c


def _small():
  return _libra("small", head=dict(num_layers=4, width=256, num_heads=4, mlp_ratio=4),
                siglip=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                            num_attention_heads=4, image_size=224, patch_size=16,
                            use_head=False))


PRESETS = dict(tiny=_tiny, small=_small, metaworld_tiny=_metaworld_tiny)


def get_config(arg=None):
  return select_preset(arg, PRESETS, "configs/libra.py", default="tiny")
