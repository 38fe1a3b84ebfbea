"""Closed-loop evaluation on Meta-World: K episodes per task on the held-out evaluation seeds.

    agent = ChunkAgent(policy.infer, ExecutionConfig(replan_steps=4, ensemble="none", horizon=8))
    result = evaluate(agent, mw.resolve_tasks("mt10"), episodes=10)
    print(format_table(result))

An agent turns time steps into actions. `ChunkAgent` asks a chunk policy (an in-process
`serving.policy.Policy`, or openpi-client's `WebsocketClientPolicy` talking to
`scripts/serve.py`: both have `infer(observation) -> {"actions": [T, 4], ...}`) for a chunk
whenever its `serving.execution.ChunkExecutor` needs one; `ExpertAgent` is Meta-World's scripted
policy and `RandomAgent` draws uniform actions in [-1, 1]. Frames are rendered only when the
agent will read them (`Agent.wants_image`: rendering, ~40 frames/s on a CPU, dominates the cost)
and for the episodes recorded as videos.

`evaluate(..., num_envs=N)` runs N environments in worker processes (`sim.env_pool`) and sends
the chunk requests of all of them at a control step as one batch; every episode keeps its seeds,
so the outcomes are the sequential run's.

The result is plain JSON-able data (see `evaluate`); successes carry 95 % Wilson intervals per
task and per task group, and an MT50 result the published mean of the difficulty groups
(`difficulty_average`), next to which `REPORTED_MT50` holds the SmolVLA paper's rows.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from twinbrain_jax.serving.execution import ChunkExecutor, ExecutionConfig
from twinbrain_jax.sim import env_pool
from twinbrain_jax.sim import metaworld as mw

MAX_NOISE_SEED = 2**32

# MT50 under LeRobot's protocol as the SmolVLA paper reports it (arXiv 2506.01844, Table 2):
# success % per difficulty group and their plain mean ("average", not weighted by task count).
# Sizes as the table gives them (None: not given). Reported figures, not measured here.
REPORTED_MT50: dict[str, dict[str, Any]] = {
    "Diffusion Policy": dict(size=None, easy=23.1, medium=10.7, hard=1.9, very_hard=6.1,
                             average=10.5),
    "TinyVLA": dict(size=None, easy=77.6, medium=21.5, hard=11.4, very_hard=15.8, average=31.6),
    "π0 (3.5B-PaliGemma)": dict(size="3.5B", easy=80.4, medium=40.9, hard=36.7, very_hard=44.0,
                                average=50.5),
    "π0 (3.5B, robotics-pretrained)": dict(size="3.5B", easy=71.8, medium=48.2, hard=41.7,
                                           very_hard=30.0, average=47.9),
    "SmolVLA (0.24B)": dict(size="0.24B", easy=86.43, medium=46.36, hard=35.0, very_hard=60.0,
                            average=56.95),
    "SmolVLA (0.45B)": dict(size="0.45B", easy=82.5, medium=41.8, hard=45.0, very_hard=60.0,
                            average=57.3),
    "SmolVLA (2.25B)": dict(size="2.25B", easy=87.14, medium=51.82, hard=70.0, very_hard=64.0,
                            average=68.24),
}


class Agent(Protocol):
  """What `run_episode` drives (one episode at a time)."""
  name: str

  def clone(self) -> Agent:
    """A fresh agent of the same policy, for another environment of a parallel evaluation."""

  def reset(self, task: str, instruction: str, seed: int) -> None:
    """A new episode of `task` from `seed`."""

  @property
  def wants_image(self) -> bool:
    """Whether the next `act` reads `time_step.image` (else the frame is not rendered)."""

  def act(self, time_step: mw.TimeStep) -> np.ndarray:
    """The action `[4]` for this time step."""


class ExpertAgent:
  """Meta-World's scripted expert of each task (reads the raw 39-D observation, no image)."""
  name = "expert"
  wants_image = False

  def __init__(self):
    self._policies: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    self._policy = None

  def clone(self) -> ExpertAgent:
    return ExpertAgent()

  def reset(self, task: str, instruction: str, seed: int) -> None:
    del instruction, seed
    if task not in self._policies:
      self._policies[task] = mw.expert_policy(task)
    self._policy = self._policies[task]

  def act(self, time_step: mw.TimeStep) -> np.ndarray:
    return self._policy(time_step.raw)


