"""Observation conventions of the clients people already use, as data (key maps).

A format says where a client puts each part of one observation; `to_policy_observation` turns
such an observation into the policy's own (`serving.policy`: image / state / instruction),
before `Policy.check` validates it. The layouts are those of openpi's example clients
(`examples/libero`, `examples/droid`, `examples/aloha_*`, `examples/simple_client`):

    twinbrain  the policy's own keys (see `serving.policy`), passed through unchanged
    libero     observation/image (base), observation/wrist_image   uint8 [H, W, 3]
               observation/state [8]                               prompt
    droid      observation/exterior_image_1_left (base), observation/wrist_image_left
               state = observation/joint_position [7] ‖ observation/gripper_position [1] or []
               prompt
    aloha      images = {cam_high (base), cam_low, cam_left_wrist, cam_right_wrist}
               uint8 [3, H, W] (channels first)                    state [14]   prompt

Cameras are listed primary first; the model reads the first `data.num_cameras` of those sent
(the primary is required, the others are checked when present). The optional keys `dataset`,
`seed` and `new_episode` pass through under their own names in every format. The reply is the
same in every format: `actions [T, A]` (the dataset's raw action units and width, as openpi's
clients read them) and `server_timing`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from twinbrain_jax.serving.policy import ObservationError, check_camera, state_array

KeyPath = tuple[str, ...]  # ("images", "cam_high") is observation["images"]["cam_high"].
PASSTHROUGH_KEYS = ("dataset", "seed", "new_episode")


@dataclasses.dataclass(frozen=True)
class Camera:
  """One camera of a format: its role (base, wrist, ...) and where the client puts it."""
  role: str
  path: KeyPath


@dataclasses.dataclass(frozen=True)
class ObservationFormat:
  """Where a client's observation keeps each part.

  Attributes:
    name: the `serve.py --obs_format` value.
    cameras: primary first; an empty tuple means the policy's own keys (no mapping).
    state: key paths of the state's parts, concatenated in this order (each a number or [n]).
    prompt: key path of the instruction string.
    channels_first: the images are [3, H, W] (openpi's ALOHA clients) instead of [H, W, 3].
  """
  name: str
  cameras: tuple[Camera, ...] = ()
  state: tuple[KeyPath, ...] = ()
  prompt: KeyPath = ()
  channels_first: bool = False

  @property
  def native(self) -> bool:
    return not self.cameras

  def describe(self) -> dict[str, str]:
    """Key -> what it holds, for the server's metadata (the native format's keys are the
    policy's, described by `Policy.metadata`)."""
    if self.native:
      return {}
    layout = "[3, H, W]" if self.channels_first else "[H, W, 3]"
    keys = {_name(c.path): f"uint8 RGB {layout}, camera '{c.role}'"
                           + (" (primary, required)" if i == 0 else " (optional)")
            for i, c in enumerate(self.cameras)}
    keys.update({_name(p): f"float, state part {i + 1} of {len(self.state)} (raw units)"
                 for i, p in enumerate(self.state)})
    keys[_name(self.prompt)] = "str, the instruction"
    keys.update(dataset="str, optional", seed="int in [0, 2**32), optional")
    return keys

  def explain(self, error: ObservationError) -> ObservationError:
    """A `Policy.check` error (in the policy's key names) with this layout's names added."""
    if self.native:
      return error
    cameras = ", ".join(_name(c.path) for c in self.cameras)
    state = " ‖ ".join(_name(p) for p in self.state)
    return ObservationError(f"{error} (in the {self.name} layout 'image' is [{cameras}], "
                            f"'state' is {state}, 'instruction' is {_name(self.prompt)})")


def _name(path: KeyPath) -> str:
  """A key path as a client reads it: "observation/image", "images['cam_high']"."""
  return path[0] + "".join(f"[{p!r}]" for p in path[1:])


def _where(path: KeyPath) -> str:
  """A key path as Python reads it: "observation['images']['cam_high']"."""
  return "observation" + "".join(f"[{p!r}]" for p in path)


FORMATS = {f.name: f for f in (
    ObservationFormat("twinbrain"),
    ObservationFormat(
        "libero",
        cameras=(Camera("base", ("observation/image",)),
                 Camera("wrist", ("observation/wrist_image",))),
        state=(("observation/state",),), prompt=("prompt",)),
    ObservationFormat(
        "droid",
        cameras=(Camera("base", ("observation/exterior_image_1_left",)),
                 Camera("wrist", ("observation/wrist_image_left",))),
        state=(("observation/joint_position",), ("observation/gripper_position",)),
        prompt=("prompt",)),
    ObservationFormat(
        "aloha",
        cameras=(Camera("base", ("images", "cam_high")), Camera("low", ("images", "cam_low")),
                 Camera("left_wrist", ("images", "cam_left_wrist")),
                 Camera("right_wrist", ("images", "cam_right_wrist"))),
        state=(("state",),), prompt=("prompt",), channels_first=True),
)}


def get_format(name: str) -> ObservationFormat:
  if name not in FORMATS:
    raise ValueError(f"Unknown observation format {name!r}; choose one of {sorted(FORMATS)}.")
  return FORMATS[name]


def _lookup(observation: Mapping[str, Any], path: KeyPath, fmt: ObservationFormat) -> Any:
  """The value at `path`; `KeyError` if any level is missing, `ObservationError` if a level
  that should hold keys is not a dict."""
  value: Any = observation
  for depth, key in enumerate(path):
    if not isinstance(value, Mapping):
      raise ObservationError(f"{_where(path[:depth])} is a {type(value).__name__}; "
                             f"the {fmt.name} format expects a dict there holding {key!r}.")
    value = value[key]
  return value


def _state_part(value: Any, where: str) -> np.ndarray:
  """A number or a 1-d array/list of numbers -> float64 [n]; `where` names it in errors."""
  array = state_array(value, where)
  if array.dtype.kind not in "fiu":
    raise ObservationError(f"{where} holds {array.dtype} values; send numbers.")
  if array.ndim > 1:
    raise ObservationError(f"{where} has shape {array.shape}; send a number or a flat "
                           "array [n].")
  return array.reshape(-1).astype(np.float64)


def to_policy_observation(fmt: ObservationFormat, observation: Any) -> Any:
  """A client's observation in `fmt` -> the policy's own keys (validated by `Policy.check`).

  Raises `ObservationError` naming the client's key for a missing or malformed part.
  """
  if fmt.native:
    return observation
  if not isinstance(observation, Mapping):
    raise ObservationError(f"The observation is a {type(observation).__name__}; send a dict "
                           f"laid out as openpi's {fmt.name} clients send it.")
  required = (fmt.cameras[0].path, *fmt.state, fmt.prompt)
  missing = []
  for path in required:
    try:
      _lookup(observation, path, fmt)
    except KeyError:
      missing.append(repr(path[0]) if len(path) == 1 else _name(path))
  if missing:
    raise ObservationError(
        f"The observation has no {', '.join(missing)} (got keys {sorted(map(str, observation))}); "
        f"the server expects the {fmt.name} layout: {', '.join(fmt.describe())}.")
  cameras = []
  for camera in fmt.cameras:
    try:
      image = _lookup(observation, camera.path, fmt)
    except KeyError:
      continue  # Optional camera (the primary was checked above).
    if fmt.channels_first:
      if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[0] != 3:
        raise ObservationError(
            f"{_where(camera.path)} has shape {getattr(image, 'shape', None)}; the "
            f"{fmt.name} format expects channels first, uint8 [3, H, W].")
      image = np.moveaxis(image, 0, -1)
    cameras.append(check_camera(image, _where(camera.path)))
  state = np.concatenate([_state_part(_lookup(observation, p, fmt), _where(p))
                          for p in fmt.state])
  converted = dict(image=cameras, state=state, instruction=_lookup(observation, fmt.prompt, fmt))
  converted.update({k: observation[k] for k in PASSTHROUGH_KEYS if k in observation})
  return converted
