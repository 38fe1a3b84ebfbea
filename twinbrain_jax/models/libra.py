"""Libra-VLA: a slow coarse planner and a fast fine refiner (arXiv 2604.24921).

    planner  Qwen2.5-VL on image + instruction -> final-norm states H_v         [B, Lv, E]
             coarse-action head: [proj(H_v) | K learned queries] -> small bidirectional
             transformer -> the K = L = M x H query outputs -> logits           [B, L, D, N]
             one non-autoregressive pass; cross-entropy on bin = clip(floor((a+1)/2 N), 0, N-1)
    refiner  SigLIP on the current frame -> tokens                              [B, P, Es]
             coarse bins of one segment -> codebook embeddings + positions      [B, H, Es]
             flow-matching DiT (the action expert) cross-attending to [tokens | bins], with
             the state token -> the segment's continuous actions                 [B, H, D]
             It never sees the VLM's hidden states.

Training: `L = fine_loss_weight * L_fine + plan_loss_weight * L_plan`, one joint stage. The
refiner is fed the ground-truth bins of the first segment, or the planner's predicted (argmax,
no gradient) bins, by `curriculum`: "teacher_forcing" (always ground truth), "none" (always
predicted) or "dynamic" (ground truth until the planner's token accuracy on a training batch
reaches `accuracy_threshold` tau, predicted from the next step on; the latch lives in the train
state, `initial_frozen`).

Observation inputs (`obs`, batch-major): left_input_ids [B, Lv], left_attention_mask [B, Lv],
left_position_ids [3, B, Lv], pixel_values [N, C*T*p*p] (as TwinBrain's left brain), frame
[B, S, S, 3] float in [-1, 1] (SigLIP's input), state [B, S_state]; optional embodiment_id [B].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from twinbrain_jax import flow_matching
from twinbrain_jax.models.dit import (ActionExpert, ActionExpertConfig, Attention,
                                      action_expert_flops)
from twinbrain_jax.models.layers import check_remat_policy, dense
from twinbrain_jax.models.qwen25vl import Qwen25VL, Qwen25VLConfig, get_rope_index
from twinbrain_jax.models.siglip import SiglipConfig, SiglipVisionModel, siglip_flops
from twinbrain_jax.models.tokenizer import left_pad
from twinbrain_jax.models.twinbrain import _dtype, _text_forward_flops, _vision_forward_flops

CURRICULA = ("dynamic", "teacher_forcing", "none")
_EMBED_INIT = nn.initializers.normal(stddev=0.02)


# ---------------------------------------------------------------------------------------------
# Binning.


def actions_to_bins(actions: jax.Array, num_bins: int) -> jax.Array:
  """Actions in [-1, 1] `[...]` -> int32 bins `[...]`: clip(floor((a + 1) / 2 * N), 0, N - 1)."""
  return jnp.clip(jnp.floor((actions + 1.0) / 2.0 * num_bins), 0, num_bins - 1).astype(jnp.int32)


def bins_to_actions(bins: jax.Array, num_bins: int) -> jax.Array:
  """Bins `[...]` -> the centres of their intervals in [-1, 1], float32 `[...]`."""
  return (bins.astype(jnp.float32) + 0.5) / num_bins * 2.0 - 1.0


# ---------------------------------------------------------------------------------------------
# Config.


@dataclasses.dataclass(frozen=True)
class PlannerHeadConfig:
  """The coarse-action head's transformer (the paper: 12 layers, hidden 1024)."""
  num_layers: int = 12
  width: int = 1024
  num_heads: int = 16
  mlp_ratio: int = 4

  def __post_init__(self):
    for name in ("num_layers", "width", "num_heads", "mlp_ratio"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"PlannerHeadConfig.{name}={value!r} must be a positive int.")
    if self.width % self.num_heads:
      raise ValueError(f"PlannerHeadConfig.width={self.width} is not a multiple of "
                       f"num_heads={self.num_heads}.")