class RandomAgent:
  """Uniform actions in [-1, 1]^4, drawn from a generator seeded by the episode seed."""
  name = "random"
  wants_image = False

  def __init__(self):
    self._rng = np.random.default_rng(0)

  def clone(self) -> RandomAgent:
    return RandomAgent()

  def reset(self, task: str, instruction: str, seed: int) -> None:
    del task, instruction
    self._rng = np.random.default_rng(seed)

  def act(self, time_step: mw.TimeStep) -> np.ndarray:
    del time_step
    return self._rng.uniform(-1.0, 1.0, mw.ACTION_DIM).astype(np.float32)


class ChunkAgent:
  """A chunk policy (`infer(observation) -> {"actions": [T, 4]}`) executed by a `ChunkExecutor`.

  Each request sends `image [H, W, 3] uint8`, `state [4]`, the task's instruction (or "" when
  `drop_instruction`: the instruction-blind ablation) and a noise `seed` fixed by the episode
  seed and the step, so an evaluation is reproducible against the same policy; the first request
  of an episode carries `new_episode=True` (a stateful policy, e.g. Libra's intent buffer,
  starts over; stateless policies ignore it).

  `infer_batch(observations) -> [actions [T, 4], ...]` (default: `infer` on each) is what a
  parallel evaluation calls with the requests of all its environments at one control step
  (`chunk_request` / `add_chunk`); `act` calls `infer` itself.
  """

  def __init__(self, infer: Callable[[dict[str, Any]], Mapping[str, Any]],
               execution: ExecutionConfig, *, name: str = "policy",
               drop_instruction: bool = False,
               infer_batch: Callable[[Sequence[dict[str, Any]]], Sequence[Any]] | None = None):
    self.name, self.execution, self.drop_instruction = name, execution, drop_instruction
    self._infer = infer
    self._infer_batch = infer_batch
    self._executor = ChunkExecutor(execution)
    self._instruction, self._seed = "", 0
    self._new_episode = True
    self.requests = 0

  def clone(self) -> ChunkAgent:
    return ChunkAgent(self._infer, self.execution, name=self.name,
                      drop_instruction=self.drop_instruction, infer_batch=self._infer_batch)

  def reset(self, task: str, instruction: str, seed: int) -> None:
    del task
    self._executor.reset()
    self._instruction = "" if self.drop_instruction else instruction
    self._seed = int(seed)
    self._new_episode = True

  @property
  def wants_image(self) -> bool:
    return self._executor.needs_chunk

  def chunk_request(self, time_step: mw.TimeStep) -> dict[str, Any] | None:
    """The observation to send when the next action needs a new chunk, else None."""
    if not self._executor.needs_chunk:
      return None
    observation = dict(time_step.observation(), instruction=self._instruction,
                       seed=(self._seed * 1009 + time_step.step) % MAX_NOISE_SEED,
                       new_episode=self._new_episode)
    self._new_episode = False
    return observation

  def add_chunk(self, actions: Any) -> None:
    """Hands the policy's answer to `chunk_request` to the executor."""
    actions = np.asarray(actions, np.float32)
    if actions.ndim != 2 or actions.shape[1] != mw.ACTION_DIM:
      raise ValueError(f"The policy returned actions of shape {actions.shape}; Meta-World needs "
                       f"chunks [T, {mw.ACTION_DIM}]: serve a policy trained on the `metaworld` "
                       "dataset (configs/twinbrain.py:metaworld_tiny).")
    self._executor.add_chunk(actions)
    self.requests += 1

  def infer_many(self, observations: Sequence[dict[str, Any]]) -> list[Any]:
    """The action chunks of several requests (one batch when `infer_batch` was given)."""
    if self._infer_batch is not None:
      return list(self._infer_batch(observations))
    return [self._infer(observation)["actions"] for observation in observations]

  def act(self, time_step: mw.TimeStep) -> np.ndarray:
    request = self.chunk_request(time_step)
    if request is not None:
      self.add_chunk(self._infer(request)["actions"])
    return self._executor.next_action()


