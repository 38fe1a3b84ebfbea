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
  serve = [sys.executable, "scripts/serve.py", "--host=127.0.0.1", "--port=0", "--max_batch=1",
           f"--checkpoint={checkpoints}"]
  evaluate = [sys.executable, "scripts/eval_metaworld.py", f"--tasks={TASK}", "--episodes=1",
              f"--max_steps={MAX_STEPS}", "--num_videos=1", "--replan_steps=4",
              "--ensemble=temporal", "--horizon=8"]
  with processes.started(serve, tmp_path / "server", cwd=REPO) as server:
    server.wait_for(lambda: "serving on ws://" in server.stdout, "the server listening", HANG_S)
    port = int(re.search(r"serving on ws://127\.0\.0\.1:(\d+)", server.stdout).group(1))
    served = processes.run([*evaluate, f"--server=127.0.0.1:{port}", "--label=served",
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
    assert task["episodes"] == 1 and task["seeds"] == [mw.EVAL_SEED_START]
    assert task["successes"] + (task["steps_per_episode"] == [MAX_STEPS]) == 1  # Ran to an end.
    assert set(result["groups"]) == {"all"} and result["groups"]["all"]["episodes"] == 1
    assert result["settings"]["execution"] == dict(
        replan_steps=4, ensemble="temporal", horizon=8, temporal_k=0.01, adaptive_alpha=0.1)
    # The recorded episode renders every frame (reset included).
    assert result["frames_rendered"] == task["steps_per_episode"][0] + 1
    assert (tmp_path / f"{label}_success.png").stat().st_size > 0
    assert (tmp_path / f"{label}_videos" / f"{TASK}_seed{mw.EVAL_SEED_START}.gif").exists()
    assert "[all]" in (served if label == "served" else in_process).stdout
  # The same seeds through the socket and in this process: the same episode.
  served_task, local_task = results["served"]["tasks"][TASK], results["in_process"]["tasks"][TASK]
  assert served_task["steps_per_episode"] == local_task["steps_per_episode"]
  np.testing.assert_allclose(served_task["final_state_per_episode"],
                             local_task["final_state_per_episode"], atol=1e-5)
  with mw.make_env(TASK, 32) as env:
    start = env.reset(mw.EVAL_SEED_START, render=False).state
  assert not np.allclose(served_task["final_state_per_episode"][0], start, atol=1e-3)  # It moved.
