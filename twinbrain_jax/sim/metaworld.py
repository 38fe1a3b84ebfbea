"""Meta-World (50 Sawyer manipulation tasks in MuJoCo) behind LeRobot's evaluation contract.

The contract is LeRobot's Meta-World protocol, the one the SmolVLA paper's table (SmolVLA, pi0,
TinyVLA, Diffusion Policy) uses (huggingface/lerobot, src/lerobot/envs/metaworld.py):

  image    uint8   [H, W, 3]  camera `corner2` moved to LeRobot's pose and turned upright (it
                              renders rotated by 180 degrees)
  state    float32 [4]        end-effector xyz ‖ gripper opening (0 closed .. 1 open) = obs[:4] of
                              Meta-World's 39-D observation
  action   float32 [4]        end-effector xyz delta ‖ gripper effort, clipped to [-1, 1]
  success  `info["success"]` at any step within the episode limit (`max_steps`, by default
           Meta-World's `max_path_length` = 500; LeRobot's eval config uses 400)

Seeds. A seed fixes an episode's initial condition: the object and goal positions are drawn from
`np_random` seeded by it (Meta-World's `seeded_rand_vec`), instead of one of the 50 positions
`metaworld.MT1` pre-samples. Demonstration data uses seeds in [0, EVAL_SEED_START) and
evaluation seeds in [EVAL_SEED_START, 2**31), so a policy is never evaluated on an initial
condition it was trained on (`data_seeds`, `eval_seeds`, `check_seeds_disjoint`).

Rendering is offscreen with `MUJOCO_GL` (EGL by default here: Debian `libegl1 libegl-mesa0
libgl1-mesa-dri libopengl0`), which must be set before mujoco is imported. Shadows and
multisampling are off: on a CPU rasteriser they cost more than the frame is worth at 64-224 px.
Rendering dominates the cost (~60-80 frames/s on one CPU core vs ~1000 physics steps/s), so
`reset`/`step` render only when asked.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import pickle
from collections.abc import Callable, Sequence

import numpy as np

# Before mujoco is imported: without a display only an offscreen GL backend works.
os.environ.setdefault("MUJOCO_GL", "egl")

import metaworld  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from metaworld import env_dict as _env_dict  # noqa: E402  pylint: disable=g-import-not-at-top
from metaworld import policies as _policies  # noqa: E402  pylint: disable=g-import-not-at-top

from twinbrain_jax.sim import instructed  # noqa: E402  pylint: disable=g-import-not-at-top

# One instruction per task: LeRobot's TASK_DESCRIPTIONS (src/lerobot/envs/metaworld_config.json),
# except push-back-v3, which LeRobot describes exactly like push-v3; a language-conditioned
# multi-task policy needs the two told apart.
INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "Pick up a nut and place it onto a peg",
    "basketball-v3": "Dunk the basketball into the basket",
    "bin-picking-v3": "Grasp the puck from one bin and place it into another bin",
    "box-close-v3": "Grasp the cover and close the box with it",
    "button-press-topdown-v3": "Press a button from the top",
    "button-press-topdown-wall-v3": "Bypass a wall and press a button from the top",
    "button-press-v3": "Press a button",
    "button-press-wall-v3": "Bypass a wall and press a button",
    "coffee-button-v3": "Push a button on the coffee machine",
    "coffee-pull-v3": "Pull a mug from a coffee machine",
    "coffee-push-v3": "Push a mug under a coffee machine",
    "dial-turn-v3": "Rotate a dial 180 degrees",
    "disassemble-v3": "Pick a nut out of a peg",
    "door-close-v3": "Close a door with a revolving joint",
    "door-lock-v3": "Lock the door by rotating the lock clockwise",
    "door-open-v3": "Open a door with a revolving joint",
    "door-unlock-v3": "Unlock the door by rotating the lock counter-clockwise",
    "drawer-close-v3": "Push and close a drawer",
    "drawer-open-v3": "Open a drawer",
    "faucet-close-v3": "Rotate the faucet clockwise",
    "faucet-open-v3": "Rotate the faucet counter-clockwise",
    "hammer-v3": "Hammer a screw on the wall",
    "hand-insert-v3": "Insert the gripper into a hole",
    "handle-press-side-v3": "Press a handle down sideways",
    "handle-press-v3": "Press a handle down",
    "handle-pull-side-v3": "Pull a handle up sideways",
    "handle-pull-v3": "Pull a handle up",
    "lever-pull-v3": "Pull a lever down 90 degrees",
    "peg-insert-side-v3": "Insert a peg sideways",
    "peg-unplug-side-v3": "Unplug a peg sideways",
    "pick-out-of-hole-v3": "Pick up a puck from a hole",
    "pick-place-v3": "Pick and place a puck to a goal",
    "pick-place-wall-v3": "Pick a puck, bypass a wall and place the puck",
    "plate-slide-back-side-v3": "Get a plate from the cabinet sideways",
    "plate-slide-back-v3": "Get a plate from the cabinet",
    "plate-slide-side-v3": "Slide a plate into a cabinet sideways",
    "plate-slide-v3": "Slide a plate into a cabinet",
    "push-back-v3": "Push the puck back to a goal",
    "push-v3": "Push the puck to a goal",
    "push-wall-v3": "Bypass a wall and push a puck to a goal",
    "reach-v3": "Reach a goal position",
    "reach-wall-v3": "Bypass a wall and reach a goal",
    "shelf-place-v3": "Pick and place a puck onto a shelf",
    "soccer-v3": "Kick a soccer into the goal",
    "stick-pull-v3": "Grasp a stick and pull a box with the stick",
    "stick-push-v3": "Grasp a stick and push a box using the stick",
    "sweep-into-v3": "Sweep a puck into a hole",
    "sweep-v3": "Sweep a puck off the table",
    "window-close-v3": "Push and close a window",
    "window-open-v3": "Push and open a window",
}

MT50: tuple[str, ...] = tuple(INSTRUCTIONS)
# Meta-World's MT10 (metaworld.env_dict.MT10_V3), in its order.
MT10: tuple[str, ...] = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3",
                         "drawer-close-v3", "button-press-topdown-v3", "peg-insert-side-v3",
                         "window-open-v3", "window-close-v3")
# The difficulty groups LeRobot evaluates and reports (DIFFICULTY_TO_TASKS in
# huggingface/lerobot src/lerobot/envs/metaworld_config.json): 28 + 11 + 6 + 5 = 50 tasks.
DIFFICULTY: dict[str, tuple[str, ...]] = {
    "easy": ("button-press-v3", "button-press-topdown-v3", "button-press-topdown-wall-v3",
             "button-press-wall-v3", "coffee-button-v3", "dial-turn-v3", "door-close-v3",
             "door-lock-v3", "door-open-v3", "door-unlock-v3", "drawer-close-v3", "drawer-open-v3",
             "faucet-close-v3", "faucet-open-v3", "handle-press-v3", "handle-press-side-v3",
             "handle-pull-v3", "handle-pull-side-v3", "lever-pull-v3", "plate-slide-v3",
             "plate-slide-back-v3", "plate-slide-back-side-v3", "plate-slide-side-v3", "reach-v3",
             "reach-wall-v3", "window-close-v3", "window-open-v3", "peg-unplug-side-v3"),
    "medium": ("basketball-v3", "bin-picking-v3", "box-close-v3", "coffee-pull-v3",
               "coffee-push-v3", "hammer-v3", "peg-insert-side-v3", "push-wall-v3", "soccer-v3",
               "sweep-v3", "sweep-into-v3"),
    "hard": ("assembly-v3", "hand-insert-v3", "pick-out-of-hole-v3", "pick-place-v3", "push-v3",
             "push-back-v3"),
    "very_hard": ("shelf-place-v3", "disassemble-v3", "stick-pull-v3", "stick-push-v3",
                  "pick-place-wall-v3"),
}
# Plus the families where the instruction decides (`sim/instructed.py`): "reach-place" (its
# seen phrasings) and "reach-place-heldout"; they are not part of MT50.
TASK_GROUPS: dict[str, tuple[str, ...]] = {"mt10": MT10, "mt50": MT50, **DIFFICULTY,
                                           **instructed.GROUPS}

DEFAULT_IMAGE_SIZE = (112, 112)
CAMERA = "corner2"
# LeRobot moves corner2 closer to the table (its comment: "similar to arXiv 2206.14244"); objects
# then cover enough pixels to be seen at 64-112 px.
CAMERA_POS = (0.75, 0.075, 0.7)
STATE_DIM = ACTION_DIM = 4

EVAL_SEED_START = 1_000_000
SEED_LIMIT = 2**31


class UnknownTaskError(ValueError):
  """A task or task-group name Meta-World does not have."""


def resolve_tasks(names: str | Sequence[str]) -> tuple[str, ...]:
  """Task names from groups and names: "mt10", "easy,reach", ["pick-place-v3", "very_hard"].

  A task may be named without its "-v3" suffix; duplicates are dropped, order is kept. An unknown
  name raises `UnknownTaskError` listing the close matches.
  """
  items = names.split(",") if isinstance(names, str) else list(names)
  tasks: list[str] = []
  for item in (i.strip() for i in items):
    if not item:
      continue
    key = item.lower().replace(" ", "_")
    if key in TASK_GROUPS:
      found = TASK_GROUPS[key]
    elif key in INSTRUCTIONS or key in instructed.TASKS:
      found = (key,)
    elif f"{key}-v3" in INSTRUCTIONS:
      found = (f"{key}-v3",)
    else:
      close = difflib.get_close_matches(key, [*TASK_GROUPS, *INSTRUCTIONS, *instructed.TASKS],
                                        n=4, cutoff=0.5)
      raise UnknownTaskError(
          f"Unknown Meta-World task or group {item!r}"
          + (f"; did you mean {', '.join(close)}?" if close else ".")
          + f" Groups: {', '.join(TASK_GROUPS)}; tasks: the 50 names of MT50 (e.g. reach-v3) "
          f"and those of the groups {', '.join(instructed.GROUPS)}.")
    tasks.extend(t for t in found if t not in tasks)
  if not tasks:
    raise UnknownTaskError(f"No Meta-World task in {names!r}; name tasks or groups "
                           f"({', '.join(TASK_GROUPS)}).")
  return tuple(tasks)


def resolve_task(name: str) -> str:
  """One task name (suffix optional); a group or a list is an error naming what it holds."""
  tasks = resolve_tasks(name)
  if len(tasks) != 1:
    raise UnknownTaskError(f"{name!r} names {len(tasks)} tasks ({', '.join(tasks[:4])}"
                           f"{', ...' if len(tasks) > 4 else ''}); one task is needed here.")
  return tasks[0]


def base_task(task: str) -> str:
  """The Meta-World task whose scene and scripted policy `task` uses (itself for MT50)."""
  task = resolve_task(task)
  return instructed.TASKS[task].family.base_task if task in instructed.TASKS else task


def instruction(task: str, seed: int) -> str:
  """The instruction of `task`'s episode from `seed`: `INSTRUCTIONS[task]` for MT50; a family
  task's phrasings take turns over the seeds (`sim/instructed.py`)."""
  task = resolve_task(task)
  if task in instructed.TASKS:
    return instructed.TASKS[task].instruction(seed)
  return INSTRUCTIONS[task]


