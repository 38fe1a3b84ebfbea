"""Questions about Meta-World scenes, every answer read from the simulator's state (a VQA corpus).

A scene is one rendered frame of a task from a seed, after the scripted expert has run some steps
(`scenes`): step 0 is the first frame; later steps vary what is open, where the gripper is and
whether it is closed. From the scene's MuJoCo state (`SceneState`) each question type asks at
most one question, or none where the answer would be ambiguous:

  type          question (one of a few templates)                         answer
  task          What task is this scene set up for?                       the task's instruction
  instruction   Which task does the instruction "<paraphrase>" describe?  the canonical instruction
  left_right    Is the <a> to the left or to the right of the <b>?        left | right
  front_behind  Is the <a> in front of or behind the <b>?                 in front | behind
  above_below   Is the <a> above or below the <b>?                        above | below
  open          Is the <drawer|window|door|faucet> open?                  yes | no
  gripper       Is the gripper open?                                      yes | no
  nearer        Which is nearer to the gripper, the <a> or the <b>?       <a> | <b>

<a>, <b> are the gripper or the scene's named objects (`OBJECTS`). Left/right are the upright
frame's (`mw.project`), in front / behind mean nearer to / farther from the camera, above /
below are world heights. Margins keep answers unambiguous (`MARGINS`); a pair closer than the
margin is not asked about. `task` is not asked about a family scene (`sim/instructed.py`), whose
frame does not tell its instruction; `instruction` asks about every phrasing of the scene's task,
held-out phrasings of a family included (they appear nowhere else in training data).

Question types are data: `QUESTION_TYPES` maps a name to a generator `(state, rng) -> QA | None`
and its closed answer set (None for open answers); `resolve_question_types` names the known
types when given an unknown one. Scene seeds come from `mw.data_seeds` for the train split and
`mw.eval_seeds` for the held-out split, so the two never share a scene.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from twinbrain_jax.sim import instructed
from twinbrain_jax.sim import metaworld as mw

TRAIN, HELDOUT = "train", "heldout"
SPLITS = (TRAIN, HELDOUT)

# Three paraphrases of every MT50 instruction (`mw.INSTRUCTIONS`): the `instruction` questions.
PARAPHRASES: dict[str, tuple[str, ...]] = {
    "assembly-v3": ("Put the nut onto the peg", "Lift the nut and fit it over the peg",
                    "Grab the nut and drop it on the peg"),
    "basketball-v3": ("Put the ball into the basket", "Pick up the ball and dunk it",
                      "Score the ball in the hoop"),
    "bin-picking-v3": ("Move the puck from one bin to the other", "Carry the puck to the other bin",
                       "Pick the puck out of its bin and put it in the second bin"),
    "box-close-v3": ("Put the lid on the box", "Close the box with its cover",
                     "Pick up the lid and cover the box"),
    "button-press-topdown-v3": ("Push the button down from above", "Press the button from the top",
                                "Press down on the top of the button"),
    "button-press-topdown-wall-v3": ("Reach over the wall and press the button from above",
                                     "Get past the wall and push the button down from the top",
                                     "Avoid the wall and press the button downwards"),
    "button-press-v3": ("Push the button", "Press the button in", "Push the button forward"),
    "button-press-wall-v3": ("Get around the wall and push the button",
                             "Avoid the wall and press the button",
                             "Go past the wall to press the button in"),
    "coffee-button-v3": ("Press the coffee machine's button", "Push the button of the coffee maker",
                         "Start the coffee machine with its button"),
    "coffee-pull-v3": ("Take the mug out from the coffee machine",
                       "Pull the mug away from the coffee maker",
                       "Drag the mug out of the coffee machine"),
    "coffee-push-v3": ("Slide the mug under the coffee machine",
                       "Push the mug beneath the coffee maker",
                       "Move the mug under the spout of the coffee machine"),
    "dial-turn-v3": ("Turn the dial half a turn", "Spin the dial by 180 degrees",
                     "Rotate the knob around halfway"),
    "disassemble-v3": ("Take the nut off the peg", "Lift the nut off the peg",
                       "Remove the nut from the peg"),
    "door-close-v3": ("Shut the door", "Swing the door closed", "Push the door shut"),
    "door-lock-v3": ("Turn the lock clockwise to lock the door", "Lock the door",
                     "Rotate the door lock clockwise"),
    "door-open-v3": ("Swing the door open", "Pull the door open", "Open the door on its hinge"),
    "door-unlock-v3": ("Turn the lock counter-clockwise to unlock the door", "Unlock the door",
                       "Rotate the door lock counter-clockwise"),
    "drawer-close-v3": ("Shut the drawer", "Push the drawer closed", "Close the drawer"),
    "drawer-open-v3": ("Pull the drawer open", "Pull out the drawer", "Slide the drawer open"),
    "faucet-close-v3": ("Turn the faucet clockwise", "Close the faucet",
                        "Rotate the tap handle clockwise"),
    "faucet-open-v3": ("Turn the faucet counter-clockwise", "Open the faucet",
                       "Rotate the tap handle counter-clockwise"),
    "hammer-v3": ("Drive the nail into the wall with the hammer", "Use the hammer on the nail",
                  "Pick up the hammer and hit the nail"),
    "hand-insert-v3": ("Put the gripper into the hole", "Push the hand down into the hole",
                       "Move the gripper into the opening"),
    "handle-press-side-v3": ("Push the handle down from the side", "Press down the side handle",
                             "Press the handle down, reaching from the side"),
    "handle-press-v3": ("Push the handle down", "Press down on the handle",
                        "Move the handle downwards"),
    "handle-pull-side-v3": ("Lift the handle up from the side", "Pull up the side handle",
                            "Pull the handle upwards, reaching from the side"),
    "handle-pull-v3": ("Lift the handle up", "Pull up on the handle", "Move the handle upwards"),
    "lever-pull-v3": ("Pull the lever down a quarter turn", "Rotate the lever down by 90 degrees",
                      "Pull down the lever"),
    "peg-insert-side-v3": ("Push the peg into the hole from the side",
                           "Insert the peg into the side hole",
                           "Slide the peg sideways into the box"),
    "peg-unplug-side-v3": ("Pull the peg out sideways", "Unplug the peg from the side",
                           "Take the peg out of the box sideways"),
    "pick-out-of-hole-v3": ("Lift the puck out of the hole", "Take the puck out of the hole",
                            "Pick the puck up from inside the hole"),
    "pick-place-v3": ("Pick up the puck and put it at the goal",
                      "Move the puck to the goal by lifting it", "Carry the puck to the goal"),
    "pick-place-wall-v3": ("Pick up the puck, go over the wall and put it down",
                           "Lift the puck past the wall and place it",
                           "Carry the puck over the wall to its goal"),
    "plate-slide-back-side-v3": ("Slide the plate out of the cabinet sideways",
                                 "Take the plate back out of the cabinet from the side",
                                 "Pull the plate sideways out of the cabinet"),
    "plate-slide-back-v3": ("Slide the plate out of the cabinet",
                            "Pull the plate out of the cabinet",
                            "Take the plate back out of the cabinet"),
    "plate-slide-side-v3": ("Slide the plate sideways into the cabinet",
                            "Push the plate into the cabinet from the side",
                            "Move the plate sideways into the cabinet"),
    "plate-slide-v3": ("Slide the plate into the cabinet", "Push the plate into the cabinet",
                       "Move the plate into the cabinet"),
    "push-back-v3": ("Push the puck backwards to the goal", "Slide the puck back to its goal",
                     "Move the puck back toward the goal by pushing it"),
    "push-v3": ("Slide the puck to the goal", "Push the puck over to the goal",
                "Move the puck to the goal by pushing it"),
    "push-wall-v3": ("Push the puck around the wall to the goal",
                     "Avoid the wall and slide the puck to the goal",
                     "Get past the wall and push the puck to its goal"),
    "reach-v3": ("Move the gripper to the goal", "Reach the target position",
                 "Bring the hand to the goal"),
    "reach-wall-v3": ("Reach over the wall to the goal", "Avoid the wall and reach the target",
                      "Get past the wall and move the gripper to the goal"),
    "shelf-place-v3": ("Put the puck on the shelf", "Pick up the puck and place it on the shelf",
                       "Move the puck onto the shelf"),
    "soccer-v3": ("Kick the ball into the goal", "Push the soccer ball into the net",
                  "Score a goal with the ball"),
    "stick-pull-v3": ("Pick up the stick and pull the box with it", "Use the stick to drag the box",
                      "Grab the stick and pull the box toward you"),
    "stick-push-v3": ("Pick up the stick and push the box with it",
                      "Use the stick to shove the box",
                      "Grab the stick and push the box away"),
    "sweep-into-v3": ("Sweep the puck into the hole", "Push the puck into the hole",
                      "Slide the puck into the hole"),
    "sweep-v3": ("Sweep the puck off the table", "Push the puck off the table",
                 "Slide the puck off the edge of the table"),
    "window-close-v3": ("Slide the window shut", "Close the window", "Push the window closed"),
    "window-open-v3": ("Slide the window open", "Open the window", "Push the window open"),
}

# The named things of each scene: what the questions call them -> the top-level MuJoCo body
# whose geoms (the body and its children) make them; a thing's position is the mean of its geoms'
# centres. A family task's scene is its base task's.
OBJECTS: dict[str, dict[str, str]] = {
    "assembly-v3": {"nut": "RoundNut", "peg": "peg"},
    "basketball-v3": {"ball": "bsktball", "basket": "basket_goal"},
    "bin-picking-v3": {"puck": "obj"},
    "box-close-v3": {"lid": "boxbodytop", "box": "boxbody"},
    "button-press-topdown-v3": {"button box": "box"},
    "button-press-topdown-wall-v3": {"button box": "box", "wall": "wall"},
    "button-press-v3": {"button box": "box"},
    "button-press-wall-v3": {"button box": "box", "wall": "wall"},
    "coffee-button-v3": {"mug": "obj", "coffee machine": "coffee_machine"},
    "coffee-pull-v3": {"mug": "obj", "coffee machine": "coffee_machine"},
    "coffee-push-v3": {"mug": "obj", "coffee machine": "coffee_machine"},
    "dial-turn-v3": {"dial": "dial"},
    "disassemble-v3": {"nut": "RoundNut", "peg": "peg"},
    "door-close-v3": {"door": "door"},
    "door-lock-v3": {"door": "door"},
    "door-open-v3": {"door": "door"},
    "door-unlock-v3": {"door": "door"},
    "drawer-close-v3": {"drawer": "drawer"},
    "drawer-open-v3": {"drawer": "drawer"},
    "faucet-close-v3": {"faucet": "faucetBase"},
    "faucet-open-v3": {"faucet": "faucetBase"},
    "hammer-v3": {"hammer": "hammerbody", "nail box": "box"},
    "hand-insert-v3": {"puck": "obj"},
    "handle-press-side-v3": {"handle box": "box"},
    "handle-press-v3": {"handle box": "box"},
    "handle-pull-side-v3": {"handle box": "box"},
    "handle-pull-v3": {"handle box": "box"},
    "lever-pull-v3": {"lever": "lever"},
    "peg-insert-side-v3": {"peg": "peg", "box": "box"},
    "peg-unplug-side-v3": {"peg": "plug1", "box": "box"},
    "pick-out-of-hole-v3": {"puck": "obj"},
    "pick-place-v3": {"puck": "obj"},
    "pick-place-wall-v3": {"puck": "obj", "wall": "wall"},
    "plate-slide-back-side-v3": {"plate": "puck_channel", "cabinet": "puck_goal"},
    "plate-slide-back-v3": {"plate": "puck_channel", "cabinet": "puck_goal"},
    "plate-slide-side-v3": {"plate": "puck_channel", "cabinet": "puck_goal"},
    "plate-slide-v3": {"plate": "puck_channel", "cabinet": "puck_goal"},
    "push-back-v3": {"puck": "obj"},
    "push-v3": {"puck": "obj"},
    "push-wall-v3": {"puck": "obj", "wall": "wall"},
    "reach-v3": {"puck": "obj"},
    "reach-wall-v3": {"puck": "obj", "wall": "wall"},
    "shelf-place-v3": {"puck": "obj", "shelf": "shelf"},
    "soccer-v3": {"ball": "soccer_ball", "goal": "goal_whole"},
    "stick-pull-v3": {"stick": "stick", "box": "object"},
    "stick-push-v3": {"stick": "stick", "box": "object"},
    "sweep-into-v3": {"puck": "obj"},
    "sweep-v3": {"puck": "obj"},
    "window-close-v3": {"window": "window"},
    "window-open-v3": {"window": "window"},
}


@dataclasses.dataclass(frozen=True)
class Articulation:
  """An openable part: `sign * qpos` of `joint` >= `open_at` is open, <= `closed_at` closed,
  in between not asked about. Ranges and directions read from the scenes: the drawer slides
  0 (closed) .. -0.16 m, the window 0 .. 0.2 m, the door swings 0 .. -2 rad, the faucet handle
  turns from 0 toward +pi/2 to open (faucet-open) and toward -pi/2 to close (faucet-close)."""
  part: str
  joint: str
  sign: float
  open_at: float
  closed_at: float


_DRAWER = Articulation("drawer", "goal_slidey", -1.0, 0.06, 0.02)
_WINDOW = Articulation("window", "window_slide", 1.0, 0.08, 0.03)
_DOOR = Articulation("door", "doorjoint", -1.0, 0.5, 0.15)
_FAUCET = Articulation("faucet", "knob_Joint_1", 1.0, 0.5, -0.5)
ARTICULATIONS: dict[str, Articulation] = {
    "drawer-open-v3": _DRAWER, "drawer-close-v3": _DRAWER, "window-open-v3": _WINDOW,
    "window-close-v3": _WINDOW, "door-open-v3": _DOOR, "door-close-v3": _DOOR,
    "faucet-open-v3": _FAUCET, "faucet-close-v3": _FAUCET}

# Answers are asked only with these margins: image x as a fraction of the width, depth and
# height in metres, distance difference in metres, gripper opening (0 closed .. 1 open).
MARGINS = dict(image_x=0.08, depth=0.06, height=0.05, distance=0.05)
GRIPPER_OPEN_AT, GRIPPER_CLOSED_AT = 0.8, 0.5


@dataclasses.dataclass(frozen=True)
class SceneState:
  """What the questions read, taken from the simulator at one step of one episode.

  Attributes:
    task, seed, step: the scene: `step` expert actions after `reset(seed)`.
    positions: name -> world xyz `[3]` (m): "gripper" (the tool centre between the finger tips)
      and the task's `OBJECTS`.
    image_x: name -> where it appears in the upright frame (fraction of the width from the left).
    depth: name -> its distance from the camera along the viewing axis (m).
    gripper_opening: `state[3]` (0 closed .. 1 open).
    joints: joint name -> qpos of the task's articulation (if any).
    state: float32 `[4]` the policy's state (hand xyz ‖ gripper opening) at the scene.
  """
  task: str
  seed: int
  step: int
  positions: Mapping[str, np.ndarray]
  image_x: Mapping[str, float]
  depth: Mapping[str, float]
  gripper_opening: float
  joints: Mapping[str, float]
  state: np.ndarray


@dataclasses.dataclass(frozen=True)
class QA:
  """One question about a scene and its answer (`choices`: the closed answer set, or ())."""
  question_type: str
  question: str
  answer: str
  choices: tuple[str, ...] = ()


def body_centre(model, data, body: str) -> np.ndarray:
  """Mean of the centres of the geoms of `body` and its descendants, world xyz `[3]`."""
  root = model.body(body).id
  members = {root}
  for b in range(root + 1, model.nbody):  # MuJoCo orders bodies parents first.
    if model.body_parentid[b] in members:
      members.add(b)
  geoms = [g for g in range(model.ngeom) if model.geom_bodyid[g] in members]
  if not geoms:
    return np.array(data.xpos[root])
  return np.mean(data.geom_xpos[geoms], axis=0)


def scene_state(env: mw.MetaWorldEnv, seed: int, step: int,
                time_step: mw.TimeStep) -> SceneState:
  """The `SceneState` of `env` now (after `time_step`, `step` actions from `reset(seed)`)."""
  sim = env.mujoco_env
  positions = {"gripper": np.array(sim.tcp_center)}
  for name, body in OBJECTS[mw.base_task(env.task)].items():
    positions[name] = body_centre(sim.model, sim.data, body)
  names = list(positions)
  image_x, _, depth = mw.project(sim, np.stack([positions[n] for n in names]))
  articulation = ARTICULATIONS.get(env.task)
  joints = {}
  if articulation is not None:
    joints[articulation.joint] = float(sim.data.joint(articulation.joint).qpos[0])
  return SceneState(task=env.task, seed=int(seed), step=int(step), positions=positions,
                    image_x=dict(zip(names, map(float, image_x))),
                    depth=dict(zip(names, map(float, depth))),
                    gripper_opening=float(time_step.state[3]), joints=joints,
                    state=np.array(time_step.state, np.float32))


def _pick(rng: np.random.Generator, options: Sequence):
  return options[int(rng.integers(len(options)))]


def _pairs(state: SceneState) -> list[tuple[str, str]]:
  names = list(state.positions)
  return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]


def _relation(state: SceneState, rng: np.random.Generator, value: Callable[[str], float],
              margin: float) -> tuple[str, str, bool] | None:
  """A random pair `(a, b)` whose `value`s differ by >= margin, in random order, and whether
  value(a) > value(b); None if no pair qualifies."""
  pairs = [(a, b) for a, b in _pairs(state) if abs(value(a) - value(b)) >= margin]
  if not pairs:
    return None
  a, b = _pick(rng, pairs)
  if rng.random() < 0.5:
    a, b = b, a
  return a, b, value(a) > value(b)


TASK_QUESTIONS = ("What task is this scene set up for?", "Which task can be done in this scene?",
                  "What is the robot supposed to do here?")


def ask_task(state: SceneState, rng: np.random.Generator) -> QA | None:
  if state.task in instructed.TASKS:  # K instructions share the frame: not answerable.
    return None
  return QA("task", _pick(rng, TASK_QUESTIONS), mw.INSTRUCTIONS[state.task])


def ask_instruction(state: SceneState, rng: np.random.Generator) -> QA | None:
  if state.task in instructed.TASKS:
    place = instructed.TASKS[state.task].place
    phrasings, answer = place.seen[1:] + place.heldout, place.seen[0]
  else:
    phrasings, answer = PARAPHRASES[state.task], mw.INSTRUCTIONS[state.task]
  return QA("instruction", f'Which task does the instruction "{_pick(rng, phrasings)}" describe?',
            answer)


def ask_left_right(state: SceneState, rng: np.random.Generator) -> QA | None:
  found = _relation(state, rng, lambda n: state.image_x[n], MARGINS["image_x"])
  if found is None:
    return None
  a, b, a_right = found
  return QA("left_right", f"Is the {a} to the left or to the right of the {b}?",
            "right" if a_right else "left", ("left", "right"))


def ask_front_behind(state: SceneState, rng: np.random.Generator) -> QA | None:
  found = _relation(state, rng, lambda n: state.depth[n], MARGINS["depth"])
  if found is None:
    return None
  a, b, a_farther = found
  return QA("front_behind", f"Is the {a} in front of or behind the {b}?",
            "behind" if a_farther else "in front", ("in front", "behind"))


def ask_above_below(state: SceneState, rng: np.random.Generator) -> QA | None:
  found = _relation(state, rng, lambda n: float(state.positions[n][2]), MARGINS["height"])
  if found is None:
    return None
  a, b, a_higher = found
  return QA("above_below", f"Is the {a} above or below the {b}?",
            "above" if a_higher else "below", ("above", "below"))


def ask_open(state: SceneState, rng: np.random.Generator) -> QA | None:
  del rng
  articulation = ARTICULATIONS.get(state.task)
  if articulation is None:
    return None
  q = articulation.sign * state.joints[articulation.joint]
  if articulation.closed_at < q < articulation.open_at:
    return None
  return QA("open", f"Is the {articulation.part} open?", "yes" if q >= articulation.open_at
            else "no", ("yes", "no"))


def ask_gripper(state: SceneState, rng: np.random.Generator) -> QA | None:
  del rng
  opening = state.gripper_opening
  if GRIPPER_CLOSED_AT < opening < GRIPPER_OPEN_AT:
    return None
  return QA("gripper", "Is the gripper open?", "yes" if opening >= GRIPPER_OPEN_AT else "no",
            ("yes", "no"))


def ask_nearer(state: SceneState, rng: np.random.Generator) -> QA | None:
  objects = [n for n in state.positions if n != "gripper"]
  distance = {n: float(np.linalg.norm(state.positions[n] - state.positions["gripper"]))
              for n in objects}
  pairs = [(a, b) for i, a in enumerate(objects) for b in objects[i + 1:]
           if abs(distance[a] - distance[b]) >= MARGINS["distance"]]
  if not pairs:
    return None
  a, b = _pick(rng, pairs)
  if rng.random() < 0.5:
    a, b = b, a
  return QA("nearer", f"Which is nearer to the gripper, the {a} or the {b}?",
            a if distance[a] < distance[b] else b, (a, b))


@dataclasses.dataclass(frozen=True)
class QuestionType:
  """A named question generator; `answers`: its fixed closed answer set (binary types, balanced
  by `balance`), or None (open answers, or answers that name the scene's things)."""
  name: str
  ask: Callable[[SceneState, np.random.Generator], QA | None]
  answers: tuple[str, ...] | None
  description: str


QUESTION_TYPES: dict[str, QuestionType] = {q.name: q for q in (
    QuestionType("task", ask_task, None, "which task the scene is set up for"),
    QuestionType("instruction", ask_instruction, None,
                 "which task a paraphrased instruction describes"),
    QuestionType("left_right", ask_left_right, ("left", "right"),
                 "left/right of two things in the image"),
    QuestionType("front_behind", ask_front_behind, ("in front", "behind"),
                 "nearer to / farther from the camera"),
    QuestionType("above_below", ask_above_below, ("above", "below"), "higher / lower"),
    QuestionType("open", ask_open, ("yes", "no"), "whether a drawer/window/door/faucet is open"),
    QuestionType("gripper", ask_gripper, ("yes", "no"), "whether the gripper is open"),
    QuestionType("nearer", ask_nearer, None, "which of two objects is nearer the gripper"),
)}


class UnknownQuestionTypeError(ValueError):
  """A question type `QUESTION_TYPES` does not have."""


def resolve_question_types(names: str | Sequence[str] | None = None) -> tuple[str, ...]:
  """Question type names ("all" or None: every type; "left_right,open"); an unknown one raises
  `UnknownQuestionTypeError` naming the known ones."""
  if names is None or names == "all":
    return tuple(QUESTION_TYPES)
  items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names)]
  chosen = []
  for name in (n for n in items if n):
    if name not in QUESTION_TYPES:
      close = difflib.get_close_matches(name, QUESTION_TYPES, n=2, cutoff=0.5)
      raise UnknownQuestionTypeError(
          f"Unknown question type {name!r}" + (f" (did you mean {' or '.join(close)}?)" if close
                                               else "")
          + f"; known: {', '.join(QUESTION_TYPES)} (or 'all').")
    if name not in chosen:
      chosen.append(name)
  if not chosen:
    raise UnknownQuestionTypeError(f"No question type in {names!r}; known: "
                                   f"{', '.join(QUESTION_TYPES)} (or 'all').")
  return tuple(chosen)