@dataclasses.dataclass(frozen=True)
class Episode:
  """One evaluation episode.

  Attributes:
    task, seed: what fixes it.
    success: `info["success"]` held after some step (the episode ends there).
    steps: actions taken.
    rendered: frames rendered (what the agent read, plus every frame of a recorded episode).
    final_state: float32 `[4]` hand xyz and gripper opening at the end.
    frames: uint8 `[steps + 1, H, W, 3]` when recorded, else None.
  """
  task: str
  seed: int
  success: bool
  steps: int
  rendered: int
  final_state: np.ndarray
  frames: np.ndarray | None = None


def run_episode(env: mw.MetaWorldEnv, agent: Agent, seed: int, *,
                record: bool = False) -> Episode:
  """Runs `agent` from `env.reset(seed)` to success or the episode limit."""
  agent.reset(env.task, mw.instruction(env.task, seed), seed)
  time_step = env.reset(seed, render=record or agent.wants_image)
  rendered = int(time_step.image is not None)
  frames = [time_step.image] if record else []
  while not time_step.truncated and not time_step.success:
    action = agent.act(time_step)
    time_step = env.step(action, render=record or agent.wants_image)
    rendered += int(time_step.image is not None)
    if record:
      frames.append(time_step.image)
  return Episode(task=env.task, seed=int(seed), success=bool(time_step.success),
                 steps=int(time_step.step), rendered=rendered, final_state=time_step.state,
                 frames=np.stack(frames) if record else None)


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
  """The Wilson score interval of a success rate (95 % for the default z); (0, 1) if no trial.
  At 0 of n (n of n) the lower (upper) bound is exactly 0 (1), as in closed form: computed, it
  lands up to 1e-16 beside it, outside the interval's own estimate."""
  if trials == 0:
    return 0.0, 1.0
  p = successes / trials
  denominator = 1 + z * z / trials
  centre = (p + z * z / (2 * trials)) / denominator
  half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
  low = 0.0 if successes == 0 else max(0.0, centre - half)
  high = 1.0 if successes == trials else min(1.0, centre + half)
  return low, high


def summarize(successes: Sequence[bool]) -> dict[str, Any]:
  """`{"successes", "episodes", "success_rate", "ci95": [lo, hi]}` of a list of outcomes."""
  k, n = int(sum(bool(s) for s in successes)), len(successes)
  return dict(successes=k, episodes=n, success_rate=k / n if n else 0.0,
              ci95=list(wilson_interval(k, n)))


def groups_of(tasks: Sequence[str]) -> dict[str, tuple[str, ...]]:
  """The task groups (`mw.TASK_GROUPS`) with an evaluated task, each restricted to the evaluated
  tasks, plus "all"; a group is reported only if all of its tasks were evaluated."""
  evaluated = set(tasks)
  groups = {name: members for name, members in mw.TASK_GROUPS.items()
            if set(members) <= evaluated}
  groups["all"] = tuple(tasks)
  return groups


def check_num_envs(num_envs: int, num_tasks: int, episodes: int) -> None:
  """Raises ValueError unless 1 <= num_envs <= the number of episodes (more would sit idle)."""
  total = num_tasks * episodes
  if not 1 <= num_envs <= total:
    raise ValueError(f"--num_envs={num_envs}: give 1 to {total}, the number of episodes "
                     f"({num_tasks} tasks x --episodes={episodes}); more environments than "
                     "episodes would sit idle.")


