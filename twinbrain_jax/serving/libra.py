"""Libra-VLA's runtime: an intent buffer between the slow planner and the fast refiner.

    planner  observation -> a plan of M segments, coarse bins [M, H, D]
    buffer   FIFO of planned segments
    refiner  (current observation, one segment's bins [H, D]) -> one chunk of H actions [H, A]

Two schedules, one chunk per call of `step(observation)`:

- `InterleavedRunner` (the paper's): when the buffer is empty the planner runs first (the call
  waits for it), then the refiner pops one segment. The planner runs once per M chunks.
- `AsyncRunner`: the planner runs in a background thread. The first call plans synchronously
  (there is nothing to refine yet); after that a call never waits for the planner. When the
  refiner pops the last segment of a plan, the next plan is requested from that observation,
  for the chunks after it. Until it lands, the refiner re-uses the last segment it has (a stale
  plan). A plan that lands `j` chunks late drops its first `j` segments, whose time has passed.
  Chunk boundaries stay smooth: the first `blend_steps` actions of a chunk refined from a newly
  landed plan are blended linearly from the last action of the previous chunk (the action the
  robot last committed to), `a'_i = w_i a_last + (1 - w_i) a_i`, `w_i = (k - i) / (k + 1)`.

`LibraPolicy` puts either runner behind the `Policy` interface (`serving.policy`), so the
websocket server and openpi-client serve Libra unchanged. One intent buffer: one robot at a time;
an observation with `new_episode=True` (or a new instruction) starts over with an empty buffer.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from twinbrain_jax.models import libra
from twinbrain_jax.serving.policy import ObservationError, Policy

MODES = ("interleaved", "async")
Batch = Mapping[str, np.ndarray]
PlanFn = Callable[[Batch], np.ndarray]  # batch -> bins [M, H, D]
RefineFn = Callable[[Batch, np.ndarray], np.ndarray]  # (batch, bins [H, D]) -> actions [H, A]


@dataclasses.dataclass(frozen=True)
class Segment:
  """One planned segment: `bins [H, D]`, the plan it belongs to and its index in that plan."""
  bins: np.ndarray
  plan_id: int
  index: int


class IntentBuffer:
  """FIFO of planned segments."""

  def __init__(self):
    self._segments: collections.deque[Segment] = collections.deque()

  def __len__(self) -> int:
    return len(self._segments)

  def fill(self, plan: np.ndarray, plan_id: int, skip: int = 0) -> None:
    """Replaces the content by segments `skip ..` of `plan [M, H, D]`."""
    self._segments.clear()
    self._segments.extend(Segment(np.asarray(plan[m]), plan_id, m)
                          for m in range(min(skip, len(plan)), len(plan)))

  def pop(self) -> Segment:
    if not self._segments:
      raise IndexError("The intent buffer is empty; plan first.")
    return self._segments.popleft()

  def clear(self) -> None:
    self._segments.clear()


@dataclasses.dataclass(frozen=True)
class Chunk:
  """One refined chunk and where its segment came from."""
  actions: np.ndarray  # [H, A]
  segment: Segment
  planned: bool  # The planner ran (synchronously) in this call.
  stale: bool  # Re-used segment: the fresh plan had not landed.


def blend_from(last_action: np.ndarray, actions: np.ndarray, steps: int) -> np.ndarray:
  """The first `steps` actions of `actions [H, A]` blended linearly from `last_action [A]`."""
  out = np.array(actions, copy=True)
  steps = min(steps, len(out))
  for i in range(steps):
    weight = (steps - i) / (steps + 1)
    out[i] = weight * last_action + (1 - weight) * out[i]
  return out


class InterleavedRunner:
  """Plans when the buffer is empty, then refines one segment per call."""

  def __init__(self, plan_fn: PlanFn, refine_fn: RefineFn):
    self.plan_fn, self.refine_fn = plan_fn, refine_fn
    self.buffer = IntentBuffer()
    self.plan_calls = 0

  def reset(self) -> None:
    self.buffer.clear()

  def step(self, batch: Batch) -> Chunk:
    planned = not self.buffer
    if planned:
      self.buffer.fill(np.asarray(self.plan_fn(batch)), self.plan_calls)
      self.plan_calls += 1
    segment = self.buffer.pop()
    return Chunk(np.asarray(self.refine_fn(batch, segment.bins)), segment, planned, stale=False)

  def close(self) -> None:
    pass


class AsyncRunner:
  """The planner in a background thread; the refiner never waits for it once a plan exists."""

  def __init__(self, plan_fn: PlanFn, refine_fn: RefineFn, blend_steps: int = 2):
    if blend_steps < 0:
      raise ValueError(f"blend_steps={blend_steps} must be >= 0.")
    self.plan_fn, self.refine_fn, self.blend_steps = plan_fn, refine_fn, blend_steps
    self.buffer = IntentBuffer()
    self.plan_calls = 0
    self._planner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="libra-planner")
    self._lock = threading.Lock()
    self._pending: concurrent.futures.Future | None = None
    self._pending_chunk = 0  # The chunk index the pending plan's first segment is for.
    self._chunk = 0  # Chunks served this episode.
    self._last: Segment | None = None
    self._last_action: np.ndarray | None = None
    self._generation = 0  # Bumped by reset: a plan of an earlier episode is dropped.

  def reset(self) -> None:
    with self._lock:
      self._generation += 1
      self._pending = None
      self.buffer.clear()
      self._chunk, self._last, self._last_action = 0, None, None

  @property
  def planning(self) -> bool:
    """A plan was requested and has not been installed yet."""
    return self._pending is not None

  def wait_for_plan(self, timeout: float | None = None) -> None:
    """Blocks until the pending plan (if any) has been computed (tests and benchmarks)."""
    pending = self._pending
    if pending is not None:
      concurrent.futures.wait([pending], timeout=timeout)

  def _request(self, batch: Batch) -> None:
    plan_id = self.plan_calls
    self.plan_calls += 1
    generation = self._generation
    self._pending_chunk = self._chunk + 1
    self._pending = self._planner.submit(
        lambda: (generation, plan_id, np.asarray(self.plan_fn(batch))))

  def _install_landed(self) -> bool:
    """Installs the pending plan if it has landed; True if it did."""
    pending = self._pending
    if pending is None or not pending.done():
      return False
    self._pending = None
    generation, plan_id, plan = pending.result()  # Re-raises a planner error here.
    if generation != self._generation:
      return False
    late = max(self._chunk - self._pending_chunk, 0)
    self.buffer.fill(plan, plan_id, skip=late)
    return len(self.buffer) > 0

  def step(self, batch: Batch) -> Chunk:
    with self._lock:
      planned = False
      if self._last is None and not self.buffer:  # Nothing to refine with: plan now.
        self.buffer.fill(np.asarray(self.plan_fn(batch)), self.plan_calls)
        self.plan_calls += 1
        planned = True
      fresh = self._install_landed()
      stale = not self.buffer
      segment = self._last if stale else self.buffer.pop()
      if not self.buffer and self._pending is None:
        self._request(batch)  # The next plan, from this observation, for the chunks after it.
      actions = np.asarray(self.refine_fn(batch, segment.bins))
      if fresh and self._last_action is not None and self.blend_steps:
        actions = blend_from(self._last_action, actions, self.blend_steps)
      self._last, self._last_action = segment, actions[-1]
      self._chunk += 1
      return Chunk(actions, segment, planned, stale)

  def close(self) -> None:
    self._planner.shutdown(wait=True, cancel_futures=True)


def make_runner(mode: str, plan_fn: PlanFn, refine_fn: RefineFn, blend_steps: int = 2
                ) -> InterleavedRunner | AsyncRunner:
  if mode not in MODES:
    raise ValueError(f"Libra runtime mode {mode!r}; choose one of {MODES}.")
  if mode == "async":
    return AsyncRunner(plan_fn, refine_fn, blend_steps)
  return InterleavedRunner(plan_fn, refine_fn)


class LibraPolicy(Policy):
  """`Policy` for a Libra bundle: each `infer` returns one refined chunk of H actions, planning
  through the runner of `mode` ("interleaved" or "async"; default the config's `runtime.mode`)."""

  def __init__(self, bundle, *, mode: str | None = None, blend_steps: int | None = None,
               **kwargs):
    super().__init__(bundle, **kwargs)
    self.max_batch_size = 1  # One intent buffer: one observation per call.
    runtime = bundle.config.get("runtime", {})
    self.mode = mode or runtime.get("mode", "interleaved")
    blend = int(runtime.get("blend_steps", 2) if blend_steps is None else blend_steps)
    model = bundle.model
    grid = self.inputs.image_grid_thw(1)
    self._plan = jax.jit(functools.partial(libra.plan, model, image_grid_thw=grid))
    self._refine = jax.jit(functools.partial(libra.refine, model, num_steps=self.num_steps,
                                             method=self.method))
    self.runner = make_runner(self.mode, self._plan_fn, self._refine_fn, blend)
    self._noise_seed = self.seed
    self._instruction: str | None = None

  @property
  def action_horizon(self) -> int:
    return self.bundle.model.config.segment_length

  @property
  def variant(self) -> str:
    return f"libra-{self.mode}"

  def metadata(self) -> dict[str, Any]:
    c = self.bundle.model.config
    return dict(super().metadata(), libra=dict(
        mode=self.mode, num_bins=c.num_bins, num_segments=c.num_segments,
        segment_length=c.segment_length))

  def _plan_fn(self, batch: Batch) -> np.ndarray:
    return np.asarray(self._plan(self.bundle.params, batch))[0]  # [M, H, D]

  def _refine_fn(self, batch: Batch, bins: np.ndarray) -> np.ndarray:
    noise = jax.random.normal(jax.random.key(self._noise_seed),
                              libra.segment_shape(self.bundle.model.config, 1))
    return np.asarray(self._refine(self.bundle.params, batch, bins[None], noise))[0]  # [H, A]

  def reset(self) -> None:
    """A new episode: empty intent buffer, no pending plan."""
    self.runner.reset()
    self._instruction = None

  def infer_batch(self, observations: Sequence[Any]) -> dict[str, Any]:
    if len(observations) != 1:
      raise ObservationError(f"{len(observations)} observations in one request; a Libra policy "
                             "keeps one intent buffer (one robot): send one observation.")
    observation = observations[0]
    checked = self.check(observation)
    new_episode = observation.get("new_episode", False)
    if not isinstance(new_episode, (bool, np.bool_)):
      raise ObservationError(f"observation['new_episode'] is a {type(new_episode).__name__}; "
                             "send True to start a new episode (or leave it out).")
    if new_episode or checked.instruction != self._instruction:
      self.reset()
    self._instruction = checked.instruction
    start = time.perf_counter()
    batch = self.model_batch([checked])
    self._noise_seed = checked.seed
    preprocessed = time.perf_counter()
    chunk = self.runner.step(batch)
    sampled = time.perf_counter()
    actions = self.postprocess(chunk.actions[None], [checked])
    done = time.perf_counter()
    timing = dict(preprocess_ms=1e3 * (preprocessed - start),
                  model_ms=1e3 * (sampled - preprocessed), postprocess_ms=1e3 * (done - sampled),
                  planned=float(chunk.planned), stale=float(chunk.stale))
    timing["infer_ms"] = timing["preprocess_ms"] + timing["model_ms"] + timing["postprocess_ms"]
    return dict(actions=actions, policy_timing=timing)

  def warmup(self, batch_sizes: Sequence[int] = (1,)) -> dict[int, float]:
    """Compiles the planner and the refiner (one observation); returns {1: seconds}."""
    del batch_sizes
    start = time.perf_counter()
    self.infer(self.example_observation())
    if isinstance(self.runner, AsyncRunner):
      self.runner.wait_for_plan()
    self.reset()
    self.compile_seconds[1] = time.perf_counter() - start
    return dict(self.compile_seconds)

  def close(self) -> None:
    self.runner.close()

