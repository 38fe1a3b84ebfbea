"""Libra's runtime (serving/libra.py) with stand-in planner and refiner: FIFO order, one plan per
M chunks, and an asynchronous runner that never waits for a (deliberately stuck) planner."""

import threading

import numpy as np
import pytest

from twinbrain_jax.serving import libra as runtime

M, H, D = 3, 4, 2


class Planner:
  """Plan k (0, 1, ...) has segment m's bins all equal to 10 * k + m. With a `gate`, every plan
  after the first waits for it; if released late (60 s), it raises so that a runner that waited
  for it fails instead of passing."""

  def __init__(self, gate=None):
    self.calls, self.gate, self.observations = 0, gate, []
    self.entered = threading.Semaphore(0)  # Released by each call once it has recorded.

  def __call__(self, batch):
    k = self.calls
    self.calls += 1
    self.observations.append(int(batch["t"]))
    self.entered.release()
    if self.gate is not None and k > 0 and not self.gate.wait(timeout=60):
      raise RuntimeError("the stuck planner was never released")
    return np.stack([np.full((H, D), 10 * k + m) for m in range(M)])


def refine(batch, bins):
  """Actions = the segment's bins (so the test can read which segment was used)."""
  return np.asarray(bins, np.float32) + 0 * float(batch["t"])


def test_buffer_pops_in_order_and_fill_skips():
  buffer = runtime.IntentBuffer()
  plan = np.arange(M)[:, None, None] * np.ones((M, H, D))
  buffer.fill(plan, plan_id=7)
  assert [(s.plan_id, s.index, int(s.bins[0, 0])) for s in (buffer.pop() for _ in range(M))] == [
      (7, 0, 0), (7, 1, 1), (7, 2, 2)]
  assert not buffer
  with pytest.raises(IndexError, match="empty"):
    buffer.pop()
  buffer.fill(plan, plan_id=8, skip=2)
  assert [s.index for s in (buffer.pop(),)] == [2] and not buffer


def test_interleaved_plans_once_per_m_chunks_and_refines_segments_in_order():
  planner = Planner()
  runner = runtime.InterleavedRunner(planner, refine)
  chunks = [runner.step(dict(t=t)) for t in range(2 * M + 1)]
  assert planner.calls == 3 and planner.observations == [0, M, 2 * M]
  assert [c.planned for c in chunks] == [True, False, False] * 2 + [True]
  assert [int(c.actions[0, 0]) for c in chunks] == [0, 1, 2, 10, 11, 12, 20]
  runner.reset()
  assert runner.step(dict(t=99)).planned and planner.observations[-1] == 99


def test_async_never_waits_for_the_planner_once_a_plan_exists():
  gate = threading.Event()
  planner = Planner(gate)
  runner = runtime.AsyncRunner(planner, refine, blend_steps=0)
  try:
    chunks = [runner.step(dict(t=t)) for t in range(M)]  # Plan 0, synchronously, then its M.
    assert chunks[0].planned and [int(c.actions[0, 0]) for c in chunks] == [0, 1, 2]
    assert runner.planning
    assert planner.entered.acquire(timeout=60) and planner.entered.acquire(timeout=60)
    assert planner.observations == [0, M - 1]  # Plan 1 requested ...
    # ... and stuck. The refiner keeps serving the last segment of plan 0 (stale).
    stuck = [runner.step(dict(t=t)) for t in range(M, M + 5)]
    assert not gate.is_set() and runner.planning
    assert all(c.stale and int(c.actions[0, 0]) == 2 for c in stuck)
    assert planner.calls == 2  # No second request while one is pending.
    gate.set()
    runner.wait_for_plan()
    # Plan 1 was for the chunks from M on; 5 of them have passed: its first 2 segments are
    # dropped... but M = 3 < 5 + 1, so nothing is left: the runner stays stale and asks again.
    late = runner.step(dict(t=M + 5))
    assert late.stale and runner.plan_calls == 3
    runner.wait_for_plan()
    fresh = runner.step(dict(t=M + 6))  # Plan 2, from t = M + 5, lands 0 chunks late.
    assert not fresh.stale and fresh.segment.plan_id == 2 and fresh.segment.index == 0
    assert [int(runner.step(dict(t=t)).actions[0, 0]) for t in (M + 7, M + 8)] == [21, 22]
  finally:
    gate.set()
    runner.close()


def test_async_plans_once_per_m_chunks_when_the_planner_keeps_up():
  planner = Planner()
  runner = runtime.AsyncRunner(planner, refine, blend_steps=0)
  try:
    used = []
    for t in range(4 * M):
      used.append(int(runner.step(dict(t=t)).actions[0, 0]))
      runner.wait_for_plan()  # A planner faster than one chunk.
    assert used == [0, 1, 2, 10, 11, 12, 20, 21, 22, 30, 31, 32]
    assert planner.calls == 5  # Plans 0-3 used, plan 4 requested at the last chunk.
  finally:
    runner.close()


def test_blending_starts_a_fresh_plan_from_the_last_committed_action():
  last = np.array([1.0, -1.0])
  actions = np.zeros((H, D))
  blended = runtime.blend_from(last, actions, steps=2)
  np.testing.assert_allclose(blended[:, 0], [2 / 3, 1 / 3, 0, 0])
  np.testing.assert_allclose(blended[:, 1], [-2 / 3, -1 / 3, 0, 0])
  planner = Planner()
  runner = runtime.AsyncRunner(planner, refine, blend_steps=2)
  try:
    for t in range(M):
      runner.step(dict(t=t))
      runner.wait_for_plan()
    chunk = runner.step(dict(t=M))  # The first chunk of plan 1 (value 10), after 2s.
    np.testing.assert_allclose(chunk.actions[:, 0], [2 / 3 * 2 + 1 / 3 * 10,
                                                     1 / 3 * 2 + 2 / 3 * 10, 10, 10])
  finally:
    runner.close()


def test_unknown_mode_is_refused():
  with pytest.raises(ValueError, match="'parallel'.*interleaved"):
    runtime.make_runner("parallel", Planner(), refine)