def _seed_range(num: int, start: int, stop: int, offset: int, what: str) -> tuple[int, ...]:
  first = start + offset
  if num < 0 or offset < 0 or first + num > stop:
    raise ValueError(f"{what} seeds {first}..{first + num - 1} leave [{start}, {stop}): "
                     f"{num} episodes from offset {offset}; data seeds are [0, {EVAL_SEED_START}), "
                     f"evaluation seeds [{EVAL_SEED_START}, {SEED_LIMIT}).")
  return tuple(range(first, first + num))


def data_seeds(num: int, offset: int = 0) -> tuple[int, ...]:
  """Seeds of `num` demonstration episodes: `offset, offset + 1, ...` < EVAL_SEED_START."""
  return _seed_range(num, 0, EVAL_SEED_START, offset, "Data")


def eval_seeds(num: int, offset: int = 0) -> tuple[int, ...]:
  """Seeds of `num` evaluation episodes: `EVAL_SEED_START + offset, ...` < 2**31."""
  return _seed_range(num, EVAL_SEED_START, SEED_LIMIT, offset, "Evaluation")


def check_seeds_disjoint(train: Sequence[int], evaluation: Sequence[int]) -> None:
  """Raises ValueError if an evaluation seed was used for data (e.g. a dataset's metadata)."""
  shared = sorted(set(int(s) for s in train) & set(int(s) for s in evaluation))
  if shared:
    raise ValueError(f"{len(shared)} evaluation seeds were used for training data (first: "
                     f"{shared[:5]}); evaluate with `eval_seeds` (>= {EVAL_SEED_START}) and make "
                     f"data with `data_seeds` (< {EVAL_SEED_START}).")