@dataclasses.dataclass(frozen=True)
class LibraConfig:
  """Everything that shapes a `LibraVLA`.

  N = `num_bins`, M = `num_segments` (segments per plan), H = `segment_length` (steps per
  segment, one executed chunk), L = M x H planned steps, D = `action_dim`.
  """
  backbone: Qwen25VLConfig
  planner_head: PlannerHeadConfig
  siglip: SiglipConfig
  refiner: ActionExpertConfig
  action_dim: int = 7
  num_bins: int = 10
  num_segments: int = 2
  segment_length: int = 5
  state_dim: int = 7
  num_embodiments: int = 1
  curriculum: str = "dynamic"
  accuracy_threshold: float = 0.9
  fine_loss_weight: float = 1.0
  plan_loss_weight: float = 1.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat_policy: str = "none"
  # The planner reads TwinBrain's left prompt (image + instruction); no right prompt.
  prompt_sides: ClassVar[tuple[str, ...]] = ("left",)

  def __post_init__(self):
    for name in ("action_dim", "num_segments", "segment_length", "state_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"LibraConfig.{name}={value!r} must be a positive int.")
    if not isinstance(self.num_bins, int) or self.num_bins < 2:
      raise ValueError(f"LibraConfig.num_bins={self.num_bins!r} must be an int >= 2.")
    if self.curriculum not in CURRICULA:
      raise ValueError(f"LibraConfig.curriculum={self.curriculum!r}; choose one of {CURRICULA}.")
    check_remat_policy(self.remat_policy, "LibraConfig.remat_policy")
    if not 0.0 < self.accuracy_threshold <= 1.0:
      raise ValueError(f"LibraConfig.accuracy_threshold={self.accuracy_threshold} (tau) must lie "
                       "in (0, 1].")
    for name in ("dtype", "param_dtype"):
      _dtype(getattr(self, name))
    r = self.refiner
    for name, got, other, want in (
        ("refiner.action_horizon", r.action_horizon, "segment_length", self.segment_length),
        ("refiner.action_dim", r.action_dim, "action_dim", self.action_dim),
        ("refiner.context_dim", r.context_dim, "siglip.hidden_size", self.siglip.hidden_size)):
      if got != want:
        raise ValueError(f"LibraConfig: {name}={got} must equal {other}={want} (the refiner "
                         "produces one segment of the plan from SigLIP tokens and bin embeddings).")
    if r.state_dim not in (0, self.state_dim):
      raise ValueError(f"refiner.state_dim={r.state_dim} must be 0 or state_dim={self.state_dim}.")

  @property
  def plan_length(self) -> int:
    """L = M x H, the steps one plan covers."""
    return self.num_segments * self.segment_length

  @classmethod
  def from_config_dict(cls, model: Mapping[str, Any]) -> LibraConfig:
    """From the `config.model` block of `configs/libra.py`."""
    items = dict(model.items())
    backbone = Qwen25VLConfig.from_config_dict(items.pop("backbone"))
    head = PlannerHeadConfig(**dict(items.pop("planner_head").items()))
    vision = SiglipConfig.from_config_dict(items.pop("siglip"))
    refiner = dict(items.pop("refiner").items())
    refiner.setdefault("context_dim", vision.hidden_size)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(items) - fields)
    if unknown:
      raise ValueError(f"Unknown config.model key(s) {unknown}; the fields are {sorted(fields)}.")
    return cls(backbone=backbone, planner_head=head, siglip=vision,
               refiner=ActionExpertConfig.from_config_dict(refiner), **items)


# ---------------------------------------------------------------------------------------------
# Modules.


