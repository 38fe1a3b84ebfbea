"""Per-dataset standardisation of Open-X-Embodiment RLDS datasets.

Every OXE dataset stores cameras, proprioception, actions and language under its own keys and
conventions. A `DatasetSpec` says, for one dataset, which raw step keys are read (with their
shapes), which cameras are used, and a pure function that turns the stacked raw arrays of one
episode into standard `actions [T', A]` and `states [T', S]`. Adding a dataset is adding one entry
to `OXE_DATASETS`; using a known schema under another name or directory is a `data.datasets`
entry in the config (`data/config.py`), no code.

The gripper transforms follow the ones Octo and OpenVLA apply to OXE (all arrays numpy):
  * bridge: the last action dim is binarised (> 0.95 open = 1, < 0.05 closed = 0, values in
    between take the next determined value later in the episode), the 6 movement dims are
    relabelled from state differences and the final step is dropped.
  * fractal (RT-1): `gripper_closedness_action` is relative (> 0.1 close, < -0.1 open) and is made
    absolute (1 open, 0 closed) by carrying the last command forward.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import numpy as np

# `standardize(raw) -> (actions [T', A], states [T', S])`; `raw` maps a step key path
# ("observation/state") to the stacked values of one episode, `[T, ...]`.
StandardizeFn = Callable[[Mapping[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]


class UnknownDatasetError(KeyError):
  """A dataset name that has no entry in the registry."""

  def __str__(self):
    return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How one RLDS dataset maps to the standard sample.

  Attributes:
    name: TFDS builder name (the directory under the data dir).
    image_keys: observation keys of the cameras, primary first; `num_cameras` picks a prefix.
    image_shape: raw `(height, width)` of every camera.
    language_key: step key path of the instruction.
    lowdim_keys: step key path -> per-step shape of every non-image array `standardize` reads.
    standardize: raw episode arrays -> `(actions [T', A], states [T', S])`, `T' <= T`.
    action_dim: A.
    state_dim: S.
    action_normalize_mask: per action dim, True to map q01..q99 to [-1, 1]; False leaves it.
    action_binarize_mask: per action dim, True to threshold at 0.5 to {0, 1} (grippers).
    state_normalize_mask: per state dim, True to map q01..q99 to [-1, 1].
    registry_name: the registry entry this spec comes from; differs from `name` when a
      `data.datasets` entry maps another directory to it (see `data.config.dataset_entries`).
    text_keys: step key paths of further texts every sample carries under their own names
      (question-answer data: "answer"); samples of other datasets in a mixture carry "".
  """
  name: str
  image_keys: tuple[str, ...]
  image_shape: tuple[int, int]
  language_key: str
  lowdim_keys: Mapping[str, tuple[int, ...]]
  standardize: StandardizeFn
  action_dim: int
  state_dim: int
  action_normalize_mask: tuple[bool, ...]
  action_binarize_mask: tuple[bool, ...]
  state_normalize_mask: tuple[bool, ...]
  registry_name: str = ""
  text_keys: tuple[str, ...] = ()

  def __post_init__(self):
    if not self.registry_name:
      object.__setattr__(self, "registry_name", self.name)
    for field, size in (("action_normalize_mask", self.action_dim),
                        ("action_binarize_mask", self.action_dim),
                        ("state_normalize_mask", self.state_dim)):
      if len(getattr(self, field)) != size:
        raise ValueError(f"DatasetSpec {self.name!r}: {field} has {len(getattr(self, field))} "
                         f"entries, expected {size}.")

  def description(self) -> dict:
    """A JSON-able summary, stored with the statistics to detect a changed standardisation."""
    fn = self.standardize
    fn_name = getattr(getattr(fn, "func", fn), "__name__", repr(fn))
    fn_kwargs = dict(getattr(fn, "keywords", {}) or {})
    return dict(name=self.name, standardize=fn_name, standardize_kwargs=fn_kwargs,
                lowdim_keys={k: list(v) for k, v in self.lowdim_keys.items()},
                action_dim=self.action_dim, state_dim=self.state_dim)


def binarize_gripper_actions(gripper: np.ndarray, open_above: float = 0.95,
                             closed_below: float = 0.05) -> np.ndarray:
  """Bridge gripper `[T]` -> 1 open / 0 closed; in-between values take the next determined one.

  The scan runs from the end of the episode and starts from the raw last value (as Octo does).
  """
  gripper = np.asarray(gripper, np.float32)
  out = np.empty_like(gripper)
  carry = gripper[-1] if gripper.size else 0.0
  for t in range(gripper.shape[0] - 1, -1, -1):
    if gripper[t] > open_above:
      carry = 1.0
    elif gripper[t] < closed_below:
      carry = 0.0
    out[t] = carry
  return out


def relative_to_absolute_gripper(gripper: np.ndarray, threshold: float = 0.1) -> np.ndarray:
  """Fractal relative gripper command `[T]` (> 0.1 close, < -0.1 open) -> absolute 1 open/0 closed.

  The last command is carried forward; before the first command the gripper is in the opposite
  state of that command, or open if there is no command in the episode.
  """
  gripper = np.asarray(gripper, np.float32)
  # +1 = open command, -1 = close command, 0 = no change.
  command = np.where(gripper < -threshold, 1, np.where(gripper > threshold, -1, 0))
  nonzero = np.flatnonzero(command)
  state = -command[nonzero[0]] if nonzero.size else 1
  out = np.empty(gripper.shape, np.float32)
  for t in range(gripper.shape[0]):
    if command[t] != 0:
      state = command[t]
    out[t] = state
  return out / 2 + 0.5


