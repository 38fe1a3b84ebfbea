"""TwinBrainVLA: frozen left brain + trainable right brain (AsyMoT) + flow-matching DiT expert.

    left brain   Qwen2.5-VL or Qwen3-VL (`backbone.family`), frozen, stored and run in bf16
                 (optionally int8 weight-only decoder kernels): image + instruction
    right brain  a copy of the same VLM, trainable: image + "Instruction: ..\nAction Query: "
                 + <|propri|> + N x <|action|>; the <|propri|> embedding is replaced by
                 phi(state). It precedes the queries so that, under causal attention, every
                 action query sees the state.
    AsyMoT       at every layer right queries attend to [stop_grad(K/V_left), K/V_right]
    expert       DiT cross-attending to the right brain's final states at the action queries

With Qwen3-VL, each brain's vision tower also gives DeepStack maps that are added to that
brain's own stream after its first decoder layers (inside the AsyMoT loop); AsyMoT is unchanged.

The `monolithic` variant (Qwen-GR00T) drops the left brain: the right brain runs alone.

With `lora.rank > 0` the right brain's decoder projections named by `lora.targets` carry
low-rank adapters (`layers.LowRankAdapter`); training then updates the adapters, the state
encoder and the expert, and the right brain's base weights stay frozen.

Observation inputs (`obs`, a dict of arrays, batch-major):
    left_input_ids [B, Ll], left_attention_mask [B, Ll], left_position_ids [3, B, Ll]
    right_input_ids [B, Lr], right_attention_mask [B, Lr], right_position_ids [3, B, Lr]
    pixel_values [N, C*T*p*p] (the images of all samples, in sample order)
    state [B, S]; optional embodiment_id [B] int
`image_grid_thw` [n_images, 3] is host numpy, static: it shapes the vision towers.
Position ids come from `qwen25vl.get_rope_index` on the host (the data pipeline or the policy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from twinbrain_jax import flow_matching
from twinbrain_jax.models import asymot, backbones, qwen25vl
from twinbrain_jax.models.dit import (ActionExpert, ActionExpertConfig, EmbodimentMLP,
                                      action_expert_flops, scanned_expert_params)
from twinbrain_jax.models.layers import (REMAT_POLICIES, LoraConfig, dequantize_kernels,
                                         merge_adapters, quantize_kernels, split_adapters,
                                         stack_layer_params)
from twinbrain_jax.models.qwen25vl import (DECODER_PROJECTIONS, decoder_projection_shapes,
                                           get_rope_index)
from twinbrain_jax.models.tokenizer import left_pad

VARIANTS = ("twinbrain", "monolithic")
CONDITIONINGS = ("action_queries", "all_right")
LEFT_QUANTIZATIONS = ("none", "int8")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(name: str) -> Any:
  if name not in _DTYPES:
    raise ValueError(f"Unknown dtype {name!r}; choose one of {sorted(_DTYPES)}.")
  return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class TwinBrainConfig:
  """Everything that shapes a `TwinBrainVLA`.

  `action_token_id` / `propri_token_id` are the right tokenizer's `<|action|>` / `<|propri|>`
  ids; they reuse unused rows of the embedding table so the vocabulary (and its sharding) keeps
  its size. `left_param_dtype` / `left_dtype` are the frozen left brain's storage and compute
  dtypes; `left_quantization="int8"` stores its decoder kernels as int8 with per-channel scales
  (dequantized layer by layer inside the joint scan). `lora` puts low-rank adapters on the right
  brain (rank 0: full fine-tuning).
  """
  backbone: backbones.BackboneConfig
  action_expert: ActionExpertConfig
  action_token_id: int
  propri_token_id: int
  variant: str = "twinbrain"
  mask_mode: str = "all_left"
  num_action_queries: int = 8
  conditioning: str = "action_queries"
  state_dim: int = 7
  state_hidden_dim: int = 1024
  num_embodiments: int = 1
  dtype: str = "float32"
  param_dtype: str = "float32"
  left_param_dtype: str = "bfloat16"
  left_dtype: str = "bfloat16"
  left_quantization: str = "none"
  lora: LoraConfig = LoraConfig()
  remat_policy: str = "none"
  scan_layers: bool = True
  # The prompts `inputs.ModelInputs` builds for this model.
  prompt_sides: ClassVar[tuple[str, ...]] = ("left", "right")

  def __post_init__(self):
    for name, allowed in (("variant", VARIANTS), ("mask_mode", asymot.MASK_MODES),
                          ("conditioning", CONDITIONINGS),
                          ("left_quantization", LEFT_QUANTIZATIONS),
                          ("remat_policy", tuple(REMAT_POLICIES))):
      if getattr(self, name) not in allowed:
        raise ValueError(f"TwinBrainConfig.{name}={getattr(self, name)!r}; choose one of {allowed}.")
    for name in ("dtype", "param_dtype", "left_param_dtype", "left_dtype"):
      _dtype(getattr(self, name))
    _dtype(self.lora.base_param_dtype)
    self.lora.check(decoder_projection_shapes(self.backbone.text))
    if self.left_quantization != "none" and not (self.scan_layers and self.variant == "twinbrain"):
      raise ValueError(f"TwinBrainConfig.left_quantization={self.left_quantization!r} needs "
                       "variant='twinbrain' and scan_layers=True (the joint scan dequantizes "
                       "the left brain's kernels layer by layer).")
    vocab = self.backbone.text.vocab_size
    for name in ("action_token_id", "propri_token_id"):
      if not 0 <= getattr(self, name) < vocab:
        raise ValueError(f"TwinBrainConfig.{name}={getattr(self, name)} is outside the "
                         f"vocabulary [0, {vocab}).")
    if self.action_expert.context_dim != self.backbone.text.hidden_size:
      raise ValueError(
          f"action_expert.context_dim={self.action_expert.context_dim} must equal the backbone "
          f"hidden size {self.backbone.text.hidden_size} (the expert reads the right brain).")
    if self.action_expert.state_dim not in (0, self.state_dim):
      raise ValueError(f"action_expert.state_dim={self.action_expert.state_dim} must be 0 or "
                       f"state_dim={self.state_dim}.")

  @classmethod
  def from_config_dict(cls, model: Mapping[str, Any]) -> TwinBrainConfig:
    """From the `config.model` block (`backbone`, `action_expert` and the fields above)."""
    items = dict(model.items())
    backbone = backbones.config_from_dict(items.pop("backbone"))
    expert = dict(items.pop("action_expert").items())
    expert.setdefault("context_dim", backbone.text.hidden_size)
    # One switch for the whole model: the expert's blocks scan and remat like the brains' layers
    # unless `action_expert` says otherwise.
    expert.setdefault("scan_layers", items.get("scan_layers", True))
    expert.setdefault("remat_policy", items.get("remat_policy", "none"))
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(items) - fields)
    if unknown:
      raise ValueError(f"Unknown config.model key(s) {unknown}; the fields are {sorted(fields)}.")
    lora = dict(items.pop("lora", {}) or {})
    lora_fields = {f.name for f in dataclasses.fields(LoraConfig)}
    if set(lora) - lora_fields:
      raise ValueError(f"Unknown config.model.lora key(s) {sorted(set(lora) - lora_fields)}; the "
                       f"fields are {sorted(lora_fields)}.")
    return cls(backbone=backbone, action_expert=ActionExpertConfig.from_config_dict(expert),
               lora=LoraConfig(**lora), **items)


def action_query_context(hidden: jax.Array, input_ids: jax.Array, action_token_id: int,
                         num_queries: int) -> jax.Array:
  """Gathers the states at the `num_queries` action-query tokens of each row.

  Args:
    hidden: [B, L, E] final-norm states.
    input_ids: [B, L]; each row holds exactly `num_queries` `action_token_id` tokens (rows may be
      left-padded to different lengths, so the positions differ per row).

  Returns:
    [B, N, E] in prompt order.
  """
  is_query = input_ids == action_token_id
  # A stable sort of "not a query" puts the query positions first, in order.
  positions = jnp.argsort(~is_query, axis=1, stable=True)[:, :num_queries]  # [B, N]
  return jnp.take_along_axis(hidden, positions[:, :, None], axis=1)


class TwinBrainVLA(nn.Module):
  """The dual-brain policy; `variant="monolithic"` is the single-VLM baseline (Qwen-GR00T)."""
  config: TwinBrainConfig

  def setup(self):
    c = self.config
    dtype, param_dtype = _dtype(c.dtype), _dtype(c.param_dtype)
    vlm = backbones.model_class(c.backbone)
    if c.variant == "twinbrain":  # Frozen: forward only, so no remat.
      self.left = vlm(c.backbone, dtype=_dtype(c.left_dtype),
                      param_dtype=_dtype(c.left_param_dtype), scan_layers=c.scan_layers)
    self.right = vlm(c.backbone, dtype=dtype, param_dtype=param_dtype,
                     remat_policy=c.remat_policy, scan_layers=c.scan_layers,
                     lora=c.lora if c.lora.enabled else None)
    self.state_encoder = EmbodimentMLP(
        c.state_hidden_dim, c.backbone.text.hidden_size, num_embodiments=c.num_embodiments,
        axes=("state", "mlp", "embed"), dtype=dtype, param_dtype=param_dtype)
    self.action_expert = ActionExpert(c.action_expert, dtype=dtype, param_dtype=param_dtype)

  def brains(self, obs: Mapping[str, jax.Array], image_grid_thw: np.ndarray
             ) -> tuple[jax.Array | None, jax.Array]:
    """Runs both brains jointly.

    Returns:
      (left final-norm states [B, Ll, E] or None for `monolithic`, right final-norm states
      [B, Lr, E]).
    """
    c = self.config
    pixels, ids = obs["pixel_values"], obs["right_input_ids"]
    # [B, Lr, E] and the DeepStack maps [K, B, Lr, E] (None for Qwen2.5-VL).
    right, additions_right = self.right.embed_multimodal(ids, pixels, image_grid_thw)
    state = nn.with_logical_constraint(
        self.state_encoder(obs["state"].astype(right.dtype), obs.get("embodiment_id")),
        ("batch", "embed"))
    right = jnp.where((ids == c.propri_token_id)[..., None], state[:, None, :].astype(right.dtype),
                      right)
    right_text = self.right.model
    rope_right = right_text.rotary(obs["right_position_ids"])
    if c.variant == "monolithic":
      hidden_right, _ = right_text(right, obs["right_position_ids"], obs["right_attention_mask"],
                                   layer_additions=additions_right)
      return None, hidden_right

    left_text = self.left.model
    left, additions_left = self.left.embed_multimodal(obs["left_input_ids"], pixels,
                                                      image_grid_thw)  # [B, Ll, E]
    left = left.astype(left_text.dtype)
    rope_left = left_text.rotary(obs["left_position_ids"])
    masks = asymot.joint_masks(obs["left_attention_mask"], obs["right_attention_mask"], c.mask_mode)
    if not c.scan_layers:
      hidden_left, hidden_right = asymot.asymot_forward(
          left_text.layers, right_text.layers, left, right, rope_left, rope_right, masks,
          additions_left, additions_right)
      return left_text.norm(hidden_left), right_text.norm(hidden_right)
    if self.is_initializing():
      # Creates both stacks' params (the joint scan below reads them as stacked arrays).
      left_len = left.shape[1]
      left_text.run_layers(left, *rope_left, masks.left[..., :left_len])
      right_text.run_layers(right, *rope_right, masks.right[..., left_len:])
    # Low-rank adapter dropout (`lora.dropout`) runs when the caller passes a `dropout` rng.
    dropout_rng = self.make_rng("dropout") if self.has_rng("dropout") else None
    hidden_left, hidden_right = asymot.asymot_scan(
        left_text.layer(), right_text.layer(), left_text.stacked_layer_params(),
        right_text.stacked_layer_params(), left, right, rope_left, rope_right, masks,
        c.remat_policy, additions_left, additions_right, dropout_rng=dropout_rng)
    return left_text.norm(hidden_left), right_text.norm(hidden_right)

  def encode(self, obs: Mapping[str, jax.Array], image_grid_thw: np.ndarray
             ) -> tuple[jax.Array, jax.Array]:
    """The expert's conditioning: (context [B, Lc, E], context_mask [B, Lc] bool)."""
    c = self.config
    _, hidden_right = self.brains(obs, image_grid_thw)
    if c.conditioning == "all_right":
      return hidden_right, obs["right_attention_mask"].astype(bool)
    context = action_query_context(hidden_right, obs["right_input_ids"], c.action_token_id,
                                   c.num_action_queries)
    return context, jnp.ones(context.shape[:2], bool)

  def context_kv(self, context: jax.Array) -> Any:
    """The expert's cross-attention K/V of `context`: computed once per observation."""
    return self.action_expert.context_kv(context)

  def velocity(self, noisy_actions: jax.Array, t: jax.Array, context_kv: Any,
               context_mask: jax.Array, state: jax.Array, embodiment_id: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    """`x_t [B, T, A]`, `t [B]` -> velocity [B, T, A] (the only part run per ODE step)."""
    state = state if self.config.action_expert.state_dim else None
    return self.action_expert(noisy_actions, t, context_kv=context_kv, context_mask=context_mask,
                              state=state, embodiment_id=embodiment_id,
                              deterministic=deterministic)

  def answer_logits(self, obs: Mapping[str, jax.Array], image_grid_thw: np.ndarray
                    ) -> jax.Array:
    """The right brain alone as a VLM on the question-answer rows (`lm_input_ids [B, L]`, ...;
    `inputs.ModelInputs.answer_rows`), through its own language head: logits [B, L, vocab].
    Co-training's answer loss reads them."""
    return self.right(obs["lm_input_ids"], obs["lm_attention_mask"], obs["pixel_values"],
                      image_grid_thw, obs["lm_position_ids"])["logits"]

  def __call__(self, obs: Mapping[str, jax.Array], image_grid_thw: np.ndarray,
               noisy_actions: jax.Array, t: jax.Array) -> jax.Array:
    """Brains + expert in one call (used by `init`)."""
    context, context_mask = self.encode(obs, image_grid_thw)
    return self.velocity(noisy_actions, t, self.context_kv(context), context_mask, obs["state"],
                         obs.get("embodiment_id"))


def compute_loss(model: TwinBrainVLA, params: Any, batch: Mapping[str, jax.Array],
                 image_grid_thw: np.ndarray, rng: jax.Array, num_repeats: int = 4,
                 train: bool = True) -> jax.Array:
  """Flow-matching loss: the brains run once, the expert on R noise draws of each sample.

  Args:
    params: the `params` collection of `model`.
    batch: observation inputs plus `actions [B, T, A]` and `action_mask [B, T]`.
    num_repeats: R noise/time draws per VLM forward.
    train: applies dropout in the expert.
  """
  variables = {"params": params}
  loss_rng, dropout_rng = jax.random.split(rng)
  # The brains draw dropout (only low-rank adapters have any) from their own stream.
  brain_rngs = ({"dropout": jax.random.fold_in(dropout_rng, 1)}
                if train and model.config.lora.dropout else {})
  context, context_mask = model.apply(variables, batch, image_grid_thw, method=TwinBrainVLA.encode,
                                      rngs=brain_rngs)
  kv = model.apply(variables, context, method=TwinBrainVLA.context_kv)
  repeated = flow_matching.repeat_batch(
      dict(kv=kv, mask=context_mask, state=batch["state"],
           embodiment_id=batch.get("embodiment_id")), num_repeats)

  def velocity_fn(x_t, t):
    return model.apply(variables, x_t, t, repeated["kv"], repeated["mask"], repeated["state"],
                       repeated["embodiment_id"], deterministic=not train,
                       method=TwinBrainVLA.velocity, rngs={"dropout": dropout_rng})

  return flow_matching.flow_loss(velocity_fn, loss_rng, batch["actions"],
                                 batch.get("action_mask"), num_repeats)


def observation_context(model: TwinBrainVLA, params: Any, obs: Mapping[str, jax.Array],
                        image_grid_thw: np.ndarray) -> tuple[Any, jax.Array]:
  """The brains and the expert's cross-attention K/V of `obs`: run once per observation.

  Returns:
    (context K/V, context_mask [B, Lc] bool), the inputs of `denoise`.
  """
  variables = {"params": params}
  context, context_mask = model.apply(variables, obs, image_grid_thw, method=TwinBrainVLA.encode)
  return model.apply(variables, context, method=TwinBrainVLA.context_kv), context_mask


def denoise(model: TwinBrainVLA, params: Any, obs: Mapping[str, jax.Array], context_kv: Any,
            context_mask: jax.Array, noise: jax.Array, num_steps: int = 4,
            method: str = "euler") -> jax.Array:
  """Integrates `noise [B, T, A]` to action chunks [B, T, A]; only the DiT runs per ODE step."""

  def velocity_fn(x_t, t):
    return model.apply({"params": params}, x_t, t, context_kv, context_mask, obs["state"],
                       obs.get("embodiment_id"), method=TwinBrainVLA.velocity)

  return flow_matching.integrate(velocity_fn, noise, num_steps=num_steps, method=method)


def action_chunk_shape(config: TwinBrainConfig, batch_size: int) -> tuple[int, int, int]:
  """[B, T, A] of the sampled (normalised) action chunks."""
  return batch_size, config.action_expert.action_horizon, config.action_expert.action_dim


def sample_actions(model: TwinBrainVLA, params: Any, obs: Mapping[str, jax.Array],
                   image_grid_thw: np.ndarray, rng: jax.Array, num_steps: int = 4,
                   method: str = "euler") -> jax.Array:
  """Draws one action chunk per observation, [B, T, A] (normalised actions).

  The brains and the expert's cross-attention K/V run once; only the DiT runs per ODE step.
  """
  context_kv, context_mask = observation_context(model, params, obs, image_grid_thw)
  noise = jax.random.normal(rng, action_chunk_shape(model.config, obs["state"].shape[0]))
  return denoise(model, params, obs, context_kv, context_mask, noise, num_steps, method)


def init_right_from_left(left_params: Any, config: TwinBrainConfig, num_real_tokens: int,
                         param_dtype: Any = jnp.float32) -> Any:
  """The right brain's initial params: a copy of the left brain's, with the new special tokens'
  embedding rows set to the mean of the `num_real_tokens` real token embeddings."""
  right = jax.tree.map(lambda x: jnp.asarray(x, param_dtype), left_params)
  table = right["model"]["embed_tokens"]["embedding"]  # [V, E]
  mean = table[:num_real_tokens].mean(axis=0)
  new_ids = jnp.array([config.action_token_id, config.propri_token_id])
  right["model"]["embed_tokens"]["embedding"] = table.at[new_ids].set(mean)
  return right


def frozen_left_params(config: TwinBrainConfig, left: Mapping[str, Any]) -> dict[str, Any]:
  """The left brain's params as the train state holds them: in `left_param_dtype`, and with
  `left_quantization="int8"` its decoder kernels int8 with per-channel scales (the leaves may
  be logically boxed)."""
  dtype = _dtype(config.left_param_dtype)
  left = jax.tree.map(lambda x: x.astype(dtype), dict(left))
  if config.left_quantization == "int8":
    model = dict(left["model"])
    contracted = {name.rsplit("/", 1)[-1]: n for name, n in DECODER_PROJECTIONS.items()}
    model["layers"] = quantize_kernels(model["layers"], contracted, prefix=1)
    left["model"] = model
  return left


def split_trainable(config: TwinBrainConfig, params: Mapping[str, Any]
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
  """A full `params` collection -> (frozen, trainable).

  Frozen: the left brain (`frozen_left_params`) and, with low-rank adapters, the right brain's
  base weights in `lora.base_param_dtype`. Trainable: the rest (with adapters, the right brain's
  adapters alone). `layers.merge_trees(frozen, trainable)` is the collection again.
  """
  trainable = dict(params)
  frozen = {}
  if "left" in trainable:
    frozen["left"] = frozen_left_params(config, trainable.pop("left"))
  if config.lora.enabled:
    base, trainable["right"] = split_adapters(trainable["right"])
    dtype = _dtype(config.lora.base_param_dtype)
    frozen["right"] = jax.tree.map(lambda x: x.astype(dtype), base)
  return frozen, trainable


def merged_adapter_params(config: TwinBrainConfig, params: Mapping[str, Any]) -> dict[str, Any]:
  """The full `params` collection with the right brain's adapters folded into its kernels
  (`W + alpha / rank * A B`, float32 kernels): the params of the same model without adapters."""
  params = dict(params)
  if config.lora.enabled:
    params["right"] = merge_adapters(params["right"], config.lora.scale, jnp.float32)
  return params


def left_keys_values(config: TwinBrainConfig, left_params: Mapping[str, Any],
                     obs: Mapping[str, jax.Array], image_grid_thw: np.ndarray
                     ) -> tuple[jax.Array, jax.Array]:
  """The left brain's keys and values at every layer, as the right brain reads them.

  The left stream does not depend on the right one (outside `full_joint`), so these are the
  left brain's own prefill cache. `left_params` is `state.frozen["left"]` (int8 kernels are
  dequantized as the joint scan does).

  Returns:
    (keys, values), each [layers, B, Ll, Hkv, D] float32 (RoPE applied to the keys).
  """
  backbone = backbones.model_class(config.backbone)(
      config.backbone, dtype=_dtype(config.left_dtype),
      param_dtype=_dtype(config.left_param_dtype), scan_layers=config.scan_layers)
  left = dict(left_params)
  left["model"] = dequantize_kernels(left["model"], _dtype(config.left_param_dtype))
  ids, mask = obs["left_input_ids"], obs["left_attention_mask"]
  cache = qwen25vl.KVCache.init(config.backbone.text, ids.shape[0], ids.shape[1], jnp.float32)
  out = backbone.apply({"params": left}, ids, mask, obs["pixel_values"], image_grid_thw,
                       obs["left_position_ids"], cache)
  layers = out["cache"].layers
  return jnp.stack([kv.k for kv in layers]), jnp.stack([kv.v for kv in layers])


def scanned_params_from_unrolled(params: Mapping[str, Any], config: TwinBrainConfig
                                 ) -> dict[str, Any]:
  """The params of an unrolled model (`scan_layers=False`) in the scanned layout.

  Brains: `model/layers_{i}` -> `model/layers`, `visual/blocks_{i}` -> `visual/blocks`; the
  expert as `dit.scanned_expert_params`.
  """
  out = dict(params)
  for brain in ("left", "right"):
    if brain in out:
      tree = dict(out[brain])
      tree["model"] = stack_layer_params(tree["model"], "layers_", "layers")
      tree["visual"] = stack_layer_params(tree["visual"], "blocks_", "blocks")
      out[brain] = tree
  out["action_expert"] = scanned_expert_params(out["action_expert"], config.action_expert)
  return out


def synthetic_observation(config: TwinBrainConfig, text_lengths: Sequence[int] = (5, 9),
                          image_grid: tuple[int, int, int] = (1, 8, 8), seed: int = 0
                          ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Random observations with the prompt layout of the model, for tests and benchmarks.

  One image of patch grid `image_grid` per sample; prompts are left-padded to a common length:
    left:  <vision_start> <image>*n <vision_end> text
    right: <vision_start> <image>*n <vision_end> text <propri> <action>*N

  Returns:
    (obs dict of numpy arrays, image_grid_thw [B, 3]).
  """
  bb, rng = config.backbone, np.random.default_rng(seed)
  vision = bb.vision
  t, h, w = image_grid
  image = ([bb.vision_start_token_id] + [bb.image_token_id] * (t * h * w // vision.spatial_merge_size ** 2)
           + [bb.vision_end_token_id])
  special = {bb.image_token_id, bb.video_token_id, bb.vision_start_token_id, bb.vision_end_token_id,
             config.action_token_id, config.propri_token_id}
  text_ids = np.setdiff1d(np.arange(1, bb.text.vocab_size), sorted(special))
  left_rows, right_rows = [], []
  for length in text_lengths:
    text = rng.choice(text_ids, size=length).tolist()
    left_rows.append(image + text)
    right_rows.append(image + text + [config.propri_token_id]
                      + [config.action_token_id] * config.num_action_queries)
  grid = np.array([image_grid] * len(text_lengths), np.int64)
  obs = {}
  for side, rows in (("left", left_rows), ("right", right_rows)):
    ids, mask = left_pad(rows, max(len(r) for r in rows), pad_id=0)
    obs[f"{side}_input_ids"], obs[f"{side}_attention_mask"] = ids, mask
    obs[f"{side}_position_ids"] = get_rope_index(ids, grid, mask, bb)[0]
  obs["pixel_values"] = rng.normal(size=(len(text_lengths) * t * h * w, vision.patch_dim)).astype(
      np.float32)
  obs["state"] = rng.uniform(-1, 1, size=(len(text_lengths), config.state_dim)).astype(np.float32)
  return obs, grid


def _text_forward_flops(text: Any, queries: int, keys: int) -> int:
  """Matmul FLOPs of the decoder for `queries` tokens attending to `keys` keys each."""
  e, d = text.hidden_size, text.head_dim
  projections = e * d * (2 * text.num_attention_heads + 2 * text.num_key_value_heads)
  mlp = 3 * e * text.intermediate_size
  attention = 2 * keys * text.num_attention_heads * d
  return 2 * text.num_hidden_layers * queries * (projections + mlp + attention)


def _vision_forward_flops(vision: Any, patches_per_image: int, num_images: int) -> int:
  """Matmul FLOPs of the vision tower: Qwen2.5-VL's windowed blocks attend within a window and
  have a gated (3-matrix) MLP; Qwen3-VL's attend over the frame, have a 2-matrix MLP and one
  merger per DeepStack map besides the final one."""
  hv, n = vision.hidden_size, patches_per_image * num_images
  windowed = hasattr(vision, "fullatt_block_indexes")
  mlp_matrices = 3 if windowed else 2
  window = (min((vision.window_size // vision.patch_size) ** 2, patches_per_image) if windowed
            else patches_per_image)
  blocks = 0
  for i in range(vision.depth):
    keys = window if windowed and i not in vision.fullatt_block_indexes else patches_per_image
    blocks += n * (4 * hv * hv + mlp_matrices * hv * vision.intermediate_size + 2 * keys * hv)
  merged = n // vision.spatial_merge_size ** 2
  unit = hv * vision.spatial_merge_size ** 2
  mergers = 1 + len(getattr(vision, "deepstack_visual_indexes", ()))
  merger = mergers * merged * (unit * unit + unit * vision.out_hidden_size)
  return 2 * (n * vision.patch_dim * hv + blocks + merger)


def train_step_flops(config: TwinBrainConfig, batch: int, left_len: int, right_len: int,
                     patches_per_image: int, num_repeats: int) -> dict[str, int]:
  """Analytic matmul FLOPs of one training step (2 * m * n * k; backward = 2 x forward).

  The frozen left brain runs forward only; the right brain, state encoder and expert run forward
  and backward; the expert runs on `num_repeats` noise draws per sample.

  Returns:
    dict with `left`, `right`, `expert` and `total` FLOPs for the global batch.
  """
  bb, expert = config.backbone, config.action_expert
  twin = config.variant == "twinbrain"
  vision = _vision_forward_flops(bb.vision, patches_per_image, batch)
  # Attention counts every key (the full square, as computed), not the causal half.
  left = (vision + _text_forward_flops(bb.text, batch * left_len, left_len)) if twin else 0
  right = vision + _text_forward_flops(bb.text, batch * right_len,
                                       right_len + (left_len if twin else 0))
  right += 2 * batch * (config.state_dim * config.state_hidden_dim
                        + config.state_hidden_dim * bb.text.hidden_size)
  context_len = (config.num_action_queries if config.conditioning == "action_queries"
                 else right_len)
  # The context K/V are computed once per sample, the rest once per noise draw.
  context_kv = (action_expert_flops(expert, batch, context_len)
                - action_expert_flops(expert, batch, context_len, include_context_kv=False))
  dit = action_expert_flops(expert, batch * num_repeats, context_len,
                            include_context_kv=False) + context_kv
  flops = dict(left=left, right=3 * right, expert=3 * dit)
  flops["total"] = sum(flops.values())
  return flops
