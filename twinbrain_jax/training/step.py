"""The jitted train and eval steps, with shardings from the logical rules.

    step = make_train_step(model, tx, image_grid_thw, ...)   # pure: (state, batch) -> ...
    train_step = jit_train_step(step, state_shardings, batch_shardings(mesh, batch))
    state, metrics = train_step(state, batch)                  # `state` is donated

The frozen left brain (and, with low-rank adapters, the right brain's base weights) is passed
to the loss as a constant (`state.frozen`), so it is never differentiated. For Libra, `state.frozen` holds the dynamic curriculum's latch instead, which the
step updates from the batch's token accuracy; the loss's parts are reported in the metrics.

The loss is the family's (`make_loss_fn`): TwinBrain's flow matching, plus with
`answer_loss_weight > 0` the right brain's answer-only next-token loss on the batch's
question-answer rows (co-training); Libra's joint loss; the VLM's answer-only loss.
Gradient accumulation scans over micro-batches inside the step: one call is one optimizer step
whatever the accumulation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from twinbrain_jax import sharding as sharding_lib
from twinbrain_jax.config_lib import ConfigError
from twinbrain_jax.answer_loss import answer_loss
from twinbrain_jax.models import libra, vlm
from twinbrain_jax.models.families import Model
from twinbrain_jax.models.layers import merge_trees
from twinbrain_jax.models.twinbrain import TwinBrainVLA, compute_loss
from twinbrain_jax.training.state import TrainState

Batch = Mapping[str, jax.Array]
# Keys whose batch axis is not the first: M-RoPE positions are [3, B, L].
_BATCH_AXIS = {"left_position_ids": 1, "right_position_ids": 1, "lm_position_ids": 1}


def batch_axis(key: str) -> int:
  return _BATCH_AXIS.get(key, 0)


def check_batch_size(batch_size: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
  """Raises unless every micro-batch splits evenly over the data-parallel devices."""
  dp = sharding_lib.data_parallel_size(mesh)
  if batch_size % (dp * grad_accum_steps):
    raise ConfigError(
        f"data.batch_size={batch_size} is not divisible by the data-parallel size {dp} (mesh "
        f"data x fsdp = {dict(mesh.shape)}) times train.grad_accum_steps={grad_accum_steps}; "
        f"use a multiple of {dp * grad_accum_steps}.")


def batch_shardings(mesh: Mesh, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
  """Every batch array split over (data, fsdp) along its batch axis.

  `pixel_values [B * patches, D]` is split along its first axis too: the samples' patches are
  contiguous, so each device gets whole images.
  """
  out = {}
  for key, value in batch.items():
    spec = [None] * np.ndim(value)
    spec[batch_axis(key)] = sharding_lib.BATCH_MESH_AXES
    out[key] = NamedSharding(mesh, PartitionSpec(*spec))
  return out


def global_batch(local_batch: Mapping[str, np.ndarray],
                 shardings: Mapping[str, NamedSharding]) -> dict[str, jax.Array]:
  """Host-local numpy batches of every process -> global sharded arrays.

  Each process passes its own `batch_size / process_count` samples; the global batch is their
  concatenation in process order.
  """
  out = {}
  n = jax.process_count()
  for key, value in local_batch.items():
    value = np.asarray(value)
    global_shape = list(value.shape)
    global_shape[batch_axis(key)] *= n
    out[key] = jax.make_array_from_process_local_data(shardings[key], value, tuple(global_shape))
  return out


def split_microbatches(batch: Batch, num_micro: int, batch_size: int) -> dict[str, jax.Array]:
  """[B, ...] -> [k, B/k, ...] (pixels [B*P, D] -> [k, B/k*P, D]); micro-batch i holds samples
  i, i+k, i+2k, ... so that every micro-batch stays spread over all data-parallel devices."""
  out = {}
  for key, x in batch.items():
    axis = batch_axis(key)
    if key == "pixel_values":
      x = x.reshape(batch_size, -1, x.shape[-1])  # [B, P, D]
    x = jnp.moveaxis(x, axis, 0)
    x = x.reshape(batch_size // num_micro, num_micro, *x.shape[1:])
    x = jnp.moveaxis(x, 1, 0)  # [k, B/k, ...]
    if key == "pixel_values":
      x = x.reshape(num_micro, -1, x.shape[-1])
    else:
      x = jnp.moveaxis(x, 1, axis + 1)
    out[key] = x
  return out


def valid_action_counts(micro: Batch) -> jax.Array:
  """Valid action elements of each micro-batch, [k] float32 (`actions [k, b, T, A]`,
  `action_mask [k, b, T]` or `[k, b, T, A]`; no mask = all valid). A batch without actions (the
  VLM's) counts its answer targets (`lm_loss_mask [k, b, L]`)."""
  if "actions" not in micro:
    return micro["lm_loss_mask"].astype(jnp.float32).sum(axis=(1, 2))
  actions = micro["actions"]
  mask = micro.get("action_mask")
  if mask is None:
    return jnp.full(actions.shape[:1], np.prod(actions.shape[1:]), jnp.float32)
  mask = mask.astype(jnp.float32)
  if mask.ndim == actions.ndim - 1:
    mask = mask[..., None]
  return jnp.broadcast_to(mask, actions.shape).sum(axis=tuple(range(1, actions.ndim)))


def make_loss_fn(model: Model, image_grid_thw: np.ndarray, num_repeats: int,
                 train: bool = True, answer_loss_weight: float = 0.0
                 ) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
  """(trainable params, frozen, batch, rng) -> (scalar loss, metrics of its parts): TwinBrain's
  flow-matching loss (no parts; with `answer_loss_weight > 0`, plus that weight times the right
  brain's answer loss, `loss_flow` and `loss_answer` reported), Libra's joint loss
  (`libra.compute_loss`) or the VLM's answer-only loss (`vlm.compute_loss`)."""
  grid = np.asarray(image_grid_thw)
  if isinstance(model, libra.LibraVLA):
    def loss_fn(params, frozen, batch, rng):
      return libra.compute_loss(model, params, frozen, batch, grid, rng, num_repeats, train)
  elif isinstance(model, vlm.VisionLanguageModel):
    def loss_fn(params, frozen, batch, rng):
      del frozen, rng
      return vlm.compute_loss(model, params, batch, grid)
  elif answer_loss_weight:
    def loss_fn(params, frozen, batch, rng):
      params = merge_trees(frozen, params)
      flow = compute_loss(model, params, batch, grid, rng, num_repeats, train)
      logits = model.apply({"params": params}, batch, grid, method=TwinBrainVLA.answer_logits)
      answer, parts = answer_loss(logits, batch["lm_targets"], batch["lm_loss_mask"])
      return flow + answer_loss_weight * answer, dict(parts, loss_flow=flow, loss_answer=answer)
  else:
    def loss_fn(params, frozen, batch, rng):
      return compute_loss(model, merge_trees(frozen, params), batch, grid, rng, num_repeats,
                          train), {}

  return loss_fn


def update_frozen(model: Model, frozen: Any, metrics: Mapping[str, jax.Array]) -> Any:
  """The frozen part after a step: unchanged, except Libra's curriculum latch."""
  if isinstance(model, libra.LibraVLA):
    return libra.update_frozen(model.config, frozen, metrics)
  return frozen


def make_train_step(model: Model, tx: optax.GradientTransformation,
                    image_grid_thw: np.ndarray, num_repeats: int, grad_accum_steps: int = 1,
                    schedules: Mapping[str, optax.Schedule] | None = None,
                    answer_loss_weight: float = 0.0
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """The pure train step: loss, gradients of the trainable params, one optimizer update.

  Args:
    image_grid_thw: [B, 3] patch grids of the global batch (static).
    num_repeats: noise draws per VLM forward (`flow.num_repeats`).
    grad_accum_steps: k micro-batches of B/k samples (sample i in micro-batch i mod k, noise
      from `fold_in(step key, i)`); their gradients are averaged, each weighted by its share of
      the batch's valid action elements, so the result is the gradient of the whole batch's
      masked mean loss.
    schedules: per-group learning rates, reported in the metrics.
    answer_loss_weight: co-training (TwinBrain family): the weight of the right brain's answer
      loss added to the flow-matching loss (`train.answer_loss_weight`).

  Returns:
    step(state, batch) -> (new state, metrics {loss, grad_norm, param_norm, lr/<group>} and the
    loss's parts, e.g. Libra's loss_plan, loss_fine, token_accuracy, use_predicted_bins).
  """
  grid = np.asarray(image_grid_thw)
  batch_size, k = grid.shape[0], int(grad_accum_steps)
  if batch_size % k:
    raise ConfigError(f"The batch of {batch_size} does not split into "
                      f"train.grad_accum_steps={k} micro-batches.")
  # One compiled micro-step serves all k micro-batches, and the pixels are split per sample:
  # every image must have the same grid.
  if k > 1 and not (grid == grid[:1]).all():
    raise ConfigError(
        f"train.grad_accum_steps={k} needs one image grid for the whole batch (micro-batches "
        f"take samples i, i+{k}, ... and share one compiled step); got image_grid_thw "
        f"{grid.tolist()}. Use one image size (data.image_size).")
  micro_loss = make_loss_fn(model, grid[::k], num_repeats, answer_loss_weight=answer_loss_weight)
  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(state: TrainState, batch: Batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if k == 1:
      (loss, parts), grads = grad_fn(state.params, state.frozen, batch, rng)
    else:
      micro = split_microbatches(batch, k, batch_size)
      # The loss is a mean over valid action elements, so micro-batch i's gradient is weighted
      # by its share of them: the sum is then the gradient of the whole batch's loss.
      counts = valid_action_counts(micro)  # [k]
      weights = counts / jnp.maximum(counts.sum(), 1.0)

      def accumulate(carry, inputs):
        index, weight, micro_batch = inputs
        (loss_i, parts_i), grads_i = grad_fn(state.params, state.frozen, micro_batch,
                                             jax.random.fold_in(rng, index))
        return jax.tree.map(lambda acc, x: acc + (weight * x).astype(acc.dtype), carry,
                            (loss_i, parts_i, grads_i)), None

      first = jax.tree.map(lambda x: x[0], micro)
      parts_shape = jax.eval_shape(micro_loss, state.params, state.frozen, first, rng)[1]
      zeros = (jnp.zeros((), jnp.float32),
               jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), parts_shape),
               jax.tree.map(jnp.zeros_like, state.params))
      (loss, parts, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), weights, micro))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(parts, loss=loss, grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params))
    for group, schedule in (schedules or {}).items():
      metrics[f"lr/{group}"] = schedule(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         frozen=update_frozen(model, state.frozen, parts)), metrics

  return step


def jit_train_step(step: Callable, state_shardings: TrainState,
                   batch_shardings_: Mapping[str, NamedSharding], mesh: Mesh) -> Callable:
  """`jax.jit` with explicit in/out shardings; the input state's buffers are donated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(step, in_shardings=(state_shardings, dict(batch_shardings_)),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)


def make_eval_step(model: Model, image_grid_thw: np.ndarray, num_repeats: int,
                   state_shardings: TrainState, batch_shardings_: Mapping[str, NamedSharding],
                   mesh: Mesh, answer_loss_weight: float = 0.0
                   ) -> Callable[[TrainState, Batch], jax.Array]:
  """Validation loss without dropout; the noise is a fixed function of the step (comparable
  across evaluations)."""
  loss_fn = make_loss_fn(model, image_grid_thw, num_repeats, train=False,
                         answer_loss_weight=answer_loss_weight)

  def eval_step(state: TrainState, batch: Batch) -> jax.Array:
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, 2**31 - 1), 0)
    return loss_fn(state.params, state.frozen, batch, rng)[0]

  return jax.jit(eval_step, in_shardings=(state_shardings, dict(batch_shardings_)),
                 out_shardings=NamedSharding(mesh, PartitionSpec()))
