"""VLM configs: the backbone alone, trained on question-answer data with the answer-only
next-token loss (`config.family="vlm"`, twinbrain_jax/models/vlm.py). Use as
`--config=configs/vlm.py:<preset>`.

Presets at the Meta-World sizes, on the corpus of `scripts/make_vqa_dataset.py`
(`metaworld_vqa`): `metaworld_vlm` (the tiny Qwen2.5-VL backbone of
`configs/twinbrain.py:metaworld_tiny`) and `metaworld_vlm_qwen3vl` (the tiny Qwen3-VL backbone of
`configs/twinbrain.py:metaworld_tiny_qwen3vl`). Each starts from that TwinBrain preset (mesh,
data pipeline, training loop, checkpoints) and replaces the model and the data; its checkpoint
dir is what `--config.init.vlm_checkpoint` of a VLA run loads (docs/vqa.md).
"""

import pathlib

import ml_collections

from twinbrain_jax.config_lib import preset_from_file, select_preset


def _twinbrain(preset: str) -> ml_collections.ConfigDict:
  return preset_from_file(pathlib.Path(__file__).with_name("twinbrain.py"), preset)


def _vlm(preset: str) -> ml_collections.ConfigDict:
  c = _twinbrain(preset)
  c.family = "vlm"
  m = ml_collections.ConfigDict()
  m.backbone = c.model.backbone
  m.dtype, m.param_dtype = c.model.dtype, c.model.param_dtype
  m.remat_policy, m.scan_layers = c.model.remat_policy, c.model.scan_layers
  c.model = m
  # One question-answer row per sample: image tokens, question, answer, <|im_end|>.
  c.inputs.max_lm_tokens = 128
  c.data.update(datasets=("metaworld_vqa",), weights=(1.0,), state_dim=4, action_dim=0)
  # Validation (train.eval_data_dir = the same data dir) reads the held-out scenes.
  c.train.update(num_steps=2000, log_every=50, eval_every=500, eval_split="heldout")
  c.train.optimizer.update(warmup_steps=100, min_lr=1e-5)
  c.train.optimizer.lr = ml_collections.ConfigDict(dict(backbone=1e-3))
  c.checkpoint.update(every=250, keep_last=2)
  return c


PRESETS = dict(metaworld_vlm=lambda: _vlm("metaworld_tiny"),
               metaworld_vlm_qwen3vl=lambda: _vlm("metaworld_tiny_qwen3vl"))


def get_config(arg=None):
  return select_preset(arg, PRESETS, "configs/vlm.py", default="metaworld_vlm")
