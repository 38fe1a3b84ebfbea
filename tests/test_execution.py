"""Chunk execution: the broker, ACT temporal ensembling, CogACT adaptive ensembling."""

import collections
import math

import numpy as np
import pytest

from twinbrain_jax.serving.execution import ChunkExecutor, ExecutionConfig, adaptive_weights


def _run(config, chunks_by_step, num_steps):
  """Steps an executor, adding `chunks_by_step[t]` when it asks; (actions, steps that asked)."""
  executor = ChunkExecutor(config)
  actions, asked = [], []
  for t in range(num_steps):
    if executor.needs_chunk:
      asked.append(t)
      executor.add_chunk(chunks_by_step[t])
    actions.append(executor.next_action())
  return np.stack(actions), asked


def _chunk(*values):
  return np.asarray(values, np.float32)[:, None]  # [T, 1]


def test_broker_hands_out_replan_steps_actions_of_each_chunk():
  config = ExecutionConfig(replan_steps=3, ensemble="none", horizon=5)
  chunks = {t: _chunk(*(100 * t + np.arange(5))) for t in range(10)}
  actions, asked = _run(config, chunks, 8)
  assert asked == [0, 3, 6]
  np.testing.assert_array_equal(actions[:, 0], [0, 1, 2, 300, 301, 302, 600, 601])


def test_broker_asks_early_when_the_chunk_runs_out():
  config = ExecutionConfig(replan_steps=4, ensemble="none", horizon=8)
  chunks = {t: _chunk(10 * t, 10 * t + 1) for t in range(8)}  # Chunks of 2 actions.
  actions, asked = _run(config, chunks, 5)
  assert asked == [0, 2, 4]
  np.testing.assert_array_equal(actions[:, 0], [0, 1, 20, 21, 40])


def test_act_temporal_ensembling_by_hand():
  # k = ln 2: weights 1, 1/2, 1/4 from the oldest prediction; horizon 3 drops older chunks.
  config = ExecutionConfig(replan_steps=1, ensemble="temporal", horizon=3,
                           temporal_k=math.log(2))
  chunks = {t: _chunk(10**t, 2 * 10**t, 3 * 10**t) for t in range(4)}
  actions, asked = _run(config, chunks, 4)
  assert asked == [0, 1, 2, 3]
  np.testing.assert_allclose(actions[:, 0], [
      1,                                    # step 0: chunk 0 alone
      (2 * 1 + 10 * 0.5) / 1.5,             # step 1: chunk 0[1], chunk 1[0]
      (3 * 1 + 20 * 0.5 + 100 * 0.25) / 1.75,
      (30 * 1 + 200 * 0.5 + 1000 * 0.25) / 1.75,  # chunk 0 is 3 steps old: out
  ], rtol=1e-6)


def test_cogact_adaptive_ensembling_by_hand():
  # alpha = ln 2: weight 2**cos(prediction, newest). At step 2 the predictions are (-3, 0)
  # (cos -1), (0, 2) (cos 0) and the newest (1, 0): weights 1/2, 1, 2 over 3.5.
  config = ExecutionConfig(replan_steps=1, ensemble="adaptive", horizon=3,
                           adaptive_alpha=math.log(2))
  zeros = np.zeros(2, np.float32)
  chunks = {0: np.stack([(1, 1), zeros, (-3, 0)]), 1: np.stack([(1, 1), (0, 2), zeros]),
            2: np.stack([(1, 0), zeros, zeros])}
  actions, _ = _run(config, {t: np.asarray(c, np.float32) for t, c in chunks.items()}, 3)
  np.testing.assert_allclose(actions[2], [(-1.5 + 0 + 2) / 3.5, (0 + 2 + 0) / 3.5], atol=1e-6)
  # Step 1: (0, 0) has cosine 0 with (1, 1) by CogACT's epsilon; weights 1, 2 over 3.
  np.testing.assert_allclose(actions[1], [2 / 3, 2 / 3], atol=1e-6)
  np.testing.assert_allclose(adaptive_weights(np.array([[-3.0, 0], [0, 2], [1, 0]]), math.log(2)),
                             [1 / 7, 2 / 7, 4 / 7], atol=1e-6)


class _CogACTReference:
  """CogACT's published AdaptiveEnsembler (a deque of the last `horizon` chunks, one per step),
  transcribed from its description to check the general executor against it."""

  def __init__(self, horizon, alpha):
    self.history, self.alpha = collections.deque(maxlen=horizon), alpha

  def __call__(self, chunk):
    self.history.append(chunk)
    n = len(self.history)
    preds = np.stack([c[n - 1 - i] for i, c in enumerate(self.history)])
    ref = preds[-1]
    cos = preds @ ref / (np.linalg.norm(preds, axis=1) * np.linalg.norm(ref) + 1e-7)
    weights = np.exp(self.alpha * cos)
    return (weights / weights.sum()) @ preds


def test_adaptive_ensembling_equals_cogact_on_random_chunks():
  config = ExecutionConfig()  # CogACT on WidowX: a chunk every step, horizon 7, alpha 0.1.
  assert (config.replan_steps, config.ensemble, config.horizon, config.adaptive_alpha) == (
      1, "adaptive", 7, 0.1)
  rng = np.random.default_rng(0)
  chunks = {t: rng.normal(size=(16, 7)) for t in range(20)}
  actions, _ = _run(config, chunks, 20)
  reference = _CogACTReference(7, 0.1)
  want = np.stack([reference(chunks[t]) for t in range(20)])
  np.testing.assert_allclose(actions, want, rtol=1e-6, atol=1e-9)
  # Ensembling changed something (the newest chunk alone would differ).
  assert np.abs(actions[5:] - np.stack([chunks[t][0] for t in range(5, 20)])).max() > 0.1


def test_configuration_errors_are_named():
  with pytest.raises(ValueError, match="replan_steps=8 exceeds execution.horizon=7"):
    ExecutionConfig(replan_steps=8)
  with pytest.raises(ValueError, match="ensemble='mean'"):
    ExecutionConfig(ensemble="mean")
  with pytest.raises(ValueError, match=r"Unknown config.execution key\(s\) \['alpha'\]"):
    ExecutionConfig.from_config_dict(dict(alpha=0.1))
  executor = ChunkExecutor()
  with pytest.raises(ValueError, match="No chunk covers step 0"):
    executor.next_action()
  with pytest.raises(ValueError, match=r"expected an action chunk \[T, A\]"):
    executor.add_chunk(np.zeros(7))
