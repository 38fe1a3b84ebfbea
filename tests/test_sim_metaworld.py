"""Meta-World adapter and demonstration dataset: the real simulator, rendered offscreen on CPU."""

import os

# Offscreen rendering without a display; must be set before mujoco is imported.
os.environ.setdefault("MUJOCO_GL", "egl")

import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from metaworld import env_dict  # noqa: E402
from metaworld.policies import ENV_POLICY_MAP  # noqa: E402

from tests.fixtures_data import small_config  # noqa: E402
from processes import run  # noqa: E402
from twinbrain_jax.data import normalization, oxe_registry, rlds  # noqa: E402
from twinbrain_jax.data.pipeline import DataPipeline  # noqa: E402
from twinbrain_jax.sim import metaworld as mw  # noqa: E402
from twinbrain_jax.sim import metaworld_dataset as mwd  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high")

REPO = pathlib.Path(__file__).resolve().parents[1]
# The registry entry reads 112x112 frames; rendering costs about the same at 32 px (per-frame
# overhead dominates), so the dataset tests use the registry's size.
SIZE = oxe_registry.get_spec(mwd.NAME).image_shape
TASK = "reach-v3"  # The shortest expert episodes (~45 steps).
SEEDS = (0, 1)


def _expert(env):
  expert = mw.expert_policy(env.task)
  return lambda ts: expert(ts.raw)


def test_task_lists_are_metaworlds_and_lerobots():
  assert set(mw.MT50) == set(env_dict.ALL_V3_ENVIRONMENTS) == set(ENV_POLICY_MAP)
  assert len(mw.MT50) == 50
  assert mw.MT10 == tuple(env_dict.MT10_V3)
  groups = list(mw.DIFFICULTY.values())
  assert [len(g) for g in groups] == [28, 11, 6, 5]
  assert sorted(t for g in groups for t in g) == sorted(mw.MT50)  # A partition of MT50.
  instructions = [mw.INSTRUCTIONS[t] for t in mw.MT50]
  assert all(i.strip() for i in instructions) and len(set(instructions)) == 50


def test_resolve_tasks_groups_suffixes_and_close_matches():
  assert mw.resolve_tasks("mt10") == mw.MT10
  assert mw.resolve_tasks("reach, pick-place-v3,reach-v3") == ("reach-v3", "pick-place-v3")
  assert mw.resolve_tasks(["very_hard"]) == mw.DIFFICULTY["very_hard"]
  assert len(mw.resolve_tasks("easy,medium,hard,very_hard")) == 50
  with pytest.raises(mw.UnknownTaskError, match="did you mean pick-place-v3"):
    mw.resolve_tasks("pick-plase")
  with pytest.raises(mw.UnknownTaskError, match="mt10"):
    mw.resolve_tasks("mt11")


def test_all_50_tasks_construct_reset_and_replay_exactly():
  for task in mw.MT50:
    with mw.make_env(task, 32, max_steps=15) as env:
      ts = env.reset(seed=0, render=False)
      assert env.instruction == mw.INSTRUCTIONS[task]
      assert ts.raw.shape == (39,) and ts.state.shape == (4,) and ts.image is None
      assert np.all(np.isfinite(ts.raw)), task
      # The dataset maker renders a replay of the expert's actions: it must be exact, also for
      # the policies that edit their input observation in place (door-open, door-close).
      expert = mw.rollout(env, _expert(env), seed=1, render=False)
      replay = mw.rollout(env, lambda ts: expert.actions[ts.step], seed=1, render=False)
      np.testing.assert_array_equal(replay.raws, expert.raws, err_msg=task)
  assert mw.make_env("reach-v3", 32).max_steps == 500  # Meta-World's max_path_length.