def image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
  """`112` or `(112, 128)` -> `(H, W)`; anything else is an error naming it."""
  size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f"image_size must be (height, width) or one int; got {image_size!r}.")
  return int(size[0]), int(size[1])


def state_from_raw(raw: np.ndarray) -> np.ndarray:
  """Meta-World observation `[..., 39]` -> state `[..., 4]` float32 (hand xyz ‖ gripper)."""
  return np.asarray(raw, np.float32)[..., :STATE_DIM]


def upright(frame: np.ndarray) -> np.ndarray:
  """A `corner2` render `[H, W, 3]` turned by 180 degrees (as LeRobot does), contiguous."""
  return np.ascontiguousarray(frame[::-1, ::-1])


def camera_pose(mujoco_env) -> tuple[np.ndarray, np.ndarray, float]:
  """`(position [3], rotation [3, 3], fovy in degrees)` of `CAMERA` in the world now; the
  rotation's columns are the camera's x (right of the raw render), y (up of it) and z (it looks
  along -z)."""
  camera = mujoco_env.model.camera(CAMERA).id
  return (np.array(mujoco_env.data.cam_xpos[camera]),
          np.array(mujoco_env.data.cam_xmat[camera]).reshape(3, 3),
          float(mujoco_env.model.cam_fovy[camera]))


