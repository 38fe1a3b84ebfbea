"""The reach-place family: one first frame, K goals given only in words (sim/instructed.py)."""

import dataclasses
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # Before mujoco is imported.

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from twinbrain_jax.data import oxe_registry, rlds  # noqa: E402
from twinbrain_jax.sim import evaluation, instructed  # noqa: E402
from twinbrain_jax.sim import metaworld as mw  # noqa: E402
from twinbrain_jax.sim import metaworld_dataset as mwd  # noqa: E402

FAMILY = instructed.REACH_PLACE
SEEDS = (0, 1, 2)


def test_groups_tasks_and_phrasings():
  seen, heldout = mw.resolve_tasks("reach-place"), mw.resolve_tasks("reach-place-heldout")
  assert len(seen) == len(heldout) == len(FAMILY.places) == 4
  assert not set(seen) & set(mw.MT50) and mw.resolve_tasks("mt50") == mw.MT50
  for task in seen:
    place = instructed.TASKS[task].place
    assert not set(place.seen) & set(place.heldout)  # Held-out phrasings are never seen ones.
    assert mw.instruction(task, 0) == place.seen[0]  # Canonical first; then they take turns.
    assert {mw.instruction(task, s) for s in range(6)} == set(place.seen)
    assert {mw.instruction(f"{task}-heldout", s) for s in range(4)} == set(place.heldout)
  with pytest.raises(mw.UnknownTaskError, match="did you mean reach-place-left"):
    mw.resolve_tasks("reach-place-lfet")


def test_first_frame_is_the_same_for_every_instruction_and_the_goal_is_hidden():
  frames = {}
  for task in mw.resolve_tasks("reach-place,reach-place-heldout"):
    with mw.make_env(task, 48) as env:
      frames[task] = [env.reset(seed).image for seed in SEEDS[:2]]
      sim = env.mujoco_env
      goals = [s for s in range(sim.model.nsite) if sim.model.site(s).name.startswith("goal")]
      assert goals and all(sim.model.site_rgba[s, 3] == 0 for s in goals)
  first = next(iter(frames.values()))
  for task, images in frames.items():
    for a, b in zip(images, first):
      np.testing.assert_array_equal(a, b, err_msg=task)
  assert not np.array_equal(first[0], first[1])  # The seed moves the puck: scenes differ.
  with mw.make_env("reach-v3", 48) as env:  # Meta-World's own scene shows its goal marker.
    assert not np.array_equal(env.reset(SEEDS[0]).image, first[0])


def test_expert_succeeds_and_success_is_the_named_place():
  for task in mw.resolve_tasks("reach-place"):
    with mw.make_env(task, 32) as env:
      expert = mw.expert_policy(task)
      for seed in SEEDS:
        episode = mw.rollout(env, lambda ts: expert(ts.raw), seed, render=False)
        assert episode.success, (task, seed)
        # Re-derived from MuJoCo: the tool centre (between the finger tips) is within 5 cm of
        # the place, which lies 15 cm from the puck, 7 cm above the table.
        data = env.mujoco_env.data
        tool = (data.site("rightEndEffector").xpos + data.site("leftEndEffector").xpos) / 2
        assert np.linalg.norm(tool - env.target) <= 0.05
        puck = data.body("obj").xpos
        np.testing.assert_allclose(np.linalg.norm((env.target - puck)[:2]), 0.15, atol=0.01)
        assert env.target[2] == pytest.approx(0.07)


def test_success_depends_on_the_instruction():
  seed = SEEDS[0]
  plans = {}
  for task in mw.resolve_tasks("reach-place"):
    with mw.make_env(task, 32) as env:
      expert = mw.expert_policy(task)
      plans[task] = mw.rollout(env, lambda ts: expert(ts.raw), seed, render=False)
  for task in plans:  # Another place's expert actions, replayed here: never a success.
    with mw.make_env(task, 32, max_steps=60) as env:
      for other, plan in plans.items():
        replay = mw.rollout(env, lambda ts: plan.actions[min(ts.step, len(plan) - 1)], seed,
                            render=False)
        assert replay.success == (other == task), (task, other)


def test_evaluation_gives_the_episode_its_phrasing():
  seen = []

  class Recording(evaluation.ExpertAgent):
    def reset(self, task, instruction, seed):
      seen.append((task, instruction, seed))
      super().reset(task, instruction, seed)

  result = evaluation.evaluate(Recording(), ["reach-place-front-heldout"], 2, image_size=32)
  assert result["tasks"]["reach-place-front-heldout"]["successes"] == 2
  assert seen == [(t, mw.instruction(t, s), s) for t, _, s in seen] and len(seen) == 2
  assert {i for _, i, _ in seen} <= set(FAMILY.places[2].heldout)


def test_heldout_phrasings_never_go_into_training_data(tmp_path):
  with pytest.raises(ValueError, match="held-out phrasings.*write reach-place-left instead"):
    mwd.write_dataset(str(tmp_path), "reach-place-left-heldout", episodes_per_task=1)
  with pytest.raises(ValueError, match="held-out"):
    mwd.write_dataset(str(tmp_path), "reach-place-heldout", episodes_per_task=1)
  assert not os.listdir(tmp_path)


def test_demonstrations_carry_each_episodes_seen_phrasing(tmp_path):
  task, seeds = "reach-place-left", mw.data_seeds(3)
  report = mwd.write_dataset(str(tmp_path), task, episodes_per_task=len(seeds), image_size=32)
  assert report.tasks[0].kept == len(seeds)
  spec = dataclasses.replace(oxe_registry.get_spec(mwd.NAME), image_shape=(32, 32))
  source = rlds.RldsDataset(rlds.resolve_dataset_dir(str(tmp_path), mwd.NAME), spec)
  phrasings = [source.episode(i).instruction(0) for i in range(len(source))]
  assert phrasings == [mw.instruction(task, s) for s in seeds]
  assert sorted(phrasings) == sorted(FAMILY.places[0].seen)  # Three seeds: each seen phrasing.
