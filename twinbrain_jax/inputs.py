"""From data-pipeline batches to TwinBrainVLA inputs: images -> patches, prompts -> token ids.

Runs on the host (numpy), after the grain pipeline and before `jax.jit`. Every output has a
fixed shape (prompts are left-padded to the lengths in `config.inputs`), so the train step and
the policy compile once.

    left prompt   <|im_start|>user\\n<|vision_start|><|image_pad|>*n<|vision_end|>{instruction}
                  <|im_end|>\\n<|im_start|>assistant\\n
    right prompt  the same turn with text "Instruction: {instruction}\\nAction Query: ", then
                  <|propri|> and N x <|action|> (inserted by id, so the tokenizer needs no
                  new entries; their embedding rows are reserved in the right brain)

Libra-VLA's planner reads the left prompt only (`LibraConfig.prompt_sides`), and its refiner the
current frame for SigLIP (`LibraInputs`).

    question-answer rows  the left prompt's turn with the question as its text, followed by the
                  answer and <|im_end|> (`answer_loss.answer_rows`): the `lm_*` keys that the
                  VLM (`VlmInputs`) and a co-trained VLA (`max_lm_tokens > 0` and an `answer` in
                  the batch) train on
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from twinbrain_jax.answer_loss import answer_rows
from twinbrain_jax.data import transforms
from twinbrain_jax.models.image_processor import preprocess_images, processor_settings
from twinbrain_jax.models.libra import LibraConfig
from twinbrain_jax.models.qwen25vl import get_rope_index
from twinbrain_jax.models.tokenizer import IM_END, QwenTokenizer, left_pad, num_image_tokens
from twinbrain_jax.models.twinbrain import TwinBrainConfig
from twinbrain_jax.models.vlm import VlmConfig

RIGHT_PROMPT = "Instruction: {instruction}\nAction Query: "


@dataclasses.dataclass(frozen=True)
class ModelInputs:
  """Turns a pipeline batch (`image [B, H, W, 3] uint8`, `instruction [B]`, `state [B, S]`, and
  for training `actions [B, T, A]`, `action_mask [B, T]`) into the model's batch.

  Attributes:
    config: the model config (token ids, number of action queries, state width).
    tokenizer: the checkpoint's tokenizer.
    max_left_tokens, max_right_tokens: fixed prompt lengths (left padding).
    image_size: (H, W) the pipeline delivers; multiples of patch x merge (28 for Qwen2.5-VL, 32
      for Qwen3-VL) so images are not resized again.
    max_lm_tokens: fixed length of the question-answer rows (0: none are built).
  """
  config: TwinBrainConfig
  tokenizer: QwenTokenizer
  max_left_tokens: int
  max_right_tokens: int
  image_size: tuple[int, int] = (224, 224)
  max_lm_tokens: int = 0

  def __post_init__(self):
    factor = self.config.backbone.vision.patch_size * self.config.backbone.vision.spatial_merge_size
    if any(s % factor for s in self.image_size):
      raise ValueError(f"image_size={tuple(self.image_size)} must be multiples of {factor} "
                       "(patch x merge) so the processor keeps it; set data.image_size or "
                       f"data.pad_to_multiple={factor}.")
    self.tokenizer.check_ids(self.config.backbone)

  @property
  def patches_per_image(self) -> int:
    p = self.config.backbone.vision.patch_size
    return (self.image_size[0] // p) * (self.image_size[1] // p)

  def image_grid_thw(self, batch_size: int) -> np.ndarray:
    """[B, 3] patch grids of a batch (one image per sample); static for the jitted step."""
    p = self.config.backbone.vision.patch_size
    return np.tile(np.array([[1, self.image_size[0] // p, self.image_size[1] // p]], np.int64),
                   (batch_size, 1))

  def pixel_values(self, images: np.ndarray) -> np.ndarray:
    """[B, H, W, 3] uint8 -> [B * patches, C*T*p*p] float32, samples in order."""
    if images.ndim != 4 or tuple(images.shape[1:3]) != tuple(self.image_size):
      raise ValueError(f"Expected images [B, {self.image_size[0]}, {self.image_size[1]}, 3]; got "
                       f"{images.shape}. Set data.image_size to the model's image size.")
    vision = self.config.backbone.vision
    side = self.image_size[0] * self.image_size[1]
    # The family's normalisation; sizes from the model's vision config.
    settings = dict(processor_settings(self.config.backbone.family), min_pixels=side,
                    max_pixels=side, patch_size=vision.patch_size,
                    temporal_patch_size=vision.temporal_patch_size,
                    merge_size=vision.spatial_merge_size)
    pixels, _ = preprocess_images(list(images), **settings)
    return pixels

  def prompts(self, instructions: Sequence[Any]) -> dict[str, np.ndarray]:
    """Left and right token ids, masks and M-RoPE positions, each [B, L] / [3, B, L]."""
    texts = [i.decode() if isinstance(i, bytes) else str(i) for i in instructions]
    c, tok = self.config, self.tokenizer
    grid = self.image_grid_thw(len(texts))
    image_tokens = [[n] for n in num_image_tokens(grid, c.backbone.vision.spatial_merge_size)]
    rows = dict(left=[tok.encode_chat(t, n) for t, n in zip(texts, image_tokens)])
    if "right" in c.prompt_sides:
      queries = [c.propri_token_id] + [c.action_token_id] * c.num_action_queries
      rows["right"] = [tok.encode_chat(RIGHT_PROMPT.format(instruction=t), n) + queries
                       for t, n in zip(texts, image_tokens)]
    out = {}
    for side in c.prompt_sides:
      length = getattr(self, f"max_{side}_tokens")
      longest = max(len(r) for r in rows[side])
      if longest > length:
        raise ValueError(f"A {side} prompt has {longest} tokens, more than "
                         f"inputs.max_{side}_tokens={length}; raise it or shorten the "
                         "instruction.")
      ids, mask = left_pad(rows[side], length, tok.pad_id)
      out[f"{side}_input_ids"], out[f"{side}_attention_mask"] = ids, mask
      out[f"{side}_position_ids"] = get_rope_index(ids, grid, mask, c.backbone)[0]
    return out

  def answer_rows(self, questions: Sequence[Any], answers: Sequence[Any]
                  ) -> dict[str, np.ndarray]:
    """Question-answer rows: `lm_input_ids`, `lm_attention_mask`, `lm_targets` [B, L] int32,
    `lm_loss_mask` [B, L] float32 (1 on answer targets only) and `lm_position_ids` [3, B, L],
    L = `max_lm_tokens`. An empty answer gives a row without targets."""
    tok, backbone = self.tokenizer, self.config.backbone
    grid = self.image_grid_thw(len(questions))
    image_tokens = num_image_tokens(grid, backbone.vision.spatial_merge_size)
    prompts = [tok.encode_chat(_text(q), [n]) for q, n in zip(questions, image_tokens)]
    answer_ids = [tok.encode(_text(a)) + [tok.special_ids[IM_END]] if _text(a) else []
                  for a in answers]
    rows = answer_rows(prompts, answer_ids, self.max_lm_tokens, tok.pad_id)
    out = {f"lm_{key}": value for key, value in rows.items()}
    out["lm_position_ids"] = get_rope_index(rows["input_ids"], grid, rows["attention_mask"],
                                            backbone)[0]
    return out

  def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model batch: prompts, `pixel_values`, `state`, the training targets if present, and
    the question-answer rows when `max_lm_tokens > 0` and the batch has answers."""
    for key in ("image", "instruction", "state"):
      if key not in batch:
        raise KeyError(f"The batch has no {key!r}; the data pipeline must provide image, "
                       f"instruction and state (got {sorted(batch)}).")
    state = np.asarray(batch["state"], np.float32)
    if state.shape[-1] != self.config.state_dim:
      raise ValueError(f"The batch's state has width {state.shape[-1]} but model.state_dim is "
                       f"{self.config.state_dim}; set data.state_dim={self.config.state_dim}.")
    out = self.prompts(batch["instruction"])
    out["pixel_values"] = self.pixel_values(np.asarray(batch["image"]))
    out["state"] = state
    for key in ("actions", "action_mask", "embodiment_id"):
      if key in batch:
        out[key] = np.asarray(batch[key])
    if self.max_lm_tokens and "answer" in batch:
      out.update(self.answer_rows(batch["instruction"], batch["answer"]))
    return out