def view_axes(mujoco_env) -> tuple[np.ndarray, np.ndarray]:
  """Horizontal unit vectors `[3]` of the upright frame's directions on the table: its right,
  and toward the camera. (The raw render is turned by 180 degrees, so the upright right is the
  camera's -x.)"""
  _, rotation, _ = camera_pose(mujoco_env)
  flat = lambda v: np.array([v[0], v[1], 0.0]) / np.linalg.norm(v[:2])
  return flat(-rotation[:, 0]), flat(rotation[:, 2])


def project(mujoco_env, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """World points `[N, 3]` -> `(x [N], y [N], depth [N])`: where they appear in the upright
  frame as fractions of its width from the left and of its height from the top (pinhole model
  of `CAMERA` with square pixels), and their distance in metres along the viewing axis."""
  position, rotation, fovy = camera_pose(mujoco_env)
  h, w = mujoco_env.height, mujoco_env.width
  local = (np.asarray(points, np.float64).reshape(-1, 3) - position) @ rotation  # Camera frame.
  depth = -local[:, 2]
  focal = 0.5 * h / np.tan(np.radians(fovy) / 2)  # Pixels; fovy is the vertical field of view.
  raw_x = 0.5 * w + focal * local[:, 0] / depth
  raw_y = 0.5 * h - focal * local[:, 1] / depth
  return 1.0 - raw_x / w, 1.0 - raw_y / h, depth  # Upright: turned by 180 degrees.


def clip_action(action: np.ndarray) -> np.ndarray:
  """`[4]` -> float32 `[4]` in [-1, 1]: exactly what the simulator applies (it clips xyz itself
  and the gripper actuator's control range is [-1, 1])."""
  action = np.asarray(action, np.float32).reshape(-1)
  if action.shape != (ACTION_DIM,) or not np.all(np.isfinite(action)):
    raise ValueError(f"A Meta-World action is 4 finite numbers (xyz delta, gripper); got "
                     f"{action.tolist()}.")
  return np.clip(action, -1.0, 1.0)


def expert_policy(task: str) -> Callable[[np.ndarray], np.ndarray]:
  """Meta-World's scripted policy of `task`: raw observation `[39]` -> clipped action `[4]` (a
  family task's: `instructed.expert_action`, which reads the place from the goal slot)."""
  if resolve_task(task) in instructed.TASKS:
    return lambda raw: clip_action(instructed.expert_action(raw))
  policy = _policies.ENV_POLICY_MAP[resolve_task(task)]()
  # A copy: some policies edit the observation in place (door-open shifts the handle x by 0.05).
  return lambda raw: clip_action(policy.get_action(np.array(raw, np.float64)))


@dataclasses.dataclass(frozen=True)
class TimeStep:
  """What the environment returns after `reset` or `step`.

  Attributes:
    image: uint8 `[H, W, 3]` upright `corner2` frame; None when not rendered.
    state: float32 `[4]` hand xyz ‖ gripper opening.
    raw: float64 `[39]` Meta-World's observation (the scripted policies read it).
    reward: Meta-World's dense reward (0 at reset).
    success: `info["success"]` after this step (False at reset).
    step: steps taken in the episode so far.
    truncated: the episode limit is reached; `step` may not be called again.
  """
  image: np.ndarray | None
  state: np.ndarray
  raw: np.ndarray
  reward: float
  success: bool
  step: int
  truncated: bool

  def observation(self) -> dict[str, np.ndarray]:
    """`{"image": [H, W, 3] uint8, "state": [4] float32}` (the policy's input)."""
    if self.image is None:
      raise ValueError("This time step was not rendered; pass render=True to reset/step.")
    return {"image": self.image, "state": self.state}


class MetaWorldEnv:
  """One Meta-World task behind the contract of the module docstring (not thread-safe).

  A family task (`sim/instructed.py`, e.g. "reach-place-left") runs its base task's scene with
  the goal markers hidden and the goal replaced by the place at every reset: the place is in the
  goal slot of `raw` (`raw[36:39]`, which the scripted policy reads) and Meta-World's success test
  measures the distance to it.

  Attributes:
    task: Meta-World name, e.g. "pick-place-v3", or a family task's name.
    instruction: its natural-language instruction (a family task's: that of the last reset's
      seed, `instruction(task, seed)`).
    target: a family task's place `[3]` since the last reset, else None.
    image_size: `(H, W)` of the rendered frames.
    max_steps: the episode limit.
    mujoco_env: the underlying `metaworld.SawyerXYZEnv` (its `render()` is the raw frame).
  """

  def __init__(self, task: str, image_size: int | Sequence[int] = DEFAULT_IMAGE_SIZE,
               max_steps: int | None = None):
    self.task = resolve_task(task)
    self.instruction = instruction(self.task, 0)
    self.image_size = image_hw(image_size)
    self._variant = instructed.TASKS.get(self.task)
    self.target: np.ndarray | None = None
    base = base_task(self.task)
    cls = _env_dict.ALL_V3_ENVIRONMENTS[base]
    env = cls(render_mode="rgb_array", camera_name=CAMERA, width=self.image_size[1],
              height=self.image_size[0])
    limit = int(env.max_path_length)
    self.max_steps = limit if max_steps is None else int(max_steps)
    if not 1 <= self.max_steps <= limit:
      raise ValueError(f"max_steps={max_steps} for {self.task}: Meta-World allows 1..{limit}.")
    # MT setting (goal position in the observation: the scripted policies read it). `set_task`
    # freezes the reset vector; unfreezing it with `seeded_rand_vec` draws the object and goal
    # positions from the env's seeded `np_random` at every reset instead.
    task_data = dict(env_cls=cls, rand_vec=np.array(env._random_reset_space.low),  # pylint: disable=protected-access
                     partially_observable=False)
    env.set_task(metaworld.Task(env_name=base, data=pickle.dumps(task_data)))
    env._freeze_rand_vec = False  # pylint: disable=protected-access
    env.seeded_rand_vec = True
    quality = env.model.vis.quality
    quality.shadowsize, quality.offsamples = 0, 0  # Read when the GL context is made (1st frame).
    env.model.cam_pos[env.model.camera(CAMERA).id] = CAMERA_POS
    if self._variant is not None:  # The goal is given in words only.
      for site in range(env.model.nsite):
        if env.model.site(site).name.startswith("goal"):
          env.model.site_rgba[site, 3] = 0.0
      # Meta-World clips the observation's goal slot to the base task's goal box; a place may
      # lie outside it (reach-v3's box is y >= 0.8), so the box becomes the hand's.
      hand = env._HAND_SPACE  # pylint: disable=protected-access
      env.goal_space = type(hand)(hand.low, hand.high, dtype=np.float64)
      env.__dict__.pop("sawyer_observation_space", None)  # A cached_property of the old box.
    self.mujoco_env = env
    self._steps: int | None = None  # None until the first reset.

  def render(self) -> np.ndarray:
    """The current upright `corner2` frame, uint8 `[H, W, 3]`."""
    if self._steps is None:
      raise RuntimeError(f"{self.task}: call reset(seed) before rendering.")
    return upright(self.mujoco_env.render())

  def reset(self, seed: int, render: bool = True) -> TimeStep:
    """Starts an episode whose initial condition is fixed by `seed` (see the module docstring)."""
    if not 0 <= int(seed) < SEED_LIMIT:
      raise ValueError(f"seed must be in [0, 2**31); got {seed}.")
    self.mujoco_env.seed(int(seed))
    raw, _ = self.mujoco_env.reset()
    if self._variant is not None:
      self.instruction = self._variant.instruction(seed)
      self.target = self._variant.target(self.mujoco_env._get_pos_objects(),  # pylint: disable=protected-access
                                         *view_axes(self.mujoco_env))
      self.mujoco_env._target_pos = self.target  # pylint: disable=protected-access
      raw = np.array(raw)
      raw[-3:] = self.target
    self._steps = 0
    return self._time_step(raw, 0.0, False, render)

  def step(self, action: np.ndarray, render: bool = True) -> TimeStep:
    """Applies `action` `[4]` (clipped to [-1, 1]) for one control step."""
    if self._steps is None or self._steps >= self.max_steps:
      raise RuntimeError(f"{self.task}: the episode " + (
          "has not started" if self._steps is None else f"reached its {self.max_steps} steps")
                         + "; call reset(seed).")
    raw, reward, _, _, info = self.mujoco_env.step(clip_action(action))
    self._steps += 1
    return self._time_step(raw, float(reward), bool(info["success"]), render)

  def _time_step(self, raw: np.ndarray, reward: float, success: bool, render: bool) -> TimeStep:
    image, raw = self.render() if render else None, np.array(raw, np.float64)
    for array in (image, raw):  # Read-only: a policy editing its input cannot alter a record.
      if array is not None:
        array.flags.writeable = False
    return TimeStep(image=image, state=state_from_raw(raw), raw=raw, reward=reward,
                    success=success, step=self._steps, truncated=self._steps >= self.max_steps)

  def close(self) -> None:
    """Frees the GL context (else EGL complains at interpreter exit)."""
    self.mujoco_env.close()

  def __enter__(self) -> "MetaWorldEnv":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def make_env(task: str, image_size: int | Sequence[int] = DEFAULT_IMAGE_SIZE,
             max_steps: int | None = None) -> MetaWorldEnv:
  """The environment of `task` rendering `image_size` frames; seeds are given to `reset`."""
  return MetaWorldEnv(task, image_size, max_steps)


@dataclasses.dataclass(frozen=True)
class Rollout:
  """One episode, step `t` = the observation an action was chosen on and that action.

  Attributes:
    task, seed: what fixes the episode.
    images: uint8 `[T, H, W, 3]`, or None if not rendered.
    states: float32 `[T, 4]`.
    raws: float64 `[T, 39]` Meta-World observations.
    actions: float32 `[T, 4]` the executed (clipped) actions.
    rewards: float32 `[T]` reward after each action.
    success: whether `info["success"]` held after some action; the episode then ends there.
  """
  task: str
  seed: int
  images: np.ndarray | None
  states: np.ndarray
  raws: np.ndarray
  actions: np.ndarray
  rewards: np.ndarray
  success: bool

  def __len__(self) -> int:
    return len(self.actions)


def rollout(env: MetaWorldEnv, policy: Callable[[TimeStep], np.ndarray], seed: int, *,
            render: bool = True, stop_on_success: bool = True) -> Rollout:
  """Runs `policy` (time step -> action `[4]`) from `reset(seed)` to success or the limit."""
  ts = env.reset(seed, render=render)
  seen: list[TimeStep] = []
  actions, rewards, success = [], [], False
  while not ts.truncated and not (success and stop_on_success):
    action = clip_action(policy(ts))
    seen.append(ts)
    ts = env.step(action, render=render)
    actions.append(action)
    rewards.append(ts.reward)
    success = success or ts.success
  return Rollout(
      task=env.task, seed=int(seed),
      images=np.stack([s.image for s in seen]) if render else None,
      states=np.stack([s.state for s in seen]), raws=np.stack([s.raw for s in seen]),
      actions=np.stack(actions), rewards=np.asarray(rewards, np.float32), success=success)