class HeadBlock(nn.Module):
  """Pre-LN bidirectional transformer block: x += attn(LN(x)); x += MLP(LN(x))."""
  config: PlannerHeadConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    """`x [B, S, W]`, `key_mask [B, S]` bool -> `[B, S, W]`."""
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="attn_norm")(x)
    x = x + Attention(c.width, c.num_heads, c.width // c.num_heads, kv_features=c.width,
                      name="attn", **kw)(h, key_mask=key_mask)
    h = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="mlp_norm")(x)
    h = nn.gelu(dense(c.mlp_ratio * c.width, ("embed", "mlp"), name="mlp_up", **kw)(h))
    x = x + dense(c.width, ("mlp", "embed"), name="mlp_down", **kw)(h)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class CoarseActionHead(nn.Module):
  """K = L learned queries processed with the VLM states; logits of every bin in one pass."""
  config: LibraConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """`hidden [B, Lv, E]` (final-norm VLM states), `mask [B, Lv]` -> logits `[B, L, D, N]`."""
    c, head = self.config, self.config.planner_head
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch = hidden.shape[0]
    context = dense(head.width, (None, "embed"), name="context_in", **kw)(hidden)   # [B, Lv, W]
    queries = self.param("queries", nn.with_logical_partitioning(_EMBED_INIT, ("length", "embed")),
                         (c.plan_length, head.width), self.param_dtype)
    queries = jnp.broadcast_to(queries.astype(self.dtype), (batch,) + queries.shape)  # [B, L, W]
    x = jnp.concatenate([context, queries], axis=1)
    key_mask = jnp.concatenate([mask.astype(bool), jnp.ones((batch, c.plan_length), bool)], 1)
    for i in range(head.num_layers):
      x = HeadBlock(head, name=f"block_{i}", **kw)(x, key_mask)
    x = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="final_norm")(
        x[:, -c.plan_length:])
    logits = dense(c.action_dim * c.num_bins, ("embed", None), name="logits", **kw)(x)
    return logits.reshape(batch, c.plan_length, c.action_dim, c.num_bins)


class Refiner(nn.Module):
  """SigLIP on the current frame + bin codebook -> context of the flow-matching DiT."""
  config: LibraConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = c.siglip.hidden_size
    self.encoder = SiglipVisionModel(c.siglip, **kw)
    # One embedding per (action dimension, bin); a step's token sums its D bins.
    self.codebook = self.param(
        "codebook", nn.with_logical_partitioning(_EMBED_INIT, ("action", None, "embed")),
        (c.action_dim, c.num_bins, width), self.param_dtype)
    self.segment_positions = self.param(
        "segment_positions", nn.with_logical_partitioning(_EMBED_INIT, ("length", "embed")),
        (c.segment_length, width), self.param_dtype)
    self.expert = ActionExpert(c.refiner, **kw)

  def bin_embeddings(self, bins: jax.Array) -> jax.Array:
    """`bins [B, H, D]` int -> `[B, H, Es]`."""
    one_hot = jax.nn.one_hot(bins, self.config.num_bins, dtype=self.dtype)
    tokens = jnp.einsum("bhdn,dne->bhe", one_hot, self.codebook.astype(self.dtype))
    return tokens + self.segment_positions.astype(self.dtype)

  def context(self, frame: jax.Array, bins: jax.Array) -> jax.Array:
    """`frame [B, S, S, 3]`, `bins [B, H, D]` -> `[B, P + H, Es]`."""
    tokens = self.encoder(frame)["last_hidden_state"]
    return jnp.concatenate([tokens, self.bin_embeddings(bins).astype(tokens.dtype)], axis=1)

  def context_kv(self, context: jax.Array) -> Any:
    return self.expert.context_kv(context)

  def velocity(self, noisy_actions: jax.Array, t: jax.Array, context_kv: Any, state: jax.Array,
               embodiment_id: jax.Array | None, deterministic: bool) -> jax.Array:
    state = state if self.config.refiner.state_dim else None
    return self.expert(noisy_actions, t, context_kv=context_kv, state=state,
                       embodiment_id=embodiment_id, deterministic=deterministic)