def ask(state: SceneState, question_types: Sequence[str], rng: np.random.Generator) -> list[QA]:
  """At most one question of each type about `state` (types in the given order)."""
  found = (QUESTION_TYPES[name].ask(state, rng) for name in resolve_question_types(question_types))
  return [qa for qa in found if qa is not None]


def scene_seeds(split: str, num: int, offset: int = 0) -> tuple[int, ...]:
  """Scene seeds of `split`: train = `mw.data_seeds`, heldout = `mw.eval_seeds` (disjoint)."""
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
  return mw.data_seeds(num, offset) if split == TRAIN else mw.eval_seeds(num, offset)


@dataclasses.dataclass(frozen=True)
class Scene:
  """A rendered scene: `image` uint8 `[H, W, 3]` (the upright frame) and its `state`."""
  image: np.ndarray
  state: SceneState


def scenes(env: mw.MetaWorldEnv, seed: int, frames: int,
           expert: Callable[[np.ndarray], np.ndarray] | None = None) -> list[Scene]:
  """`frames` scenes of `env.task` from `seed`: the scripted expert runs (without rendering) to
  success or the limit, `frames` distinct steps are drawn from [0, its length] (seeded by
  `seed`), and the episode is replayed rendering just those steps."""
  if frames < 1:
    raise ValueError(f"frames must be >= 1; got {frames}.")
  expert = expert or mw.expert_policy(env.task)
  plan = mw.rollout(env, lambda ts: expert(ts.raw), seed, render=False)
  rng = np.random.default_rng([int(seed), 7])
  steps = sorted(int(k) for k in rng.choice(len(plan) + 1, min(frames, len(plan) + 1),
                                            replace=False))
  found = []
  time_step = env.reset(seed, render=False)
  for k in range(steps[-1] + 1):
    if k == steps[len(found)]:
      found.append(Scene(env.render(), scene_state(env, seed, k, time_step)))
    if k < steps[-1]:
      time_step = env.step(plan.actions[k], render=False)
  return found


