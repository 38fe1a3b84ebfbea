"""The backbone alone as a vision-language model, trained on question-answer data.

    backbone   Qwen2.5-VL or Qwen3-VL (`backbone.family`): image + question -> logits
    loss       next-token cross-entropy on the answer tokens only (`answer_loss`)

A run of this family (`config.family="vlm"`, `configs/vlm.py`) is the pretrained VLM that
`init.vlm_checkpoint` loads into TwinBrain's two brains, the monolithic baseline's one and
Libra's planner, as `init.hf_checkpoint` loads a Hugging Face checkpoint: its `backbone` params
have the layout of those brains. The language head is the backbone's own: the tied embedding
matrix (`tie_word_embeddings`) or its `lm_head`.

Inputs (`obs`, batch-major; `inputs.VlmInputs`): lm_input_ids [B, L], lm_attention_mask [B, L],
lm_position_ids [3, B, L], pixel_values [N, C*T*p*p], and for the loss lm_targets [B, L],
lm_loss_mask [B, L] (`answer_loss.answer_rows`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import numpy as np

from twinbrain_jax.answer_loss import answer_loss
from twinbrain_jax.models import backbones
from twinbrain_jax.models.layers import check_remat_policy
from twinbrain_jax.models.qwen25vl import get_rope_index
from twinbrain_jax.models.tokenizer import left_pad
from twinbrain_jax.models.twinbrain import _dtype, _text_forward_flops, _vision_forward_flops


@dataclasses.dataclass(frozen=True)
class VlmConfig:
  """Everything that shapes a `VisionLanguageModel`."""
  backbone: backbones.BackboneConfig
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat_policy: str = "none"
  scan_layers: bool = True
  # The prompts `inputs.ModelInputs` builds for this model: none besides the question-answer
  # rows.
  prompt_sides: ClassVar[tuple[str, ...]] = ()

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):
      _dtype(getattr(self, name))
    check_remat_policy(self.remat_policy, "VlmConfig.remat_policy")

  @classmethod
  def from_config_dict(cls, model: Mapping[str, Any]) -> VlmConfig:
    """From the `config.model` block of `configs/vlm.py`."""
    items = dict(model.items())
    backbone = backbones.config_from_dict(items.pop("backbone"))
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(items) - fields)
    if unknown:
      raise ValueError(f"Unknown config.model key(s) {unknown}; the fields are {sorted(fields)}.")
    return cls(backbone=backbone, **items)


class VisionLanguageModel(nn.Module):
  """One backbone (`backbone` params: `visual`, `model`, and `lm_head` when untied)."""
  config: VlmConfig

  def setup(self):
    c = self.config
    self.backbone = backbones.model_class(c.backbone)(
        c.backbone, dtype=_dtype(c.dtype), param_dtype=_dtype(c.param_dtype),
        remat_policy=c.remat_policy, scan_layers=c.scan_layers)

  def __call__(self, obs: Mapping[str, jax.Array], image_grid_thw: np.ndarray) -> jax.Array:
    """Logits [B, L, vocab] of the question-answer rows."""
    return self.backbone(obs["lm_input_ids"], obs["lm_attention_mask"], obs["pixel_values"],
                         image_grid_thw, obs["lm_position_ids"])["logits"]


def compute_loss(model: VisionLanguageModel, params: Any, batch: Mapping[str, jax.Array],
                 image_grid_thw: np.ndarray) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The answer-only next-token loss and its metrics (`answer_loss`)."""
  logits = model.apply({"params": params}, batch, image_grid_thw)
  return answer_loss(logits, batch["lm_targets"], batch["lm_loss_mask"])


def init_args(config: VlmConfig) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Smallest valid `(obs, grid)` for `VisionLanguageModel.init`: one image of 8 x 8 patches
  and three text tokens."""
  bb = config.backbone
  grid = np.array([[1, 8, 8]], np.int64)
  image = ([bb.vision_start_token_id] + [bb.image_token_id] * (64 // bb.vision.spatial_merge_size
                                                                ** 2) + [bb.vision_end_token_id])
  ids, mask = left_pad([image + [1, 2, 3]], len(image) + 3, pad_id=0)
  obs = dict(lm_input_ids=ids, lm_attention_mask=mask,
             lm_position_ids=get_rope_index(ids, grid, mask, bb)[0],
             pixel_values=np.zeros((64, bb.vision.patch_dim), np.float32))
  return obs, grid


def train_step_flops(config: VlmConfig, batch: int, length: int, patches_per_image: int
                     ) -> dict[str, int]:
  """Analytic matmul FLOPs of one training step (forward and backward = 3 x forward), the LM
  head included."""
  text = config.backbone.text
  forward = (_vision_forward_flops(config.backbone.vision, patches_per_image, batch)
             + _text_forward_flops(text, batch * length, length)
             + 2 * batch * length * text.hidden_size * text.vocab_size)
  return dict(backbone=3 * forward, total=3 * forward)
