"""Closed-loop Meta-World evaluation: Wilson intervals, agents, and the whole pipeline end to end
(expert data -> training -> scripts/serve.py -> openpi-client -> scripts/eval_metaworld.py)."""

import os

# Offscreen rendering without a display; must be set before mujoco is imported.
os.environ.setdefault("MUJOCO_GL", "egl")

import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import processes  # noqa: E402
from configs import twinbrain as twinbrain_configs  # noqa: E402
from tests.fixtures_data import small_config  # noqa: E402
from twinbrain_jax.data.pipeline import DataPipeline  # noqa: E402
from twinbrain_jax.serving.execution import ExecutionConfig  # noqa: E402
from twinbrain_jax.sim import evaluation  # noqa: E402
from twinbrain_jax.sim import metaworld as mw  # noqa: E402
from twinbrain_jax.sim import metaworld_dataset as mwd  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high")

REPO = pathlib.Path(__file__).resolve().parents[1]
TASK = "reach-v3"  # The shortest expert episodes (~45 steps).
HANG_S = 900  # Only catches a hang: a loaded 2-core machine compiles slowly.
MAX_STEPS = 12  # The smoke episode's limit: short, and a barely trained policy never succeeds.


def test_wilson_interval_known_values():
  # Wilson (1927); the usual table values for n = 10.
  np.testing.assert_allclose(evaluation.wilson_interval(0, 10), (0.0, 0.2775), atol=1e-4)
  np.testing.assert_allclose(evaluation.wilson_interval(10, 10), (0.7225, 1.0), atol=1e-4)
  np.testing.assert_allclose(evaluation.wilson_interval(5, 10), (0.2366, 0.7634), atol=1e-4)
  assert evaluation.wilson_interval(0, 0) == (0.0, 1.0)
  # Exact at the ends (computed, 0/500 gave 4e-19 and 2594/2594 gave 1 - 1e-16).
  assert evaluation.wilson_interval(0, 500)[0] == 0.0
  assert evaluation.wilson_interval(2594, 2594)[1] == 1.0
  summary = evaluation.summarize([True, False, False, True])
  assert summary["successes"] == 2 and summary["episodes"] == 4
  assert summary["success_rate"] == 0.5


def test_groups_are_reported_only_when_complete():
  groups = evaluation.groups_of(mw.MT10)
  assert set(groups) == {"mt10", "all"}
  assert set(evaluation.groups_of(["reach-v3"])) == {"all"}


def _result(policy, outcomes):
  """An evaluation result of `{task: [success, ...]}` on the evaluation seeds (a failure runs to
  the 200-step limit, a success ends at step 50)."""
  tasks = {task: dict(evaluation.summarize(s), seeds=mw.eval_seeds(len(s)),
                      success_per_episode=s, steps_per_episode=[50 if x else 200 for x in s])
           for task, s in outcomes.items()}
  return dict(policy=policy, tasks=tasks)


def test_mt50_average_is_the_mean_of_the_difficulty_groups(tmp_path):
  # Easy: every episode succeeds; medium: half; hard and very hard: none (10 episodes a task).
  rate = {"easy": 1.0, "medium": 0.5, "hard": 0.0, "very_hard": 0.0}
  outcomes = {task: [i < 10 * rate[group] for i in range(10)]
              for group, tasks in mw.DIFFICULTY.items() for task in tasks}
  result = _result("policy", outcomes)
  result["groups"] = {name: dict(evaluation.summarize(
      [s for t in members for s in outcomes[t]]), tasks=list(members))
                      for name, members in evaluation.groups_of(list(outcomes)).items()}
  average = evaluation.difficulty_average(result)
  assert average["success_rate"] == pytest.approx(0.375)  # Not 0.66, the pooled rate.
  assert result["groups"]["all"]["success_rate"] == pytest.approx((280 + 55) / 500)
  lo, hi = average["ci95"]
  # Only medium varies: the interval is the medium rate's (n = 110) divided by 4, about ±2.3 %.
  assert 0.35 < lo < 0.375 < hi < 0.40
  assert evaluation.difficulty_average(_result("p", {"reach-v3": [True]}) | dict(
      groups={"all": {}})) is None
  result.update(difficulty_average=average, settings=dict(episodes_per_task=10, max_steps=400))
  evaluation.plot_groups([result], str(tmp_path / "groups.png"), evaluation.REPORTED_MT50)
  table = evaluation.mt50_markdown([result], {"TinyVLA": evaluation.REPORTED_MT50["TinyVLA"]})
  assert "| policy (measured) | 280/280 = 100.0% [98.6%, 100.0%] | 55/110 = 50.0%" in table
  assert "**37.5%**" in table and "| TinyVLA (reported) | 77.6 % |" in table
  assert (tmp_path / "groups.png").stat().st_size > 0
  for row in evaluation.REPORTED_MT50.values():  # As published: the average is the plain mean.
    assert row["average"] == pytest.approx(np.mean([row[g] for g in mw.DIFFICULTY]), abs=0.06)


