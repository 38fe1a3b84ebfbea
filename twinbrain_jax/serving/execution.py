"""Executing action chunks on a robot: one action per control step from chunks predicted every
few steps, optionally ensembled over the overlapping chunks.

    executor = ChunkExecutor(ExecutionConfig(replan_steps=1, ensemble="adaptive", horizon=7,
                                             adaptive_alpha=0.1))
    for each control step:
      if executor.needs_chunk:
        executor.add_chunk(client.infer(obs)["actions"])      # [T, A], predicted now
      robot.apply(executor.next_action())                     # [A]

A chunk added at step s holds the actions for steps s .. s + T - 1. At step t, the chunks that
*cover* t are those with age `t - s` in `[0, min(T, horizon))`; their predictions for t are
stacked oldest first, `preds [K, A]`, and combined:

    none       the newest chunk's prediction (a chunk broker: with `replan_steps = r` the robot
               executes r actions of each chunk, like openpi's ActionChunkBroker)
    temporal   ACT: weights exp(-k * i), i = 0 for the oldest prediction, normalised
    adaptive   CogACT: weights exp(alpha * cos(pred_i, newest)), normalised

With `replan_steps = 1` and `horizon = h` the adaptive mode is CogACT's `AdaptiveEnsembler` with
`pred_action_horizon = h` (its deque holds the last h chunks). Ensembling works on whatever
actions it is given; CogACT ensembles un-normalised actions, which is what the server returns.
Everything here is numpy, with no clock and no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

ENSEMBLE_MODES = ("none", "temporal", "adaptive")


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
  """How chunks become actions (the `config.execution` block).

  Attributes:
    replan_steps: control steps between two chunk requests (1 = a new chunk every step).
    ensemble: one of `ENSEMBLE_MODES`.
    horizon: a chunk's actions are used for at most `horizon` steps after it was predicted
      (CogACT: 7 on WidowX; capped by the chunk length); must be >= replan_steps.
    temporal_k: ACT's decay k (0.01 in ACT); larger k trusts old predictions more.
    adaptive_alpha: CogACT's alpha (0.1); larger alpha favours predictions that agree with the
      newest one.
  """
  replan_steps: int = 1
  ensemble: str = "adaptive"
  horizon: int = 7
  temporal_k: float = 0.01
  adaptive_alpha: float = 0.1

  def __post_init__(self):
    if self.ensemble not in ENSEMBLE_MODES:
      raise ValueError(f"execution.ensemble={self.ensemble!r}; choose one of {ENSEMBLE_MODES}.")
    for name in ("replan_steps", "horizon"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"execution.{name}={getattr(self, name)!r} must be an int >= 1.")
    if self.replan_steps > self.horizon:
      raise ValueError(f"execution.replan_steps={self.replan_steps} exceeds execution.horizon="
                       f"{self.horizon}: the steps in between would have no action; raise the "
                       "horizon.")

  @classmethod
  def from_config_dict(cls, block: Mapping[str, Any] | None) -> ExecutionConfig:
    """From a `config.execution` block; None (bundles written before it existed) = defaults."""
    if block is None:
      return cls()
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(block) - fields)
    if unknown:
      raise ValueError(f"Unknown config.execution key(s) {unknown}; the fields are "
                       f"{sorted(fields)}.")
    return cls(**dict(block))


def temporal_weights(num_predictions: int, k: float) -> np.ndarray:
  """ACT's `[K]` weights exp(-k * i), i = 0 for the oldest prediction, summing to 1."""
  weights = np.exp(-k * np.arange(num_predictions, dtype=np.float64))
  return weights / weights.sum()


def adaptive_weights(predictions: np.ndarray, alpha: float) -> np.ndarray:
  """CogACT's `[K]` weights exp(alpha * cos(pred_i, pred_newest)), summing to 1.

  Args:
    predictions: `[K, A]` predictions for one step, oldest first (the last is the reference).
  """
  predictions = np.asarray(predictions, np.float64)
  reference = predictions[-1]
  norms = np.linalg.norm(predictions, axis=1) * np.linalg.norm(reference)
  cosine = predictions @ reference / (norms + 1e-7)  # CogACT's epsilon: zero vectors give 0.
  weights = np.exp(alpha * cosine)
  return weights / weights.sum()


def ensemble(predictions: np.ndarray, config: ExecutionConfig) -> np.ndarray:
  """Combines `[K, A]` predictions for one step (oldest first) into one action `[A]`."""
  predictions = np.asarray(predictions)
  if predictions.ndim != 2 or not len(predictions):
    raise ValueError(f"ensemble: expected predictions [K >= 1, A]; got {predictions.shape}.")
  if config.ensemble == "none":
    return predictions[-1].copy()
  if config.ensemble == "temporal":
    weights = temporal_weights(len(predictions), config.temporal_k)
  else:
    weights = adaptive_weights(predictions, config.adaptive_alpha)
  return (weights @ predictions).astype(predictions.dtype)


def predictions_for_step(chunks: Sequence[tuple[int, np.ndarray]], step: int,
                         horizon: int) -> np.ndarray:
  """The predictions for `step` of the chunks that cover it, oldest first, `[K, A]`.

  Args:
    chunks: `(step it was predicted at, chunk [T, A])` in the order they were added.
    horizon: chunks older than `horizon - 1` steps do not contribute.
  """
  rows = [chunk[step - start] for start, chunk in chunks
          if 0 <= step - start < min(len(chunk), horizon)]
  if not rows:
    raise ValueError(f"No chunk covers step {step}; add a chunk first (see needs_chunk).")
  return np.stack(rows)


class ChunkExecutor:
  """Hands out one action per control step from the chunks it is given (see the module
  docstring). Holds only the chunks that can still contribute."""

  def __init__(self, config: ExecutionConfig = ExecutionConfig()):
    self.config = config
    self.step = 0  # The control step of the next `next_action`.
    self._chunks: list[tuple[int, np.ndarray]] = []

  def reset(self) -> None:
    """Forgets every chunk (a new episode)."""
    self.step, self._chunks = 0, []

  @property
  def needs_chunk(self) -> bool:
    """True when a new chunk must be added before the next action: at the first step, every
    `replan_steps` steps, and when the newest chunk has run out."""
    if not self._chunks:
      return True
    start, chunk = self._chunks[-1]
    age = self.step - start
    return age >= self.config.replan_steps or age >= min(len(chunk), self.config.horizon)

  def add_chunk(self, chunk: np.ndarray) -> None:
    """Adds `chunk [T, A]` predicted from the observation of the current step."""
    chunk = np.asarray(chunk)
    if chunk.ndim != 2 or not len(chunk):
      raise ValueError(f"add_chunk: expected an action chunk [T, A]; got shape {chunk.shape}.")
    if self._chunks and chunk.shape[1:] != self._chunks[-1][1].shape[1:]:
      raise ValueError(f"add_chunk: action width {chunk.shape[1]} differs from the previous "
                       f"chunks' {self._chunks[-1][1].shape[1]}.")
    if self._chunks and self._chunks[-1][0] == self.step:
      self._chunks.pop()  # A second chunk for the same step replaces the first.
    self._chunks.append((self.step, chunk))

  def next_action(self) -> np.ndarray:
    """The action `[A]` for the current step; advances to the next step."""
    predictions = predictions_for_step(self._chunks, self.step, self.config.horizon)
    action = ensemble(predictions, self.config)
    self.step += 1
    # Drop chunks that cannot cover any later step.
    self._chunks = [(s, c) for s, c in self._chunks
                    if self.step - s < min(len(c), self.config.horizon)]
    return action