class LibraVLA(nn.Module):
  """Planner (`planner` VLM + `plan_head`) and `refiner`: the three trainable groups."""
  config: LibraConfig

  def setup(self):
    c = self.config
    kw = dict(dtype=_dtype(c.dtype), param_dtype=_dtype(c.param_dtype))
    self.planner = Qwen25VL(c.backbone, remat_policy=c.remat_policy, **kw)
    self.plan_head = CoarseActionHead(c, **kw)
    self.refiner = Refiner(c, **kw)

  def plan_logits(self, obs: Mapping[str, jax.Array], image_grid_thw: np.ndarray) -> jax.Array:
    """The coarse plan's logits `[B, L, D, N]` of `obs`."""
    hidden = self.planner(obs["left_input_ids"], obs["left_attention_mask"], obs["pixel_values"],
                          image_grid_thw, obs["left_position_ids"])["hidden_states"]
    return self.plan_head(hidden, obs["left_attention_mask"])

  def refiner_context(self, frame: jax.Array, bins: jax.Array) -> jax.Array:
    return self.refiner.context(frame, bins)

  def context_kv(self, context: jax.Array) -> Any:
    return self.refiner.context_kv(context)

  def velocity(self, noisy_actions: jax.Array, t: jax.Array, context_kv: Any, state: jax.Array,
               embodiment_id: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    """`x_t [B, H, D]`, `t [B]` -> velocity `[B, H, D]` (the only part run per ODE step)."""
    return self.refiner.velocity(noisy_actions, t, context_kv, state, embodiment_id,
                                 deterministic)

  def __call__(self, obs: Mapping[str, jax.Array], image_grid_thw: np.ndarray,
               noisy_actions: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Planner and refiner in one call (used by `init`): (logits, velocity)."""
    logits = self.plan_logits(obs, image_grid_thw)
    bins = jnp.argmax(logits, -1)[:, :self.config.segment_length]
    kv = self.context_kv(self.refiner_context(obs["frame"], bins))
    return logits, self.velocity(noisy_actions, t, kv, obs["state"], obs.get("embodiment_id"))


# ---------------------------------------------------------------------------------------------
# Losses and the curriculum.


def initial_frozen() -> dict[str, Any]:
  """The non-trained part of Libra's train state: the dynamic curriculum's latch."""
  return {"curriculum": {"planner_passed": jnp.zeros((), bool)}}


def model_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """The `params` collection of `LibraVLA` (drops the curriculum latch of a full train state)."""
  return {k: v for k, v in params.items() if k != "curriculum"}


def use_predicted_bins(config: LibraConfig, planner_passed: jax.Array) -> jax.Array:
  """Whether the refiner is fed the planner's bins (bool []) under `config.curriculum`."""
  if config.curriculum == "teacher_forcing":
    return jnp.zeros((), bool)
  if config.curriculum == "none":
    return jnp.ones((), bool)
  return jnp.asarray(planner_passed, bool)


def update_frozen(config: LibraConfig, frozen: Mapping[str, Any],
                  metrics: Mapping[str, jax.Array]) -> dict[str, Any]:
  """Latches the dynamic curriculum once a step's token accuracy reaches tau."""
  passed = frozen["curriculum"]["planner_passed"]
  passed = passed | (metrics["token_accuracy"] >= config.accuracy_threshold)
  return dict(frozen, curriculum={"planner_passed": passed})


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def check_actions(config: LibraConfig, actions: jax.Array) -> None:
  """Raises unless `actions [B, T, D]` cover a plan (T >= L) with the model's D."""
  if actions.ndim != 3 or actions.shape[-1] != config.action_dim:
    raise ValueError(f"Libra: actions must be [B, T, action_dim={config.action_dim}]; got "
                     f"{actions.shape}. Set model.action_dim to the dataset's action width.")
  if actions.shape[1] < config.plan_length:
    raise ValueError(
        f"Libra: the action chunks have {actions.shape[1]} steps but a plan covers L = M x H = "
        f"{config.num_segments} x {config.segment_length} = {config.plan_length}; set "
        f"data.action_horizon={config.plan_length}.")


def compute_loss(model: LibraVLA, params: Any, frozen: Mapping[str, Any],
                 batch: Mapping[str, jax.Array], image_grid_thw: np.ndarray, rng: jax.Array,
                 num_repeats: int = 4, train: bool = True
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`fine_loss_weight * L_fine + plan_loss_weight * L_plan` and its parts.

  Args:
    params: `LibraVLA`'s params; frozen: `initial_frozen()`'s tree (the curriculum latch).
    batch: observation inputs plus `actions [B, T, D]` (T >= L) and `action_mask [B, T]`.
    num_repeats: R flow-matching noise draws per refiner context.

  Returns:
    (loss, metrics): `loss_plan` (cross-entropy), `loss_fine` (flow matching on the first
    segment), `token_accuracy` (argmax bins equal to the targets, over valid steps),
    `use_predicted_bins` (1.0 when the refiner was fed the planner's bins).
  """
  c = model.config
  actions = batch["actions"]
  check_actions(c, actions)
  variables = {"params": model_params(params)}
  loss_rng, dropout_rng = jax.random.split(rng)
  length, horizon = c.plan_length, c.segment_length
  mask = batch.get("action_mask")
  mask = jnp.ones(actions.shape[:2], jnp.float32) if mask is None else mask.astype(jnp.float32)
  target = actions_to_bins(actions[:, :length], c.num_bins)                   # [B, L, D]
  token_mask = jnp.broadcast_to(mask[:, :length, None], target.shape)

  logits = model.apply(variables, batch, image_grid_thw, method=LibraVLA.plan_logits)
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                                  target)
  predicted = jax.lax.stop_gradient(jnp.argmax(logits, -1)).astype(jnp.int32)  # [B, L, D]
  accuracy = _masked_mean((predicted == target).astype(jnp.float32), token_mask)

  use_predicted = use_predicted_bins(c, frozen["curriculum"]["planner_passed"])
  bins = jnp.where(use_predicted, predicted[:, :horizon], target[:, :horizon])
  context = model.apply(variables, batch["frame"], bins, method=LibraVLA.refiner_context)
  kv = model.apply(variables, context, method=LibraVLA.context_kv)
  repeated = flow_matching.repeat_batch(
      dict(kv=kv, state=batch["state"], embodiment_id=batch.get("embodiment_id")), num_repeats)

  def velocity_fn(x_t, t):
    return model.apply(variables, x_t, t, repeated["kv"], repeated["state"],
                       repeated["embodiment_id"], deterministic=not train,
                       method=LibraVLA.velocity, rngs={"dropout": dropout_rng})

  fine = flow_matching.flow_loss(velocity_fn, loss_rng, actions[:, :horizon], mask[:, :horizon],
                                 num_repeats)
  plan = _masked_mean(cross_entropy, token_mask)
  loss = c.fine_loss_weight * fine + c.plan_loss_weight * plan
  return loss, dict(loss_fine=fine, loss_plan=plan, token_accuracy=accuracy,
                    use_predicted_bins=use_predicted.astype(jnp.float32))


# ---------------------------------------------------------------------------------------------
# Inference: the two systems as pure functions (the runtime in serving/ schedules them).


def plan(model: LibraVLA, params: Any, obs: Mapping[str, jax.Array],
         image_grid_thw: np.ndarray) -> jax.Array:
  """The coarse plan of `obs`: bins `[B, M, H, D]` int32 (segment m = steps m*H .. m*H+H-1)."""
  c = model.config
  logits = model.apply({"params": model_params(params)}, obs, image_grid_thw,
                       method=LibraVLA.plan_logits)
  bins = jnp.argmax(logits, -1).astype(jnp.int32)
  return bins.reshape(bins.shape[0], c.num_segments, c.segment_length, c.action_dim)


def refine(model: LibraVLA, params: Any, obs: Mapping[str, jax.Array], bins: jax.Array,
           noise: jax.Array, num_steps: int = 4, method: str = "euler") -> jax.Array:
  """One segment's actions `[B, H, D]` from the current `frame`/`state` of `obs` and its bins
  `[B, H, D]`; SigLIP and the context K/V run once, the DiT per ODE step."""
  variables = {"params": model_params(params)}
  context = model.apply(variables, obs["frame"], bins, method=LibraVLA.refiner_context)
  kv = model.apply(variables, context, method=LibraVLA.context_kv)

  def velocity_fn(x_t, t):
    return model.apply(variables, x_t, t, kv, obs["state"], obs.get("embodiment_id"),
                       method=LibraVLA.velocity)

  return flow_matching.integrate(velocity_fn, noise, num_steps=num_steps, method=method)


def segment_shape(config: LibraConfig, batch_size: int) -> tuple[int, int, int]:
  """[B, H, D] of one refined segment (one executed chunk)."""
  return batch_size, config.segment_length, config.action_dim


# ---------------------------------------------------------------------------------------------
# Synthetic inputs, init, FLOPs.


def synthetic_observation(config: LibraConfig, text_lengths: Sequence[int] = (5, 9),
                          image_grid: tuple[int, int, int] = (1, 8, 8), seed: int = 0
                          ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Random observations in the planner's prompt layout (image + text, left-padded) with a
  random SigLIP frame and state; for tests, benchmarks and `init`.

  Returns:
    (obs dict of numpy arrays, image_grid_thw [B, 3]).
  """
  bb, rng = config.backbone, np.random.default_rng(seed)
  t, h, w = image_grid
  num_image_tokens = t * h * w // bb.vision.spatial_merge_size ** 2
  image = ([bb.vision_start_token_id] + [bb.image_token_id] * num_image_tokens
           + [bb.vision_end_token_id])
  special = {bb.image_token_id, bb.video_token_id, bb.vision_start_token_id, bb.vision_end_token_id}
  text_ids = np.setdiff1d(np.arange(1, bb.text.vocab_size), sorted(special))
  rows = [image + rng.choice(text_ids, size=n).tolist() for n in text_lengths]
  grid = np.array([image_grid] * len(rows), np.int64)
  ids, mask = left_pad(rows, max(len(r) for r in rows), pad_id=0)
  batch, side = len(rows), config.siglip.image_size
  obs = dict(left_input_ids=ids, left_attention_mask=mask,
             left_position_ids=get_rope_index(ids, grid, mask, bb)[0],
             pixel_values=rng.normal(size=(batch * t * h * w, bb.vision.patch_dim)).astype(
                 np.float32),
             frame=rng.uniform(-1, 1, (batch, side, side, config.siglip.num_channels)).astype(
                 np.float32),
             state=rng.uniform(-1, 1, (batch, config.state_dim)).astype(np.float32))
  return obs, grid


def init_args(config: LibraConfig) -> tuple[Any, ...]:
  """Smallest valid `(obs, grid, noisy_actions, t)` for `LibraVLA.init`."""
  obs, grid = synthetic_observation(config, text_lengths=(3,), image_grid=(1, 8, 8))
  return obs, grid, np.zeros(segment_shape(config, 1), np.float32), np.zeros((1,), np.float32)


def train_step_flops(config: LibraConfig, batch: int, prompt_len: int, patches_per_image: int,
                     num_repeats: int) -> dict[str, int]:
  """Analytic matmul FLOPs of one training step (backward = 2 x forward): `planner` (VLM and
  coarse head), `refiner` (SigLIP, context K/V once, DiT on R noise draws), `total`."""
  bb, head = config.backbone, config.planner_head
  vlm = (_vision_forward_flops(bb.vision, patches_per_image, batch)
         + _text_forward_flops(bb.text, batch * prompt_len, prompt_len))
  tokens, w = prompt_len + config.plan_length, head.width
  head_flops = 2 * batch * (prompt_len * bb.text.hidden_size * w
                            + head.num_layers * tokens * (4 * w * w + 2 * head.mlp_ratio * w * w
                                                          + 2 * tokens * w)
                            + config.plan_length * w * config.action_dim * config.num_bins)
  context_len = config.siglip.num_patches + config.segment_length
  expert = config.refiner
  context_kv = (action_expert_flops(expert, batch, context_len)
                - action_expert_flops(expert, batch, context_len, include_context_kv=False))
  refiner = (siglip_flops(config.siglip, batch) + context_kv
             + action_expert_flops(expert, batch * num_repeats, context_len,
                                   include_context_kv=False))
  flops = dict(planner=3 * (vlm + head_flops), refiner=3 * refiner)
  flops["total"] = sum(flops.values())
  return flops