def test_plot_script_draws_results_and_a_rollout_strip(tmp_path):
  def record(episode):
    evaluation.write_video(episode.frames, evaluation.video_path(str(tmp_path), "random",
                                                                 episode.task, episode.seed))

  os.makedirs(tmp_path / "random_videos")
  result = evaluation.evaluate(evaluation.RandomAgent(), ["reach-v3", "push-v3"], 1,
                               image_size=32, max_steps=10, num_videos=1, on_episode=record)
  with open(tmp_path / "random.json", "w") as f:
    json.dump(result, f)
  script = [sys.executable, "scripts/plot_metaworld.py", f"--results={tmp_path / 'random.json'}",
            f"--output_dir={tmp_path / 'img'}"]
  done = processes.run([*script, "--strip_tasks=push,reach", "--strip_frames=3"],
                       tmp_path / "plot", HANG_S, cwd=REPO)
  assert done.returncode == 0, done.stderr[-2000:]
  assert (tmp_path / "img" / "metaworld_strip.png").stat().st_size > 0
  assert (tmp_path / "img" / "metaworld_success.png").stat().st_size > 0
  assert not (tmp_path / "img" / "metaworld_groups.png").exists()  # Not an MT50 result.
  missing = processes.run([*script[:-1], f"--output_dir={tmp_path / 'img2'}",
                           "--strip_tasks=drawer-close"], tmp_path / "bad", HANG_S,
                          cwd=REPO)
  assert missing.returncode != 0
  assert "no recorded episode of drawer-close-v3" in missing.stderr and "wrote" not in missing.stdout
  assert not (tmp_path / "img2").exists()  # Nothing written before the error.


def test_recorded_episodes_and_a_success_beside_a_failure(tmp_path):
  trained = _result("server 127.0.0.1:8000", {"reach-v3": [True, True], "push-v3": [True, False]})
  expert = _result("expert", {"reach-v3": [True, True], "push-v3": [True, True]})
  random = _result("random", {"reach-v3": [False, False], "push-v3": [False, False]})
  seeds = mw.eval_seeds(2)
  recorded = {  # What eval_metaworld.py --num_videos would have written.
      "server 127.0.0.1:8000": [("reach-v3", seeds[0]), ("push-v3", seeds[0]), ("push-v3", seeds[1])],
      "expert": [("reach-v3", seeds[0])], "random": [("push-v3", seeds[1])]}
  for label, episodes in recorded.items():
    for task, seed in episodes:
      path = evaluation.video_path(str(tmp_path), label, task, seed)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      pathlib.Path(path).touch()
  assert os.path.exists(tmp_path / "server_127.0.0.1_8000_videos" / f"push-v3_seed{seeds[1]}.gif")
  episodes = evaluation.recorded_episodes(str(tmp_path), trained)
  assert [(e["task"], e["seed"], e["success"], e["steps"]) for e in episodes] == [
      ("reach-v3", seeds[0], True, 50), ("push-v3", seeds[0], True, 50),
      ("push-v3", seeds[1], False, 200)]
  assert episodes[2]["video"] == evaluation.video_path(str(tmp_path), trained["policy"],
                                                       "push-v3", seeds[1])
  everyone = [e for r in (expert, random, trained)
              for e in evaluation.recorded_episodes(str(tmp_path), r)]
  key = lambda shown: [(e["policy"], e["task"], e["seed"]) for e in shown]
  # The trained policy's pair on one task (push), not its reach success beside its push failure.
  assert key(evaluation.success_and_failure(everyone, trained["policy"])) == [
      (trained["policy"], "push-v3", seeds[0]), (trained["policy"], "push-v3", seeds[1])]
  # Without a pair of its own: the first success and the first failure of anyone.
  assert key(evaluation.success_and_failure(everyone, "expert")) == [
      ("expert", "reach-v3", seeds[0]), ("random", "push-v3", seeds[1])]
  # Only failures recorded: the one there is.
  assert key(evaluation.success_and_failure(everyone[1:2], "random")) == [
      ("random", "push-v3", seeds[1])]
  assert evaluation.success_and_failure([], "random") == []