class EvaluationStopped(RuntimeError):
  """A parallel evaluation stopped on a worker's failure; `partial` holds the finished
  episodes' result (`evaluate`'s structure, with `"incomplete": True`)."""

  def __init__(self, message: str, partial: dict[str, Any]):
    super().__init__(message)
    self.partial = partial


def evaluate(agent: Agent, tasks: Sequence[str], episodes: int, *, seed_offset: int = 0,
             image_size: int | Sequence[int] = mw.DEFAULT_IMAGE_SIZE,
             max_steps: int | None = None, num_videos: int = 0, num_envs: int = 1,
             on_episode: Callable[[Episode], None] | None = None) -> dict[str, Any]:
  """Runs `episodes` episodes of every task on `mw.eval_seeds(episodes, seed_offset)`.

  Args:
    num_videos: the first `num_videos` episodes of each task are recorded (every frame).
    num_envs: environments run at once, each in a worker process (`sim.env_pool`), with one
      agent each (`agent.clone()`); the chunk requests of all of them at a control step go to
      the policy as one batch (`ChunkAgent.infer_many`). Every episode keeps its seed and its
      noise seeds, so its outcome is the one a sequential run (`num_envs=1`) gives.
    on_episode: called after every episode (progress bars, video writers); recorded episodes
      carry their frames. In parallel, episodes finish out of order.

  Returns:
    JSON-able `{"policy", "tasks": {task: {successes, episodes, success_rate, ci95, mean_steps,
    seeds, success_per_episode, steps_per_episode, final_state_per_episode}}, "groups": {group:
    {successes, episodes, success_rate, ci95, tasks}}, "settings": {...}, "frames_rendered",
    "wall_s"}`.

  Raises:
    EvaluationStopped: a worker failed or died (the message names its task and seed; the
      exception carries the finished episodes' result).
  """
  tasks = tuple(mw.resolve_tasks(tasks))
  seeds = mw.eval_seeds(episodes, seed_offset)
  check_num_envs(num_envs, len(tasks), episodes)
  settings = dict(episodes_per_task=episodes, seed_offset=seed_offset,
                  image_size=list(mw.image_hw(image_size)), max_steps=max_steps,
                  num_envs=num_envs)
  start = time.perf_counter()
  finished: dict[str, list[Episode]] = {task: [] for task in tasks}
  limits: dict[str, int] = {}

  def done(episode: Episode, limit: int) -> None:
    finished[episode.task].append(episode)
    limits[episode.task] = limit
    if on_episode is not None:
      on_episode(episode)

  if num_envs == 1:
    for task in tasks:
      with mw.make_env(task, image_size, max_steps) as env:
        for i, seed in enumerate(seeds):
          done(run_episode(env, agent, seed, record=i < num_videos), env.max_steps)
  else:
    try:
      _run_parallel(agent, tasks, seeds, image_size, max_steps, num_videos, num_envs, done)
    except env_pool.WorkerError as e:
      partial = _result(agent.name, finished, limits, settings, start)
      raise EvaluationStopped(f"The evaluation stopped: {e}", dict(partial, incomplete=True,
                                                                   error=str(e))) from e
  return _result(agent.name, finished, limits, settings, start)


@dataclasses.dataclass
class _Running:
  """An episode in progress in one worker of a parallel evaluation."""
  task: str
  seed: int
  record: bool
  time_step: mw.TimeStep | None = None
  rendered: int = 0
  frames: list[np.ndarray] = dataclasses.field(default_factory=list)

  def observe(self, time_step: mw.TimeStep) -> None:
    self.time_step = time_step
    self.rendered += int(time_step.image is not None)
    if self.record:
      self.frames.append(time_step.image)

  @property
  def over(self) -> bool:
    return self.time_step.truncated or self.time_step.success

  def episode(self) -> Episode:
    ts = self.time_step
    return Episode(task=self.task, seed=self.seed, success=bool(ts.success), steps=int(ts.step),
                   rendered=self.rendered, final_state=ts.state,
                   frames=np.stack(self.frames) if self.record else None)


