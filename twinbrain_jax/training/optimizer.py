"""AdamW with one learning rate per trainable part, warmup + cosine with a floor, clipping.

The trainable tree is `{right, state_encoder, action_expert}` for TwinBrain (the frozen left brain
is never part of it, so it has no gradients and no optimizer state) and `{planner, plan_head,
refiner}` for Libra (`models.families.TRAINABLE_GROUPS`). Gradients are clipped by their global
norm over all parts, then each part gets its own AdamW with its own schedule:

    lr_g(step) = peak_g * step / warmup                                     step < warmup
               = min_lr + (peak_g - min_lr) * (1 + cos(pi * p)) / 2          p = (step - warmup)
                                                                              / (total - warmup)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import optax

from twinbrain_jax.config_lib import ConfigError
from twinbrain_jax.models.families import TRAINABLE_GROUPS as _GROUPS

# TwinBrain's parts that train, each with its own learning rate (`train.optimizer.lr`).
TRAINABLE_GROUPS = _GROUPS["twinbrain"]


def make_schedule(peak_lr: float, warmup_steps: int, total_steps: int,
                  min_lr: float) -> optax.Schedule:
  """Linear warmup from 0 to `peak_lr`, then cosine decay to `min_lr` at `total_steps`."""
  if not 0 <= min_lr <= peak_lr:
    raise ConfigError(f"train.optimizer.min_lr={min_lr} must lie in [0, peak lr {peak_lr}].")
  warmup_steps = min(int(warmup_steps), int(total_steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=max(int(total_steps), warmup_steps + 1), end_value=min_lr)


def group_schedules(train_config: ml_collections.ConfigDict,
                    groups: tuple[str, ...] = TRAINABLE_GROUPS) -> dict[str, optax.Schedule]:
  """Learning-rate schedule of each trainable group, in optimizer steps."""
  opt = train_config.optimizer
  unknown = sorted(set(opt.lr.keys()) - set(groups))
  if unknown:
    raise ConfigError(f"train.optimizer.lr has unknown group(s) {unknown}; the trainable groups "
                      f"are {groups}.")
  return {g: make_schedule(float(opt.lr[g]), opt.warmup_steps, train_config.num_steps, opt.min_lr)
          for g in groups}


def param_labels(trainable: Mapping[str, Any], groups: tuple[str, ...] = TRAINABLE_GROUPS
                 ) -> dict[str, Any]:
  """The group label of every leaf: its top-level key."""
  missing = [g for g in trainable if g not in groups]
  if missing:
    raise ValueError(f"Trainable params have top-level key(s) {missing}; expected a subset of "
                     f"{groups} (the left brain must stay out of the trainable tree).")
  return {g: jax.tree.map(lambda _, g=g: g, sub) for g, sub in trainable.items()}


def make_optimizer(train_config: ml_collections.ConfigDict,
                   groups: tuple[str, ...] = TRAINABLE_GROUPS) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW per group (`groups`) with its own schedule.

  Gradient accumulation is done by the train step (a scan over micro-batches), so one call of
  `update` is one optimizer step.
  """
  opt = train_config.optimizer
  schedules = group_schedules(train_config, groups)
  per_group = {
      g: optax.adamw(schedules[g], b1=opt.b1, b2=opt.b2, eps=opt.eps,
                     weight_decay=opt.weight_decay)
      for g in groups}
  parts = []
  if opt.clip_norm:
    parts.append(optax.clip_by_global_norm(float(opt.clip_norm)))
  parts.append(optax.multi_transform(per_group, lambda tree: param_labels(tree, groups)))
  return optax.chain(*parts)