def standardize_bridge(raw: Mapping[str, np.ndarray], relabel_actions: bool = True):
  """Bridge: action = EEF delta (6) + binarised gripper (1); state = EEF (6) + gripper (1)."""
  action = raw["action"].astype(np.float32)
  state = raw["observation/state"].astype(np.float32)
  gripper = binarize_gripper_actions(action[:, -1])[:, None]
  if relabel_actions:
    # Movement from consecutive states; the last step has no successor and is dropped.
    movement = state[1:, :6] - state[:-1, :6]
    return np.concatenate([movement, gripper[:-1]], axis=1), state[:-1]
  return np.concatenate([action[:, :6], gripper], axis=1), state


def standardize_fractal(raw: Mapping[str, np.ndarray]):
  """RT-1: action = world_vector ‖ rotation_delta ‖ absolute gripper; state = pose (7) ‖ closed."""
  gripper = relative_to_absolute_gripper(raw["action/gripper_closedness_action"][:, 0])
  actions = np.concatenate([raw["action/world_vector"], raw["action/rotation_delta"],
                            gripper[:, None]], axis=1).astype(np.float32)
  states = np.concatenate([raw["observation/base_pose_tool_reached"],
                           raw["observation/gripper_closed"]], axis=1).astype(np.float32)
  return actions, states


_BRIDGE = dict(
    image_keys=("image_0", "image_1", "image_2", "image_3"),
    image_shape=(256, 256),
    language_key="language_instruction",
    lowdim_keys={"action": (7,), "observation/state": (7,)},
    standardize=functools.partial(standardize_bridge, relabel_actions=True),
    action_dim=7, state_dim=7,
    action_normalize_mask=(True,) * 6 + (False,),
    action_binarize_mask=(False,) * 6 + (True,),
    state_normalize_mask=(True,) * 7,
)

OXE_DATASETS: dict[str, DatasetSpec] = {
    "bridge_dataset": DatasetSpec(name="bridge_dataset", **_BRIDGE),
    "bridge_orig": DatasetSpec(name="bridge_orig", **_BRIDGE),
    "fractal20220817_data": DatasetSpec(
        name="fractal20220817_data",
        image_keys=("image",),
        image_shape=(256, 320),
        language_key="observation/natural_language_instruction",
        lowdim_keys={"action/world_vector": (3,), "action/rotation_delta": (3,),
                     "action/gripper_closedness_action": (1,),
                     "observation/base_pose_tool_reached": (7,),
                     "observation/gripper_closed": (1,)},
        standardize=standardize_fractal,
        action_dim=7, state_dim=8,
        action_normalize_mask=(True,) * 6 + (False,),
        action_binarize_mask=(False,) * 6 + (True,),
        state_normalize_mask=(True,) * 8,
    ),
}


# Meta-World demonstrations (scripts/make_metaworld_dataset.py, twinbrain_jax/sim/metaworld.py),
# written in LeRobot's contract: camera `image` (corner2, upright, 112x112 as the maker writes by
# default), state = hand xyz ‖ gripper opening, action = xyz delta ‖ gripper effort. The actions
# are already in [-1, 1] and kept as they are: no relabelling, no normalisation, and no
# binarisation (the effort is continuous, -1 opens).
def standardize_metaworld(raw: Mapping[str, np.ndarray]):
  """Meta-World: action (4) and state (4) as recorded."""
  return raw["action"].astype(np.float32), raw["observation/state"].astype(np.float32)


OXE_DATASETS["metaworld"] = DatasetSpec(
    name="metaworld", image_keys=("image",), image_shape=(112, 112),
    language_key="language_instruction",
    lowdim_keys={"action": (4,), "observation/state": (4,)},
    standardize=standardize_metaworld, action_dim=4, state_dim=4,
    action_normalize_mask=(False,) * 4, action_binarize_mask=(False,) * 4,
    state_normalize_mask=(True,) * 4)


# Meta-World questions and answers (scripts/make_vqa_dataset.py, twinbrain_jax/sim/vqa.py): one
# step per question about a rendered scene; the question is the language key, the answer, its
# type and its choices are step texts (`Episode.text`). It has no actions (action_dim 0): a VLM
# loss reads image, question and answer; the state is the scene's hand xyz ‖ gripper opening.
def standardize_vqa(raw: Mapping[str, np.ndarray]):
  """Meta-World VQA: no actions `[T, 0]`; the state (4) as recorded."""
  states = raw["observation/state"].astype(np.float32)
  return np.zeros((len(states), 0), np.float32), states


OXE_DATASETS["metaworld_vqa"] = DatasetSpec(
    name="metaworld_vqa", image_keys=("image",), image_shape=(112, 112), language_key="question",
    lowdim_keys={"observation/state": (4,)}, standardize=standardize_vqa, action_dim=0,
    state_dim=4, action_normalize_mask=(), action_binarize_mask=(),
    state_normalize_mask=(True,) * 4, text_keys=("answer", "question_type", "choices"))


def get_spec(name: str) -> DatasetSpec:
  """The registry entry of `name`; an unknown name lists the known ones."""
  if name not in OXE_DATASETS:
    raise UnknownDatasetError(
        f"Dataset {name!r} is not in the OXE registry (twinbrain_jax/data/oxe_registry.py); "
        f"known: {', '.join(sorted(OXE_DATASETS))}. Add a DatasetSpec entry to OXE_DATASETS.")
  return OXE_DATASETS[name]