def _run_parallel(agent: Agent, tasks: Sequence[str], seeds: Sequence[int], image_size,
                  max_steps: int | None, num_videos: int, num_envs: int,
                  done: Callable[[Episode, int], None]) -> None:
  """`evaluate`'s episodes on `num_envs` workers, stepped together: each control step receives
  every worker's time step, sends the chunk requests as one batch, then every action."""
  queue = collections.deque((task, i, seed) for task in tasks for i, seed in enumerate(seeds))
  agents = [agent.clone() for _ in range(num_envs)]
  running: list[_Running | None] = [None] * num_envs
  with env_pool.EnvPool(num_envs, image_size, max_steps) as pool:

    def start_next(worker: int) -> None:
      task, i, seed = queue.popleft()
      agents[worker].reset(task, mw.instruction(task, seed), seed)
      running[worker] = _Running(task, int(seed), record=i < num_videos)
      pool.send(worker, "reset", task, int(seed), i < num_videos or agents[worker].wants_image)

    for worker in range(num_envs):
      start_next(worker)
    while any(r is not None for r in running):
      live = []
      for worker, episode in enumerate(running):
        if episode is None:
          continue
        episode.observe(pool.receive(worker))
        if episode.over:
          done(episode.episode(), pool.max_steps[worker])
          running[worker] = None
          if queue:
            start_next(worker)
        else:
          live.append(worker)
      requests = [(w, agents[w].chunk_request(running[w].time_step))
                  for w in live if getattr(agents[w], "chunk_request", None)]
      requests = [(w, r) for w, r in requests if r is not None]
      if requests:
        chunks = agents[requests[0][0]].infer_many([r for _, r in requests])
        for (w, _), chunk in zip(requests, chunks):
          agents[w].add_chunk(chunk)
      for w in live:
        action = agents[w].act(running[w].time_step)
        pool.send(w, "step", action, running[w].record or agents[w].wants_image)


def _result(policy: str, finished: Mapping[str, Sequence[Episode]], limits: Mapping[str, int],
            settings: dict[str, Any], start: float) -> dict[str, Any]:
  """`evaluate`'s result of the finished episodes (each task's in seed order)."""
  per_task, rendered = {}, 0
  for task, outcomes in finished.items():
    if not outcomes:
      continue
    outcomes = sorted(outcomes, key=lambda e: e.seed)
    rendered += sum(e.rendered for e in outcomes)
    successes = [e.success for e in outcomes]
    per_task[task] = dict(
        summarize(successes), seeds=[e.seed for e in outcomes], success_per_episode=successes,
        steps_per_episode=[e.steps for e in outcomes],
        final_state_per_episode=[[round(float(x), 6) for x in e.final_state] for e in outcomes],
        mean_steps=float(np.mean([e.steps for e in outcomes])), max_steps=limits[task])
  groups = {}
  for name, members in groups_of(tuple(per_task)).items():
    outcomes = [s for task in members for s in per_task[task]["success_per_episode"]]
    groups[name] = dict(summarize(outcomes), tasks=list(members))
  result = dict(policy=policy, tasks=per_task, groups=groups, settings=settings,
                frames_rendered=rendered, wall_s=time.perf_counter() - start)
  average = difficulty_average(result)
  if average is not None:
    result["difficulty_average"] = average
  return result