def answer_key(qa: QA) -> str | None:
  """What `balance` equalises: the answer of a type with a fixed answer set, "first" or
  "second" for answers naming one of two things, None for open answers."""
  if QUESTION_TYPES[qa.question_type].answers is not None:
    return qa.answer
  if qa.choices:
    return "first" if qa.answer == qa.choices[0] else "second"
  return None


def balance(examples: Sequence[tuple[Scene, QA]], seed: int = 0
            ) -> tuple[list[tuple[Scene, QA]], dict[str, int]]:
  """Equal answer counts for every type with a closed answer set (`QuestionType.answers`) and,
  for `nearer`, equal counts of first- and second-named answers: the surplus of a majority
  answer is dropped at random (seeded). Returns the kept examples (in order) and, per type, how
  many were dropped."""
  rng = np.random.default_rng(seed)
  keys: dict[str, dict[str, list[int]]] = {}
  for i, (_, qa) in enumerate(examples):
    key = answer_key(qa)
    if key is not None:
      keys.setdefault(qa.question_type, {}).setdefault(key, []).append(i)
  drop, dropped = set(), {}
  for name, by_key in keys.items():
    wanted = QUESTION_TYPES[name].answers or ("first", "second")
    smallest = min(len(by_key.get(k, [])) for k in wanted)
    for members in by_key.values():
      surplus = rng.permutation(members)[:len(members) - smallest]
      drop.update(int(i) for i in surplus)
      dropped[name] = dropped.get(name, 0) + len(surplus)
  return [e for i, e in enumerate(examples) if i not in drop], dropped
