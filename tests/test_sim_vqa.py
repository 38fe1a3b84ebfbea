"""The Meta-World VQA corpus: answers re-derived from MuJoCo, splits, the dataset (sim/vqa*.py)."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # Before mujoco is imported.

import dataclasses  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import mujoco  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from processes import run  # noqa: E402
from twinbrain_jax.data import oxe_registry, rlds  # noqa: E402
from twinbrain_jax.sim import metaworld as mw  # noqa: E402
from twinbrain_jax.sim import vqa  # noqa: E402
from twinbrain_jax.sim import vqa_dataset as vd  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high")

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 64
GRIPPER_BODIES = ("rightpad", "leftpad", "rightclaw", "leftclaw")


def _replay(env, seed, step):
  """The env `step` expert actions after reset(seed), replayed here (not by sim/vqa.py)."""
  expert = mw.expert_policy(env.task)
  ts = env.reset(seed, render=False)
  for _ in range(step):
    ts = env.step(expert(ts.raw), render=False)
  return ts


def _geoms(model, name):
  """Geoms of the named thing: the gripper's finger bodies, or those whose top-level ancestor
  (MuJoCo's body_rootid) is the thing's body."""
  if name[0] == "gripper":
    bodies = {model.body(b).id for b in GRIPPER_BODIES}
    return [g for g in range(model.ngeom) if model.geom_bodyid[g] in bodies]
  root = model.body(vqa.OBJECTS[mw.base_task(name[1])][name[0]]).id
  return [g for g in range(model.ngeom) if model.body_rootid[model.geom_bodyid[g]] == root]


RELATIONS = {
    "left_right": r"Is the (.+) to the left or to the right of the (.+)\?",
    "front_behind": r"Is the (.+) in front of or behind the (.+)\?",
    "above_below": r"Is the (.+) above or below the (.+)\?",
    "nearer": r"Which is nearer to the gripper, the (.+) or the (.+)\?",
}


def _things(qa):
  """The two things a relation question names, in order."""
  return re.fullmatch(RELATIONS[qa.question_type], qa.question).groups()


def _view(env):
  """Geom ids `[H, W]` (-1: none) and depth `[H, W]` (m) of the upright frame, rendered here
  with MuJoCo's own renderer (not the env's)."""
  sim = env.mujoco_env
  try:
    with mujoco.Renderer(sim.model, SIZE, SIZE) as renderer:
      renderer.update_scene(sim.data, camera=mw.CAMERA)
      renderer.enable_segmentation_rendering()
      labels = renderer.render()
      renderer.disable_segmentation_rendering()
      renderer.enable_depth_rendering()
      depth = renderer.render()
  finally:  # The env's renderer draws in its own GL context: make it current again.
    viewer = sim.mujoco_renderer._get_viewer("rgb_array")  # pylint: disable=protected-access
    viewer.make_context_current()
  geoms = np.where(labels[..., 1] == mujoco.mjtObj.mjOBJ_GEOM, labels[..., 0], -1)
  return mw.upright(geoms), mw.upright(depth)


@pytest.mark.parametrize("task", ["drawer-open-v3", "hammer-v3", "coffee-push-v3",
                                  "faucet-close-v3", "reach-place-back"])
def test_answers_equal_the_simulators_state(task):
  checked = {}
  with mw.make_env(task, SIZE) as env:
    for seed in (0, 1):
      for scene in vqa.scenes(env, seed, 3):
        state = scene.state
        questions = vqa.ask(state, "all", np.random.default_rng([seed, state.step]))
        ts = _replay(env, seed, state.step)
        model, data = env.mujoco_env.model, env.mujoco_env.data
        np.testing.assert_array_equal(scene.image, env.render())  # The scene is this state.
        segmentation, depth = _view(env)
        for qa in questions:
          checked[qa.question_type] = checked.get(qa.question_type, 0) + 1
          if qa.question_type == "task":
            assert qa.answer == mw.INSTRUCTIONS[task] and task in mw.MT50
          elif qa.question_type == "instruction":
            phrase = qa.question.split('"')[1]
            assert mw.instruction(task, 0) == qa.answer  # The canonical instruction.
            assert phrase != qa.answer and (phrase in vqa.PARAPHRASES.get(task, ()) or any(
                phrase in (mw.instruction(t, s) for s in range(3)) for t in
                (task, f"{task}-heldout")))
          elif qa.question_type == "gripper":
            fingers = np.linalg.norm(data.body("rightclaw").xpos - data.body("leftclaw").xpos)
            assert (qa.answer == "yes") == (fingers / 0.1 >= 0.8), fingers
            assert fingers / 0.1 >= 0.8 or fingers / 0.1 <= 0.5  # Not asked in between.
          elif qa.question_type == "open":
            joint = {"drawer": "goal_slidey", "faucet": "knob_Joint_1"}[qa.question.split()[2]]
            q = float(data.joint(joint).qpos[0])
            # Drawer: 0 closed .. -0.16 m open; faucet: turned toward -pi/2 is closed.
            is_open = q <= -0.06 if joint == "goal_slidey" else q >= 0.5
            assert (qa.answer == "yes") == is_open, q
          else:
            a, b = _things(qa)
            centre = {n: np.mean(data.geom_xpos[_geoms(model, (n, task))], axis=0) if n != "gripper"
                      else (data.site("rightEndEffector").xpos
                            + data.site("leftEndEffector").xpos) / 2 for n in (a, b)}
            if qa.question_type == "above_below":
              assert (qa.answer == "above") == (centre[a][2] > centre[b][2])
            elif qa.question_type == "nearer":
              tool = (data.site("rightEndEffector").xpos + data.site("leftEndEffector").xpos) / 2
              far = {n: np.linalg.norm(centre[n] - tool) for n in (a, b)}
              assert qa.answer == min(far, key=far.get)
            else:  # Where the things' pixels are in the frame MuJoCo renders.
              pixels = {n: np.isin(segmentation, _geoms(model, (n, task))) for n in (a, b)}
              if min(p.sum() for p in pixels.values()) < 3:
                continue  # Hidden behind something: the pixels cannot tell.
              checked["by pixels"] = checked.get("by pixels", 0) + 1
              if qa.question_type == "left_right":
                x = {n: np.nonzero(p)[1].mean() for n, p in pixels.items()}
                assert (qa.answer == "right") == (x[a] > x[b]), (qa, x)
              else:
                d = {n: np.median(depth[p]) for n, p in pixels.items()}
                assert (qa.answer == "behind") == (d[a] > d[b]), (qa, d)
  assert checked.get("instruction") and (checked.get("task") or task not in mw.MT50)
  assert sum(checked.values()) >= 10 and checked.get("by pixels", 0) >= 2, checked


def test_relations_are_asked_only_beyond_their_margins():
  positions = {"gripper": np.array([0.0, 0.6, 0.1]), "puck": np.array([0.0, 0.6, 0.13])}
  state = vqa.SceneState(task="push-v3", seed=0, step=0, positions=positions,
                         image_x={"gripper": 0.50, "puck": 0.55},
                         depth={"gripper": 1.0, "puck": 1.2}, gripper_opening=0.65, joints={},
                         state=np.zeros(4, np.float32))
  rng = np.random.default_rng(0)
  assert vqa.ask_left_right(state, rng) is None  # 0.05 of the width < the 0.08 margin.
  assert vqa.ask_above_below(state, rng) is None  # 3 cm < 5 cm.
  assert vqa.ask_gripper(state, rng) is None  # 0.65: neither open nor closed.
  qa = vqa.ask_front_behind(state, rng)
  assert qa.answer == ("behind" if qa.question.startswith("Is the puck") else "in front")


def test_balance_equalises_binary_answers():
  scene = None
  examples = [(scene, vqa.QA("gripper", "Is the gripper open?", a, ("yes", "no")))
              for a in ["yes"] * 7 + ["no"] * 3]
  examples += [(scene, vqa.QA("task", "?", "Open a drawer"))] * 4
  kept, dropped = vqa.balance(examples, seed=1)
  answers = [qa.answer for _, qa in kept if qa.question_type == "gripper"]
  assert sorted(answers) == ["no"] * 3 + ["yes"] * 3 and dropped == {"gripper": 4}
  assert sum(qa.question_type == "task" for _, qa in kept) == 4  # Open answers are kept.


def test_unknown_question_type_names_the_known_ones():
  assert vqa.resolve_question_types("open, gripper,open") == ("open", "gripper")
  assert vqa.resolve_question_types(None) == tuple(vqa.QUESTION_TYPES)
  with pytest.raises(vqa.UnknownQuestionTypeError, match="did you mean left_right.*known: task"):
    vqa.resolve_question_types("left_rigth")
  with pytest.raises(vqa.UnknownQuestionTypeError, match="No question type"):
    vqa.resolve_question_types(" , ")


def test_train_and_heldout_scene_seeds_are_disjoint():
  train, heldout = vqa.scene_seeds(vqa.TRAIN, 500), vqa.scene_seeds(vqa.HELDOUT, 500)
  assert max(train) < mw.EVAL_SEED_START <= min(heldout)
  mw.check_seeds_disjoint(train, heldout)
  with pytest.raises(ValueError, match="Unknown split 'test'"):
    vqa.scene_seeds("test", 1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("vqa"))
  report = vd.write_dataset(data_dir, "drawer-close,reach-place-left", train_seeds=2,
                            heldout_seeds=1, frames_per_seed=2, image_size=SIZE)
  return data_dir, report


def test_dataset_reads_back_through_the_rlds_reader(dataset):
  data_dir, report = dataset
  path = rlds.resolve_dataset_dir(data_dir, vd.NAME)
  assert report["path"] == path and vd.read_report(path)["examples"] == report["examples"]
  spec = dataclasses.replace(oxe_registry.get_spec(vd.NAME), image_shape=(SIZE, SIZE))
  for split in vqa.SPLITS:
    source = rlds.RldsDataset(path, spec, split=split)
    assert len(source) == report["scenes"][split] and report["examples"][split] > 0
    steps = 0
    for index in range(len(source)):
      episode = source.episode(index)
      raw = source._source[index]  # pylint: disable=protected-access
      meta = {k: raw["episode_metadata"][k] for k in ("task", "seed", "step", "split")}
      task, seed, step = meta["task"].decode(), int(meta["seed"]), int(meta["step"])
      assert meta["split"].decode() == split
      assert (seed < mw.EVAL_SEED_START) == (split == vqa.TRAIN)
      with mw.make_env(task, SIZE) as env:  # The scene, regenerated: the same frame and state.
        scene = next(s for s in vqa.scenes(env, seed, 2) if s.state.step == step)
      np.testing.assert_array_equal(episode.image(0, "image"), scene.image)
      np.testing.assert_array_equal(episode.lowdim()["observation/state"][0], scene.state.state)
      asked = {qa.question: qa for qa in vqa.ask(scene.state, "all", np.random.default_rng(
          [seed, step, 11]))}
      for t in range(len(episode)):
        qa = asked[episode.instruction(t)]  # The question is the registry's language key.
        assert episode.text(t, "answer") == qa.answer
        assert episode.text(t, "question_type") == qa.question_type
        assert episode.text(t, "choices") == "|".join(qa.choices)
      steps += len(episode)
    assert steps == report["examples"][split]
  for split, answers in report["answers"].items():  # Binary types are balanced.
    for name, by_answer in answers.items():
      if vqa.QUESTION_TYPES[name].answers is not None:
        assert len(set(by_answer.values())) == 1 and len(by_answer) == 2, (split, name, by_answer)


def test_write_never_damages_an_existing_dataset(dataset):
  data_dir, _ = dataset
  path = pathlib.Path(rlds.resolve_dataset_dir(data_dir, vd.NAME))
  before = {p.name: p.read_bytes() for p in path.iterdir()}
  with pytest.raises(FileExistsError, match="overwrite"):
    vd.write_dataset(data_dir, "drawer-close", train_seeds=1, heldout_seeds=1, image_size=SIZE)
  with pytest.raises(RuntimeError, match="No question of types open"):  # reach has no joints.
    vd.write_dataset(data_dir, "reach-place-left", train_seeds=1, heldout_seeds=1,
                     question_types="open", image_size=SIZE, overwrite=True)
  assert {p.name: p.read_bytes() for p in path.iterdir()} == before
  assert sorted(os.listdir(data_dir)) == [vd.NAME]  # No temporary directory left behind.


def test_script_fails_cleanly_on_bad_input(tmp_path):
  script = [sys.executable, "scripts/make_vqa_dataset.py", f"--data_dir={tmp_path}"]
  for flag, message in (("--question_types=left_rigth", "did you mean left_right"),
                        ("--tasks=reach-plase", "Unknown Meta-World task"),
                        ("--frames_per_seed=0", "frames_per_seed")):
    done = run([*script, flag], tmp_path / "log", cwd=REPO)
    assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
    assert "wrote" not in done.stdout
  assert not any(tmp_path.glob(f"{vd.NAME}*"))


def test_every_mt50_scene_has_its_things_and_questions():
  assert set(vqa.PARAPHRASES) == set(vqa.OBJECTS) == set(mw.MT50)
  for task in mw.MT50:
    paraphrases = vqa.PARAPHRASES[task]
    assert len(set(paraphrases)) == 3 and mw.INSTRUCTIONS[task] not in paraphrases
    with mw.make_env(task, 32) as env:
      ts = env.reset(0, render=False)
      state = vqa.scene_state(env, 0, 0, ts)  # Every named body and joint exists in the scene.
      for name, position in state.positions.items():  # On or above the table, in the frame.
        assert np.all(np.isfinite(position)) and -0.05 < position[2] < 0.5, (task, name)
        assert 0.0 < state.image_x[name] < 1.0 and state.depth[name] > 0, (task, name)
      questions = vqa.ask(state, "all", np.random.default_rng(0))
      assert {"task", "instruction"} <= {qa.question_type for qa in questions}, task
      if task in vqa.ARTICULATIONS:
        assert vqa.ARTICULATIONS[task].joint in state.joints


def test_accuracy_plot_takes_types_answered_all_right_or_all_wrong(tmp_path):
  """A type of n/n (0/n) has its estimate on the interval's bound: no error bar may go negative
  (matplotlib refuses it)."""
  from twinbrain_jax.sim import vqa_evaluation  # pylint: disable=g-import-not-at-top
  per_type = dict(left_right=vqa_evaluation.accuracy([True] * 2594),
                  task=vqa_evaluation.accuracy([False] * 500),
                  all=vqa_evaluation.accuracy([True] * 2594 + [False] * 46))
  assert per_type["left_right"]["ci95"][1] == per_type["left_right"]["accuracy"] == 1.0
  assert per_type["task"]["ci95"][0] == per_type["task"]["accuracy"] == 0.0
  path = tmp_path / "vqa.png"
  vqa_evaluation.plot_accuracy({"left": dict(per_type=per_type), "right": dict(per_type=per_type)},
                               str(path), "two brains")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