def difficulty_average(result: Mapping[str, Any], resamples: int = 10_000,
                       seed: int = 0) -> dict[str, Any] | None:
  """The MT50 average as published (the plain mean of the four difficulty groups' success rates,
  `REPORTED_MT50`) with a 95 % stratified-bootstrap interval (episodes resampled within each
  group, `resamples` times); None unless all four groups were evaluated."""
  if not all(g in result["groups"] for g in mw.DIFFICULTY):
    return None
  outcomes = [np.array([s for task in result["groups"][g]["tasks"]
                        for s in result["tasks"][task]["success_per_episode"]], np.float64)
              for g in mw.DIFFICULTY]
  rng = np.random.default_rng(seed)
  means = np.mean([o[rng.integers(0, len(o), (resamples, len(o)))].mean(axis=1)
                   for o in outcomes], axis=0)
  lo, hi = np.percentile(means, [2.5, 97.5])
  return dict(success_rate=float(np.mean([o.mean() for o in outcomes])),
              ci95=[float(lo), float(hi)], groups=list(mw.DIFFICULTY),
              interval="stratified bootstrap", resamples=resamples)


def format_table(result: Mapping[str, Any]) -> str:
  """A text table: per task and per group, successes / episodes, rate and 95 % interval."""
  rows = [(task, r) for task, r in result["tasks"].items()]
  rows += [(f"[{name}]", r) for name, r in result["groups"].items()]
  width = max(len(name) for name, _ in rows)
  lines = [f"policy: {result['policy']}",
           f"{'task':<{width}}  success  rate    95% CI          mean steps"]
  for name, r in rows:
    lo, hi = r["ci95"]
    steps = f"{r['mean_steps']:.0f}" if "mean_steps" in r else ""
    lines.append(f"{name:<{width}}  {r['successes']:>3}/{r['episodes']:<3}  "
                 f"{r['success_rate']:5.1%}  [{lo:5.1%}, {hi:5.1%}]  {steps:>6}")
  average = result.get("difficulty_average")
  if average:
    lo, hi = average["ci95"]
    lines.append(f"{'[mean of the 4 groups]':<{width}}  {'':>7}  {average['success_rate']:5.1%}"
                 f"  [{lo:5.1%}, {hi:5.1%}]  (bootstrap; the published MT50 average)")
  return "\n".join(lines)


def format_comparison(results: Sequence[Mapping[str, Any]]) -> str:
  """One row per task and group of the first result, one `successes/episodes [95 % CI]` column
  per result (all evaluated on the same tasks)."""
  keys = [("tasks", t) for t in results[0]["tasks"]] + [("groups", g) for g in results[0]["groups"]]
  cell = lambda r: f"{r['successes']}/{r['episodes']} [{r['ci95'][0]:.0%}, {r['ci95'][1]:.0%}]"
  columns = [["task"] + [name if kind == "tasks" else f"[{name}]" for kind, name in keys]]
  columns += [[r["policy"]] + [cell(r[kind][name]) for kind, name in keys] for r in results]
  widths = [max(map(len, c)) for c in columns]
  return "\n".join("  ".join(f"{c[i]:<{w}}" for c, w in zip(columns, widths)).rstrip()
                   for i in range(len(columns[0])))