class _Counting:
  """A chunk policy returning a fixed chunk; counts its calls and checks what it is sent."""

  def __init__(self, horizon=8):
    self.calls, self.instructions, self.horizon = 0, set(), horizon

  def __call__(self, observation):
    assert observation["image"].dtype == np.uint8 and observation["image"].shape == (32, 32, 3)
    assert observation["state"].shape == (4,)
    self.calls += 1
    self.instructions.add(observation["instruction"])
    return {"actions": np.zeros((self.horizon, 4), np.float32)}


def test_chunk_agent_renders_and_asks_only_when_it_replans():
  infer = _Counting()
  agent = evaluation.ChunkAgent(infer, ExecutionConfig(replan_steps=4, ensemble="none",
                                                       horizon=8))
  with mw.make_env(TASK, 32, max_steps=10) as env:
    episode = evaluation.run_episode(env, agent, mw.eval_seeds(1)[0])
    assert not episode.success and episode.steps == 10 and episode.frames is None
    # Steps 0, 4, 8 ask for a chunk: only their frames are rendered.
    assert infer.calls == 3 and episode.rendered == 3
    assert infer.instructions == {mw.INSTRUCTIONS[TASK]}
    blind = evaluation.ChunkAgent(infer, ExecutionConfig(replan_steps=4, ensemble="none",
                                                         horizon=8), drop_instruction=True)
    recorded = evaluation.run_episode(env, blind, mw.eval_seeds(1)[0], record=True)
    assert recorded.frames.shape == (11, 32, 32, 3) and recorded.rendered == 11
    assert "" in infer.instructions
  with pytest.raises(ValueError, match="chunks \\[T, 4\\]"):
    with mw.make_env(TASK, 32, max_steps=2) as env:
      bad = evaluation.ChunkAgent(lambda obs: {"actions": np.zeros((8, 7))}, ExecutionConfig())
      evaluation.run_episode(env, bad, mw.eval_seeds(1)[0])


def test_expert_beats_random_on_the_evaluation_seeds():
  expert = evaluation.evaluate(evaluation.ExpertAgent(), [TASK], 2, image_size=32)
  random = evaluation.evaluate(evaluation.RandomAgent(), [TASK], 2, image_size=32, max_steps=50)
  assert expert["tasks"][TASK]["successes"] == 2 and expert["frames_rendered"] == 0
  assert random["tasks"][TASK]["seeds"] == list(mw.eval_seeds(2))
  assert random["tasks"][TASK]["steps_per_episode"] == [50, 50]  # Reach needs aiming.
  assert random["groups"]["all"]["successes"] == 0


class _SeededPolicy:
  """A chunk policy whose chunk is drawn from the request's noise seed alone (as a real policy's
  noise is); records the size of every batch it is asked for."""

  def __init__(self):
    self.batch_sizes = []

  def __call__(self, observation):
    rng = np.random.default_rng(observation["seed"])
    return {"actions": rng.uniform(-1.0, 1.0, (8, 4)).astype(np.float32)}

  def batch(self, observations):
    self.batch_sizes.append(len(observations))
    return [self(o)["actions"] for o in observations]


def _per_episode(result):
  return {task: (r["seeds"], r["success_per_episode"], r["steps_per_episode"],
                 r["final_state_per_episode"]) for task, r in result["tasks"].items()}


def test_parallel_evaluation_gives_the_sequential_episodes():
  tasks = ["reach-v3", "drawer-close-v3"]
  for make_agent, max_steps in [(evaluation.ExpertAgent, 150), (evaluation.RandomAgent, 40)]:
    sequential = evaluation.evaluate(make_agent(), tasks, 3, image_size=32, max_steps=max_steps)
    parallel = evaluation.evaluate(make_agent(), tasks, 3, image_size=32, max_steps=max_steps,
                                   num_envs=4)
    assert _per_episode(parallel) == _per_episode(sequential)  # Bit for bit: same floats.
    assert parallel["groups"] == sequential["groups"]
    assert parallel["settings"]["num_envs"] == 4 and parallel["frames_rendered"] == 0
  assert sum(sequential["tasks"][t]["successes"] for t in tasks) == 0  # Random: the limit.
  policy = _SeededPolicy()
  agent = evaluation.ChunkAgent(policy, ExecutionConfig(replan_steps=4, ensemble="none",
                                                        horizon=8), infer_batch=policy.batch)
  recorded = []
  sequential = evaluation.evaluate(agent, tasks, 3, image_size=32, max_steps=30, num_videos=1)
  parallel = evaluation.evaluate(agent, tasks, 3, image_size=32, max_steps=30, num_videos=1,
                                 num_envs=3, on_episode=recorded.append)
  assert _per_episode(parallel) == _per_episode(sequential)
  # Frames: every one of the recorded episodes, else one per chunk request (steps 0, 4, ... 28).
  assert parallel["frames_rendered"] == sequential["frames_rendered"] == 2 * 31 + 4 * 8
  assert max(policy.batch_sizes) == 3  # One batch per control step across the environments.
  videos = {(e.task, e.seed): e.frames for e in recorded if e.frames is not None}
  assert set(videos) == {(t, mw.EVAL_SEED_START) for t in tasks}
  assert all(frames.shape == (31, 32, 32, 3) for frames in videos.values())
  with pytest.raises(ValueError, match="num_envs=7: give 1 to 6"):
    evaluation.evaluate(agent, tasks, 3, num_envs=7)