def test_state_is_the_hand_and_gripper_of_the_raw_observation():
  with mw.make_env("pick-place-v3", 32) as env:
    ts = env.reset(seed=3, render=False)
    openings = [ts.state[3]]
    for _ in range(15):  # Close the gripper: the opening must shrink.
      ts = env.step(np.array([0.0, 0.0, 0.0, 1.0]), render=False)
      assert ts.state.dtype == np.float32
      np.testing.assert_array_equal(ts.state, ts.raw[:4].astype(np.float32))
      # The hand position read straight from MuJoCo, not from the observation.
      np.testing.assert_allclose(ts.state[:3], env.mujoco_env.get_endeff_pos(), atol=1e-6)
      openings.append(ts.state[3])
  assert 0.0 <= min(openings) and max(openings) <= 1.0
  assert openings[-1] < openings[0] - 0.2, openings


def test_image_is_corner2_turned_upright():
  with mw.make_env("reach-v3", 48) as env:
    ts = env.reset(seed=0)
    raw = env.mujoco_env.render()  # Meta-World's own frame: corner2 renders rotated by 180°.
    assert ts.image.shape == (48, 48, 3) and ts.image.dtype == np.uint8
    np.testing.assert_array_equal(ts.image, np.rot90(raw, 2))
    # Upright means near things at the bottom: the camera looks down at the table, so the
    # depth buffer (larger = farther) must fall from the top rows to the bottom rows.
    depth = mw.upright(env.mujoco_env.mujoco_renderer.render("depth_array"))
    assert depth[:12].mean() > depth[-12:].mean() + 0.005
    np.testing.assert_array_equal(env.render(), ts.image)  # The depth pass changed nothing.


def test_action_is_clipped_and_bad_actions_are_refused():
  with mw.make_env("reach-v3", 32) as env:
    env.reset(seed=0, render=False)
    a = env.step(np.array([5.0, -5.0, 0.3, 2.0]), render=False)
    env.reset(seed=0, render=False)
    b = env.step(np.array([1.0, -1.0, 0.3, 1.0]), render=False)
    np.testing.assert_array_equal(a.raw, b.raw)  # Out-of-range actions act as clipped ones.
    with pytest.raises(ValueError, match="4 finite numbers"):
      env.step(np.array([0.0, 0.0, np.nan, 0.0]), render=False)
    with pytest.raises(ValueError, match="4 finite numbers"):
      env.step(np.zeros(3), render=False)


def test_episode_limit():
  with mw.make_env("reach-v3", 32, max_steps=5) as env:
    episode = mw.rollout(env, lambda ts: np.zeros(4), seed=0, render=False)
    assert len(episode) == 5 and not episode.success
    with pytest.raises(RuntimeError, match="reached its 5 steps"):
      env.step(np.zeros(4), render=False)
  with pytest.raises(ValueError, match="1..500"):
    mw.make_env("reach-v3", 32, max_steps=501)


def test_scripted_expert_succeeds():
  with mw.make_env("button-press-topdown-v3", 32) as env:
    for seed in mw.data_seeds(3):
      episode = mw.rollout(env, _expert(env), seed, render=False)
      assert episode.success, seed
      assert len(episode) < env.max_steps  # It stopped at its first success.
    # A policy that does nothing does not succeed: success is not trivially True.
    assert not mw.rollout(env, lambda ts: np.zeros(4), 0, render=False).success


def test_seeds_fix_the_scene_and_data_and_evaluation_seeds_are_disjoint():
  data, evaluation = mw.data_seeds(100), mw.eval_seeds(100)
  assert max(data) < mw.EVAL_SEED_START <= min(evaluation)
  mw.check_seeds_disjoint(data, evaluation)
  with pytest.raises(ValueError, match="evaluation seeds were used"):
    mw.check_seeds_disjoint(data + (mw.EVAL_SEED_START + 7,), evaluation)
  with pytest.raises(ValueError, match="Data seeds"):  # Data may never reach evaluation seeds.
    mw.data_seeds(10, offset=mw.EVAL_SEED_START - 5)
  with pytest.raises(ValueError, match="Evaluation seeds"):
    mw.eval_seeds(1, offset=-1)
  with mw.make_env("pick-place-v3", 32) as env:
    first = env.reset(seed=data[0], render=False).raw
    again = env.reset(seed=data[0], render=False).raw
    other = env.reset(seed=evaluation[0], render=False).raw
  np.testing.assert_array_equal(first, again)
  # Object (obs[4:7]) and goal (obs[36:39]) positions differ between seeds.
  assert np.abs(first[4:7] - other[4:7]).max() > 1e-3
  assert np.abs(first[36:39] - other[36:39]).max() > 1e-3