def save_figure(make_figure: Callable[[], Any], path: str) -> None:
  """Draws `make_figure()` without a display and writes it to `path` (PNG)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig = make_figure()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_success(results: Sequence[Mapping[str, Any]], path: str) -> None:
  """Writes `success_figure(results)` to `path` (PNG), without a display."""
  save_figure(lambda: success_figure(results), path)


def success_figure(results: Sequence[Mapping[str, Any]]):
  """A bar chart of per-task success rates with their 95 % intervals, one bar per result (a
  matplotlib Figure, drawn with the current backend: inline in a notebook)."""
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  tasks = list(results[0]["tasks"])
  x = np.arange(len(tasks) + 1)
  width = 0.8 / len(results)
  fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(x) + 2) + 1.5, 4.0))
  for i, result in enumerate(results):
    rows = [result["tasks"][t] for t in tasks] + [result["groups"]["all"]]
    rates = np.array([r["success_rate"] for r in rows])
    lo = np.maximum(0.0, rates - np.array([r["ci95"][0] for r in rows]))  # Rounding at 0, 1.
    hi = np.maximum(0.0, np.array([r["ci95"][1] for r in rows]) - rates)
    ax.bar(x + (i - (len(results) - 1) / 2) * width, rates, width, yerr=[lo, hi], capsize=2,
           label=result["policy"])
  ax.set_xticks(x, [t.removesuffix("-v3") for t in tasks] + ["all"], rotation=45, ha="right")
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("success rate (95% Wilson CI)")
  ax.set_title(f"Meta-World, {results[0]['settings']['episodes_per_task']} episodes per task "
               "(evaluation seeds)")
  ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # Clear of the bars.
  fig.tight_layout()
  return fig


def mt50_markdown(results: Sequence[Mapping[str, Any]],
                  reported: Mapping[str, Mapping[str, Any]] | None = None) -> str:
  """A Markdown table of MT50 results (each with `difficulty_average`): per difficulty group
  `successes/episodes` and rate with its 95 % Wilson interval, then the mean of the groups with
  its bootstrap interval and the pooled rate; the `reported` rows follow (rates only)."""
  cell = lambda r: (f"{r['successes']}/{r['episodes']} = {r['success_rate']:.1%} "
                    f"[{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}]")
  lines = ["| policy | easy | medium | hard | very hard | mean of groups | all episodes |",
           "|---|---|---|---|---|---|---|"]
  for r in results:
    a = r["difficulty_average"]
    lines.append(f"| {r['policy']} (measured) | "
                 + " | ".join(cell(r["groups"][g]) for g in mw.DIFFICULTY)
                 + f" | **{a['success_rate']:.1%}** [{a['ci95'][0]:.1%}, {a['ci95'][1]:.1%}]"
                 f" | {cell(r['groups']['all'])} |")
  for name, row in (reported or {}).items():
    size = f", {row['size']}" if row.get("size") and row["size"] not in name else ""
    lines.append(f"| {name}{size} (reported) | "
                 + " | ".join(f"{row[g]:.1f} %" for g in mw.DIFFICULTY)
                 + f" | **{row['average']:.1f} %** | |")
  return "\n".join(lines)


def plot_groups(results: Sequence[Mapping[str, Any]], path: str,
                reported: Mapping[str, Mapping[str, Any]] | None = None) -> None:
  """Writes `groups_figure` to `path` (PNG), without a display."""
  save_figure(lambda: groups_figure(results, reported), path)


def groups_figure(results: Sequence[Mapping[str, Any]],
                  reported: Mapping[str, Mapping[str, Any]] | None = None):
  """MT50 success per difficulty group and their mean: one bar per measured result (with its
  95 % interval: Wilson per group, bootstrap for the mean) and, hatched and without intervals,
  the `reported` rows (`REPORTED_MT50` or a subset)."""
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  names = [*mw.DIFFICULTY, "average"]
  reported = dict(reported or {})
  x = np.arange(len(names))
  width = 0.85 / (len(results) + len(reported))
  fig, ax = plt.subplots(figsize=(9.5, 4.2))
  for i, result in enumerate(results):
    rows = [result["groups"][g] for g in mw.DIFFICULTY] + [result["difficulty_average"]]
    rates = np.array([r["success_rate"] for r in rows])
    lo = np.maximum(0.0, rates - np.array([r["ci95"][0] for r in rows]))
    hi = np.maximum(0.0, np.array([r["ci95"][1] for r in rows]) - rates)
    ax.bar(x + (i - (len(results) + len(reported) - 1) / 2) * width, rates, width,
           yerr=[lo, hi], capsize=2, label=f"{result['policy']} (measured)")
  for j, (name, row) in enumerate(reported.items()):
    k = len(results) + j
    ax.bar(x + (k - (len(results) + len(reported) - 1) / 2) * width,
           [row[n] / 100 for n in names], width, hatch="//", alpha=0.45,
           label=f"{name} (reported)")
  ax.set_xticks(x, ["easy (28)", "medium (11)", "hard (6)", "very hard (5)", "mean of groups"])
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("success rate (95% CI)")
  ax.set_title(f"Meta-World MT50, {results[0]['settings']['episodes_per_task']} episodes per "
               f"task, {results[0]['settings']['max_steps']}-step limit")
  ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
  fig.tight_layout()
  return fig


def result_stem(label: str) -> str:
  """The file name stem of the result labelled `label`: `scripts/eval_metaworld.py` writes
  `<stem>.json`, `<stem>_success.png` and `<stem>_videos/`."""
  return label.replace("/", "_").replace(" ", "_").replace(":", "_")


def video_path(output_dir: str, label: str, task: str, seed: int) -> str:
  """Where `scripts/eval_metaworld.py` writes the GIF of one recorded episode."""
  return os.path.join(output_dir, f"{result_stem(label)}_videos", f"{task}_seed{seed}.gif")


def recorded_episodes(output_dir: str, result: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The episodes of `result` (a JSON that `scripts/eval_metaworld.py` wrote to `output_dir`)
  whose GIF is there: `{"policy", "task", "seed", "success", "steps", "video"}` each, in the
  result's order."""
  episodes = []
  for task, r in result["tasks"].items():
    for seed, success, steps in zip(r["seeds"], r["success_per_episode"], r["steps_per_episode"]):
      path = video_path(output_dir, result["policy"], task, seed)
      if os.path.exists(path):
        episodes.append(dict(policy=result["policy"], task=task, seed=seed, success=success,
                             steps=steps, video=path))
  return episodes