def _text(value: Any) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class VlmInputs(ModelInputs):
  """`ModelInputs` for the VLM: question-answer rows (`image`, `instruction` = the question and
  `answer` of a batch) and `pixel_values`, nothing else."""
  config: VlmConfig

  def __post_init__(self):
    super().__post_init__()
    if self.max_lm_tokens < 1:
      raise ValueError("The VLM needs inputs.max_lm_tokens > 0 (its question-answer row length).")

  def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    for key in ("image", "instruction", "answer"):
      if key not in batch:
        raise KeyError(f"The batch has no {key!r}; a VLM trains on question-answer data whose "
                       f"registry entry has text_keys with 'answer' (e.g. metaworld_vqa); got "
                       f"{sorted(batch)}.")
    out = self.answer_rows(batch["instruction"], batch["answer"])
    out["pixel_values"] = self.pixel_values(np.asarray(batch["image"]))
    return out


@dataclasses.dataclass(frozen=True)
class LibraInputs(ModelInputs):
  """`ModelInputs` for Libra-VLA: the planner's (left) prompt and patches, plus the refiner's
  SigLIP `frame [B, S, S, 3]` float32 in [-1, 1] (SigLIP's normalisation, mean = std = 0.5)."""
  config: LibraConfig

  def frames(self, images: np.ndarray) -> np.ndarray:
    """[B, H, W, 3] uint8 -> [B, S, S, 3] float32, S = `siglip.image_size`."""
    side = self.config.siglip.image_size
    resized = np.stack([transforms.resize(np.asarray(i), (side, side)) for i in images])
    return resized.astype(np.float32) / 127.5 - 1.0

  def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = super().__call__(batch)
    out["frame"] = self.frames(np.asarray(batch["image"]))
    return out


def model_inputs_for(model_config: Any, tokenizer: QwenTokenizer, max_left_tokens: int,
                     max_right_tokens: int, image_size: tuple[int, int], max_lm_tokens: int = 0
                     ) -> ModelInputs:
  """The inputs of a model config's family: `LibraInputs` for Libra, `VlmInputs` for the VLM,
  else `ModelInputs`."""
  cls = ModelInputs
  if isinstance(model_config, LibraConfig):
    cls = LibraInputs
  elif isinstance(model_config, VlmConfig):
    cls = VlmInputs
  return cls(model_config, tokenizer, int(max_left_tokens), int(max_right_tokens),
             tuple(image_size), int(max_lm_tokens))