def test_parallel_evaluation_stops_on_a_dead_worker_and_keeps_the_finished_episodes():
  import multiprocessing  # pylint: disable=g-import-not-at-top
  finished = []

  def kill_a_worker(episode):
    finished.append(episode)
    if len(finished) == 1:  # Kill a worker in the middle of an episode.
      os.kill(multiprocessing.active_children()[-1].pid, 9)

  with pytest.raises(evaluation.EvaluationStopped) as stopped:
    evaluation.evaluate(evaluation.RandomAgent(), ["reach-v3"], 4, image_size=32,
                        max_steps=400, num_envs=2, on_episode=kill_a_worker)
  message = str(stopped.value)
  assert re.search(r"running reach-v3 from seed 100000\d, died \(exit code -9", message), message
  partial = stopped.value.partial
  assert partial["incomplete"] and partial["tasks"]["reach-v3"]["episodes"] == len(finished) >= 1
  assert partial["tasks"]["reach-v3"]["seeds"] == sorted(e.seed for e in finished)
  assert not multiprocessing.active_children()


def test_eval_script_names_a_crashed_worker_and_writes_the_finished_episodes(tmp_path):
  args = [sys.executable, "scripts/eval_metaworld.py", "--policy=random", "--tasks=reach,push",
          "--episodes=3", "--max_steps=400", "--num_envs=2", "--image_size=32",
          f"--output_dir={tmp_path}"]
  too_many = processes.run([*args[:-2], "--num_envs=7", f"--output_dir={tmp_path}"],
                           tmp_path / "too_many", HANG_S, cwd=REPO)
  assert too_many.returncode != 0
  assert "--num_envs=7: give 1 to 6, the number of episodes" in too_many.stderr
  with processes.started(args, tmp_path / "crash", cwd=REPO) as run:
    workers = []

    def workers_started():  # The environment workers (not multiprocessing's resource tracker).
      children = pathlib.Path(f"/proc/{run.proc.pid}/task/{run.proc.pid}/children")
      pids = children.read_text().split() if children.exists() else []
      workers[:] = [int(p) for p in pids if "resource_tracker" not in
                    pathlib.Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
      return len(workers) == 2

    run.wait_for(workers_started, "two environment workers", HANG_S)
    os.kill(workers[0], 9)
    code = run.wait(HANG_S)
  assert code != 0
  assert re.search(r"running (reach|push)-v3 from seed 100000\d, died", run.stderr), run.stderr
  assert "finished episodes are in" in run.stderr and "wrote" not in run.stdout
  with open(tmp_path / "random_incomplete.json") as f:
    partial = json.load(f)
  assert partial["incomplete"] and partial["policy"] == "random"
  assert not (tmp_path / "random.json").exists()


@pytest.fixture(scope="module")
def mw_run(tmp_path_factory):
  """A 3-episode `reach-v3` dataset and a `metaworld_tiny` run of a few steps on it."""
  root = tmp_path_factory.mktemp("mw_run")
  data_dir, workdir = root / "data", root / "run"
  mwd.write_dataset(str(data_dir), TASK, episodes_per_task=3)
  config = twinbrain_configs.get_config("metaworld_tiny")
  mwd.write_tokenizer(str(root / "tokenizer"), config.model)
  args = [sys.executable, "scripts/train.py", "--config=configs/twinbrain.py:metaworld_tiny",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
          f"--config.init.tokenizer={root / 'tokenizer'}", "--config.data.batch_size=8",
          "--config.train.num_steps=4", "--config.checkpoint.every=4",
          "--config.train.log_every=2", "--config.checkpoint.async_save=False"]
  result = processes.run(args, root / "train_logs", HANG_S, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  return data_dir, workdir / "checkpoints"


def test_blind_preset_drops_the_instruction_in_training(mw_run):
  data_dir, _ = mw_run
  blind = twinbrain_configs.get_config("metaworld_tiny_blind")
  assert blind.data.drop_instruction and not twinbrain_configs.get_config(
      "metaworld_tiny").data.drop_instruction
  for drop in (False, True):
    config = small_config(str(data_dir), datasets=("metaworld",), weights=(1.0,),
                          image_size=(112, 112), drop_instruction=drop)
    batch = next(iter(DataPipeline(config).batches))
    expected = "" if drop else mw.INSTRUCTIONS[TASK]
    assert [str(i) for i in batch["instruction"]] == [expected] * len(batch["instruction"])


def test_served_policy_runs_closed_loop_and_matches_in_process(mw_run, tmp_path):
  _, checkpoints = mw_run
  serve = [sys.executable, "scripts/serve.py", "--host=127.0.0.1", "--port=0", "--max_batch=2",
           f"--checkpoint={checkpoints}"]
  evaluate = [sys.executable, "scripts/eval_metaworld.py", f"--tasks={TASK}", "--episodes=2",
              f"--max_steps={MAX_STEPS}", "--num_videos=1", "--replan_steps=4",
              "--ensemble=temporal", "--horizon=8"]
  with processes.started(serve, tmp_path / "server", cwd=REPO) as server:
    server.wait_for(lambda: "serving on ws://" in server.stdout, "the server listening", HANG_S)
    port = int(re.search(r"serving on ws://127\.0\.0\.1:(\d+)", server.stdout).group(1))
    # Two environments in worker processes, two connections served as one batch.
    served = processes.run([*evaluate, f"--server=127.0.0.1:{port}", "--label=served",
                            "--num_envs=2",
                            f"--output_dir={tmp_path}"], tmp_path / "eval_served", HANG_S,
                           cwd=REPO)
    server_log = server.stderr
  assert served.returncode == 0, served.stderr[-3000:]
  in_process = processes.run([*evaluate, f"--policy={checkpoints}", "--label=in_process",
                              f"--output_dir={tmp_path}"], tmp_path / "eval_local", HANG_S,
                             cwd=REPO)
  assert in_process.returncode == 0, in_process.stderr[-3000:]
  # What a user reads: the tables, not library INFO lines (orbax logs every load at INFO).
  for log in (server_log, served.stderr, in_process.stderr):
    assert not re.search(r"^I\d{4} ", log, re.M), log[:2000]
  assert "success" in in_process.stdout
  results = {}
  for label in ("served", "in_process"):
    with open(tmp_path / f"{label}.json") as f:
      results[label] = json.load(f)
    result = results[label]
    task = result["tasks"][TASK]
    assert task["episodes"] == 2 and task["seeds"] == list(mw.eval_seeds(2))
    for success, steps in zip(task["success_per_episode"], task["steps_per_episode"]):
      assert success or steps == MAX_STEPS  # Ran to an end.
    assert set(result["groups"]) == {"all"} and result["groups"]["all"]["episodes"] == 2
    assert result["settings"]["execution"] == dict(
        replan_steps=4, ensemble="temporal", horizon=8, temporal_k=0.01, adaptive_alpha=0.1)
    # The recorded episode renders every frame (reset included), the other one per request
    # (steps 0, 4, ...: the last one too, when the limit falls on a replanning step).
    steps = task["steps_per_episode"]
    assert result["frames_rendered"] == steps[0] + 1 + len(range(0, steps[1] + 1, 4))
    assert (tmp_path / f"{label}_success.png").stat().st_size > 0
    assert (tmp_path / f"{label}_videos" / f"{TASK}_seed{mw.EVAL_SEED_START}.gif").exists()
    assert "[all]" in (served if label == "served" else in_process).stdout
  # The same seeds through the socket in parallel and in this process one by one: the same
  # episodes (a batch of 2 rounds differently from a batch of 1 in the last bits: atol 1e-4).
  served_task, local_task = results["served"]["tasks"][TASK], results["in_process"]["tasks"][TASK]
  assert served_task["steps_per_episode"] == local_task["steps_per_episode"]
  assert served_task["success_per_episode"] == local_task["success_per_episode"]
  np.testing.assert_allclose(served_task["final_state_per_episode"],
                             local_task["final_state_per_episode"], atol=1e-4)
  with mw.make_env(TASK, 32) as env:
    start = env.reset(mw.EVAL_SEED_START, render=False).state
  assert not np.allclose(served_task["final_state_per_episode"][0], start, atol=1e-3)  # It moved.