def success_and_failure(episodes: Sequence[Mapping[str, Any]],
                        policy: str) -> list[Mapping[str, Any]]:
  """A success and a failure among `episodes` (`recorded_episodes`) to show side by side: the
  first pair of `policy` on one task, else of `policy` on any tasks, else of any policies; only
  the one there is when no episode has the other outcome."""
  def first(success, **where):
    return next((e for e in episodes if e["success"] == success
                 and all(e[k] == v for k, v in where.items())), None)
  tasks = dict.fromkeys(e["task"] for e in episodes)
  for where in [*(dict(policy=policy, task=t) for t in tasks), dict(policy=policy), {}]:
    pair = [first(True, **where), first(False, **where)]
    if None not in pair:
      return pair
  return [e for e in (first(True), first(False)) if e is not None]


def rollout_strip(episodes: Sequence[Mapping[str, Any]], frames_per_episode: int = 6):
  """A figure with one row per recorded episode (`recorded_episodes` entries: their GIFs) and
  `frames_per_episode` frames evenly spaced from its first to its last, titled with the task,
  the outcome and the step of each frame."""
  import imageio.v3 as iio  # pylint: disable=g-import-not-at-top
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(len(episodes), frames_per_episode, squeeze=False,
                           figsize=(1.6 * frames_per_episode, 1.75 * len(episodes)))
  for row, episode in zip(axes, episodes):
    frames = iio.imread(episode["video"])  # [T, H, W, 3 or 4]
    picks = np.linspace(0, len(frames) - 1, frames_per_episode).round().astype(int)
    for ax, t in zip(row, picks):
      ax.imshow(frames[t][..., :3])
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_title(f"step {t}", fontsize=7)
    outcome = f"success in {episode['steps']} steps" if episode["success"] else "failure"
    row[0].set_ylabel(f"{episode['task'].removesuffix('-v3')}\n{outcome}", fontsize=7)
  fig.tight_layout()
  return fig


def write_video(frames: np.ndarray, path: str, fps: int = 20) -> None:
  """Writes `frames [T, H, W, 3] uint8` as an animated GIF (imageio's Pillow writer)."""
  import imageio.v3 as iio  # pylint: disable=g-import-not-at-top
  iio.imwrite(path, np.asarray(frames), duration=1000 / fps, loop=0)