def test_unknown_task_names_close_matches():
  with pytest.raises(mw.UnknownTaskError, match="did you mean door-open-v3"):
    mw.make_env("door-opne", 32)
  with pytest.raises(mw.UnknownTaskError, match="names 10 tasks"):
    mw.make_env("mt10", 32)
  with pytest.raises(mw.UnknownTaskError, match="one task"):
    mw.expert_policy("reach,push")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """A tiny `metaworld` dataset, and the same expert episodes re-run independently."""
  data_dir = str(tmp_path_factory.mktemp("mw"))
  report = mwd.write_dataset(data_dir, TASK, episodes_per_task=len(SEEDS), image_size=SIZE)
  with mw.make_env(TASK, SIZE) as env:
    expected = [mwd.expert_episode(env, seed) for seed in SEEDS]
  return data_dir, report, expected


def test_dataset_reads_back_exactly_what_the_expert_did(dataset):
  data_dir, report, expected = dataset
  path = rlds.resolve_dataset_dir(data_dir, mwd.NAME)
  assert report.path == path and [t.kept for t in report.tasks] == [len(SEEDS)]
  stored = mwd.read_report(path)
  assert stored["tasks"][0]["success_rate"] == 1.0 and stored["tasks"][0]["dropped"] == 0
  assert stored["tasks"][0]["seeds_kept"] == list(SEEDS)
  source = rlds.RldsDataset(path, oxe_registry.get_spec(mwd.NAME))
  assert len(source) == len(SEEDS)
  for index, (rollout, actions) in enumerate(expected):
    episode = source.episode(index)
    assert episode.episode_id == f"{TASK}/seed_{SEEDS[index]}"
    assert len(episode) == len(rollout)
    lowdim = episode.lowdim()
    np.testing.assert_array_equal(lowdim["observation/state"], rollout.states)
    np.testing.assert_array_equal(lowdim["action"], actions)
    np.testing.assert_array_equal(actions, rollout.actions)  # No noise: labels = executed.
    for t in (0, len(rollout) // 2, len(rollout) - 1):
      np.testing.assert_array_equal(episode.image(t, "image"), rollout.images[t])  # PNG: exact.
    assert episode.instruction(0) == mw.INSTRUCTIONS[TASK]
  # The last step is the first successful one, and terminal.
  raw = source._source[0]["steps"]  # pylint: disable=protected-access
  flags = [(bool(s["is_first"]), bool(s["is_last"]), bool(s["is_terminal"])) for s in raw]
  assert flags[0] == (True, False, False) and flags[-1] == (False, True, True)


def test_worker_processes_write_the_same_dataset(dataset, tmp_path):
  data_dir, _, expected = dataset
  tasks = [TASK, "button-press-v3"]
  report = mwd.write_dataset(str(tmp_path), tasks, episodes_per_task=len(SEEDS), image_size=SIZE,
                             num_workers=2)
  assert [t.task for t in report.tasks] == tasks and [t.kept for t in report.tasks] == [len(SEEDS)] * 2
  spec = oxe_registry.get_spec(mwd.NAME)
  parallel = rlds.RldsDataset(rlds.resolve_dataset_dir(str(tmp_path), mwd.NAME), spec)
  assert [parallel.episode(i).episode_id for i in range(len(parallel))] == [
      f"{task}/seed_{seed}" for task in tasks for seed in SEEDS]  # Task order, seed order.
  for index, (rollout, actions) in enumerate(expected):  # The first task's: as in one process.
    episode = parallel.episode(index)
    np.testing.assert_array_equal(episode.lowdim()["action"], actions)
    np.testing.assert_array_equal(episode.image(len(rollout) - 1, "image"), rollout.images[-1])
  with pytest.raises(ValueError, match="num_workers"):
    mwd.write_dataset(str(tmp_path / "bad"), TASK, num_workers=-1)


def test_pipeline_samples_equal_the_recorded_steps(dataset):
  data_dir, _, expected = dataset
  config = small_config(data_dir, datasets=(mwd.NAME,), weights=(1.0,), image_size=SIZE,
                        num_epochs=1, shuffle=False)
  pipe = DataPipeline(config, train=False)
  stats = pipe.norm_stats[mwd.NAME]
  assert len(pipe.samples) == sum(len(r) for r, _ in expected)
  horizon = config.action_horizon
  for i in range(0, len(pipe.samples), 7):
    sample = pipe.samples[i]
    rollout, actions = expected[int(sample["episode_index"])]
    t = int(sample["step_index"])
    np.testing.assert_array_equal(sample["image"], rollout.images[t])
    assert sample["instruction"] == mw.INSTRUCTIONS[TASK]
    real = actions[t:t + horizon]
    assert sample["action_mask"].sum() == len(real)
    # Actions are not normalised (already in [-1, 1]); the state is (q01..q99 -> [-1, 1]).
    np.testing.assert_array_equal(sample["actions"][:len(real)], real)
    np.testing.assert_allclose(
        sample["state"], normalization.normalize(rollout.states[t], stats.state, (True,) * 4),
        atol=1e-6)


def test_action_noise_changes_what_runs_not_the_labels():
  with mw.make_env(TASK, 32) as env:
    rollout, actions = mwd.expert_episode(env, seed=4, action_noise=0.3)
    expert = mw.expert_policy(TASK)
  assert not np.allclose(rollout.actions, actions)  # Executed: expert + noise.
  np.testing.assert_array_equal(actions, np.stack([expert(r) for r in rollout.raws]))
  assert np.abs(actions).max() <= 1.0 and np.abs(rollout.actions).max() <= 1.0


def test_write_never_damages_an_existing_dataset(dataset, tmp_path):
  data_dir, _, _ = dataset
  path = rlds.resolve_dataset_dir(data_dir, mwd.NAME)
  before = {p.name: p.read_bytes() for p in pathlib.Path(path).iterdir()}
  with pytest.raises(FileExistsError, match="overwrite"):
    mwd.write_dataset(data_dir, TASK, episodes_per_task=1, image_size=SIZE)
  # A replacement that fails (no expert can succeed in 2 steps) leaves the old one in place.
  with pytest.raises(RuntimeError, match="No expert episode succeeded"):
    mwd.write_dataset(data_dir, TASK, episodes_per_task=1, image_size=SIZE, max_steps=2,
                      overwrite=True)
  assert {p.name: p.read_bytes() for p in pathlib.Path(path).iterdir()} == before
  assert sorted(os.listdir(data_dir)) == [mwd.NAME]  # No temporary directory left behind.


def test_script_prints_the_table_and_fails_cleanly(tmp_path):
  script = [sys.executable, "scripts/make_metaworld_dataset.py", f"--data_dir={tmp_path}"]
  done = run([*script, f"--tasks={TASK}", "--episodes_per_task=1", "--image_size=32"],
             tmp_path / "log1", cwd=REPO)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"{TASK} " in done.stdout and "100.0%" in done.stdout
  assert "wrote 1 episodes" in done.stdout and "registry entry 'metaworld' reads" in done.stdout
  report = json.loads((tmp_path / mwd.NAME / mwd.VERSION / mwd.REPORT_FILE).read_text())
  assert report["image_size"] == [32, 32] and report["tasks"][0]["kept"] == 1
  failed = run([*script, "--tasks=reach,pick-plase"], tmp_path / "log2", cwd=REPO)
  assert failed.returncode != 0
  assert "did you mean pick-place-v3" in failed.stderr and "wrote" not in failed.stdout
