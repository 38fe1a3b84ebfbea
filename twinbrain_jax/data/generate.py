"""Small synthetic RLDS datasets in the exact bridge and fractal (RT-1) TFDS schemas.

They are real TFDS builders written in the ArrayRecord format, read back with
`builder.as_data_source()` like the published data. Images are JPEG-encoded here with PIL (TFDS
needs TensorFlow to encode numpy images, not to store encoded bytes). Contents are a smooth random
walk of the end effector with gripper commands that exercise the OXE gripper transforms.

`faults` injects bad input for tests: {"nan_action": episode, "inf_state": episode,
"empty": episode, "state_dim": 6, "drop_key": "observation/state"}, and the awkward but valid
episodes that real downloads hold: {"one_step": episode (a single step), "truncated": episode
(ends without `is_terminal`), "empty_instruction": episode}.

`file_format="tfrecord"` writes the published OXE layout (needs TensorFlow, the `tf` extra).
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

BRIDGE = "bridge_dataset"
FRACTAL = "fractal20220817_data"
_INSTRUCTIONS = ("put the spoon on the towel", "pick up the red block", "open the drawer",
                 "move the cup to the left", "close the microwave", "wipe the table")


def _jpeg(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def _frame(rng: np.random.Generator, shape: tuple[int, int], t: int) -> np.ndarray:
  """A cheap structured image: a colour gradient with a moving square."""
  h, w = shape
  base = rng.integers(0, 256, size=3)
  ys = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
  xs = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
  image = (base * (0.5 + 0.25 * ys + 0.25 * xs)).astype(np.uint8)
  image = np.broadcast_to(image, (h, w, 3)).copy()
  y0, x0 = (7 * t) % (h - 32), (11 * t) % (w - 32)
  image[y0:y0 + 32, x0:x0 + 32] = 255 - base
  return image


def _set(step: dict, path: str, value):
  *parents, leaf = path.split("/")
  for p in parents:
    step = step[p]
  step[leaf] = value


def _drop(features: dict, path: str):
  *parents, leaf = path.split("/")
  node = features
  for p in parents:
    node = node[p]
  del node[leaf]


def _bridge_steps_features(state_dim: int) -> dict:
  image = lambda: tfds.features.Image(shape=(256, 256, 3), dtype=np.uint8,
                                      encoding_format="jpeg")
  return {
      "observation": {
          "image_0": image(), "image_1": image(), "image_2": image(), "image_3": image(),
          "state": tfds.features.Tensor(shape=(state_dim,), dtype=np.float32),
      },
      "action": tfds.features.Tensor(shape=(7,), dtype=np.float32),
      "discount": tfds.features.Scalar(dtype=np.float32),
      "reward": tfds.features.Scalar(dtype=np.float32),
      "is_first": tfds.features.Scalar(dtype=np.bool_),
      "is_last": tfds.features.Scalar(dtype=np.bool_),
      "is_terminal": tfds.features.Scalar(dtype=np.bool_),
      "language_instruction": tfds.features.Text(),
      "language_embedding": tfds.features.Tensor(shape=(512,), dtype=np.float32),
  }


def _fractal_steps_features(state_dim: int) -> dict:
  f32 = lambda *shape: tfds.features.Tensor(shape=shape, dtype=np.float32)
  return {
      "observation": {
          "image": tfds.features.Image(shape=(256, 320, 3), dtype=np.uint8,
                                       encoding_format="jpeg"),
          "natural_language_instruction": tfds.features.Text(),
          "natural_language_embedding": f32(512),
          "base_pose_tool_reached": f32(state_dim),
          "gripper_closed": f32(1),
          "gripper_closedness_commanded": f32(1),
          "height_to_bottom": f32(1),
          "orientation_box": f32(2, 3),
          "orientation_start": f32(4),
          "robot_orientation_positions_box": f32(3, 3),
          "rotation_delta_to_go": f32(3),
          "src_rotation": f32(4),
          "vector_to_go": f32(3),
          "workspace_bounds": f32(3, 3),
      },
      "action": {
          "base_displacement_vector": f32(2),
          "base_displacement_vertical_rotation": f32(1),
          "gripper_closedness_action": f32(1),
          "rotation_delta": f32(3),
          "terminate_episode": tfds.features.Tensor(shape=(3,), dtype=np.int32),
          "world_vector": f32(3),
      },
      "reward": tfds.features.Scalar(dtype=np.float32),
      "discount": tfds.features.Scalar(dtype=np.float32),
      "is_first": tfds.features.Scalar(dtype=np.bool_),
      "is_last": tfds.features.Scalar(dtype=np.bool_),
      "is_terminal": tfds.features.Scalar(dtype=np.bool_),
  }


class _SyntheticRlds(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared generator logic; subclasses set `name`, `VERSION` and the schema."""

  # No checksums/metadata files ship with these builders; without this TFDS looks them up through
  # `importlib_resources`, which is not a dependency.
  code_path = None

  def __init__(self, *, num_episodes: int, min_steps: int, max_steps: int, seed: int,
               faults: Mapping | None = None, **kwargs):
    self._num_episodes, self._min_steps, self._max_steps = num_episodes, min_steps, max_steps
    self._seed, self._faults = seed, dict(faults or {})
    super().__init__(**kwargs)

  def _steps_features(self, state_dim: int) -> dict:
    raise NotImplementedError

  def _info(self):
    steps = self._steps_features(int(self._faults.get("state_dim", self._default_state_dim)))
    if "drop_key" in self._faults:
      _drop(steps, self._faults["drop_key"])
    features = {"steps": tfds.features.Dataset(steps)}
    if self._episode_metadata() is not None:
      features["episode_metadata"] = self._episode_metadata()
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                 description="Synthetic data in an Open-X-Embodiment schema.",
                                 # Records in generation order: episode i is record i.
                                 disable_shuffling=True)

  def _episode_metadata(self):
    return None

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _episode_length(self, rng, episode):
    length = int(rng.integers(self._min_steps, self._max_steps + 1))
    if self._faults.get("empty") == episode:
      return 0
    return 1 if self._faults.get("one_step") == episode else length

  def _generate_examples(self):
    for episode in range(self._num_episodes):
      rng = np.random.default_rng([self._seed, episode])
      length = self._episode_length(rng, episode)
      steps = self._episode_steps(rng, episode, length)
      if steps and self._faults.get("nan_action") == episode:
        self._poison(steps[len(steps) // 2], "action", np.nan)
      if steps and self._faults.get("inf_state") == episode:
        self._poison(steps[len(steps) // 2], self._state_key, np.inf)
      if steps and self._faults.get("truncated") == episode:
        steps[-1]["is_terminal"] = False  # Cut by a time limit: last, not terminal.
      if self._faults.get("empty_instruction") == episode:
        for step in steps:
          _set(step, self._language_key, "")
      for key in [self._faults.get("drop_key")] if "drop_key" in self._faults else []:
        for step in steps:
          _drop(step, key)
      example = {"steps": steps}
      if self._episode_metadata() is not None:
        example["episode_metadata"] = self._metadata_values(episode)
      yield f"episode_{episode:06d}", example

  @staticmethod
  def _poison(step: dict, key: str, value: float):
    node = step
    *parents, leaf = key.split("/")
    for p in parents:
      node = node[p]
    if isinstance(node[leaf], dict):  # fractal's action dict: poison the world vector.
      node, leaf = node[leaf], "world_vector"
    node[leaf] = np.array(node[leaf], np.float32)
    node[leaf][0] = value


def _walk(rng, length, dim, scale=0.02):
  return np.cumsum(rng.normal(scale=scale, size=(length, dim)), axis=0).astype(np.float32)


class BridgeRlds(_SyntheticRlds, skip_registration=True):
  """bridge_dataset 1.0.0 schema (4 cameras `image_0..3` 256x256, 7-D state and action)."""
  name = BRIDGE
  VERSION = tfds.core.Version("1.0.0")
  _default_state_dim = 7
  _state_key = "observation/state"
  _language_key = "language_instruction"

  def _steps_features(self, state_dim):
    return _bridge_steps_features(state_dim)

  def _episode_metadata(self):
    return tfds.features.FeaturesDict({
        "file_path": tfds.features.Text(),
        "episode_id": tfds.features.Scalar(dtype=np.int32),
        "has_image_0": tfds.features.Scalar(dtype=np.bool_),
        "has_image_1": tfds.features.Scalar(dtype=np.bool_),
        "has_image_2": tfds.features.Scalar(dtype=np.bool_),
        "has_image_3": tfds.features.Scalar(dtype=np.bool_),
        "has_language": tfds.features.Scalar(dtype=np.bool_),
    })

  def _metadata_values(self, episode):
    return dict(file_path=f"synthetic/bridge/{episode}", episode_id=episode, has_image_0=True,
                has_image_1=True, has_image_2=False, has_image_3=False, has_language=True)

  def _episode_steps(self, rng, episode, length):
    state_dim = int(self._faults.get("state_dim", 7))
    state = _walk(rng, length, state_dim)
    # Gripper: open (1), closed (0) and in-between values that the OXE transform resolves.
    gripper = rng.choice(np.array([0.0, 1.0, 0.5, 0.98, 0.02], np.float32), size=length)
    action = np.concatenate([rng.normal(scale=0.02, size=(length, 6)), gripper[:, None]],
                            axis=1).astype(np.float32)
    instruction = _INSTRUCTIONS[episode % len(_INSTRUCTIONS)]
    black = _jpeg(np.zeros((256, 256, 3), np.uint8))
    steps = []
    for t in range(length):
      steps.append({
          "observation": {"image_0": _jpeg(_frame(rng, (256, 256), t)),
                          "image_1": _jpeg(_frame(rng, (256, 256), t + 3)),
                          "image_2": black, "image_3": black, "state": state[t]},
          "action": action[t], "discount": 1.0, "reward": float(t == length - 1),
          "is_first": t == 0, "is_last": t == length - 1, "is_terminal": t == length - 1,
          "language_instruction": instruction,
          "language_embedding": np.zeros(512, np.float32),
      })
    return steps


class FractalRlds(_SyntheticRlds, skip_registration=True):
  """fractal20220817_data 0.1.0 schema (camera `image` 256x320, nested action dict)."""
  name = FRACTAL
  VERSION = tfds.core.Version("0.1.0")
  _default_state_dim = 7
  _state_key = "observation/base_pose_tool_reached"
  _language_key = "observation/natural_language_instruction"

  def _steps_features(self, state_dim):
    return _fractal_steps_features(state_dim)

  def _episode_steps(self, rng, episode, length):
    state_dim = int(self._faults.get("state_dim", 7))
    pose = _walk(rng, length, state_dim)
    # Relative gripper commands: mostly "no change", some close (> 0.1) and open (< -0.1).
    command = rng.choice(np.array([0.0, 0.0, 0.0, 1.0, -1.0, 0.05], np.float32), size=length)
    closed = (np.cumsum(command) > 0).astype(np.float32)
    instruction = _INSTRUCTIONS[(episode + 2) % len(_INSTRUCTIONS)]
    z = lambda *shape: np.zeros(shape, np.float32)
    steps = []
    for t in range(length):
      steps.append({
          "observation": {
              "image": _jpeg(_frame(rng, (256, 320), t)),
              "natural_language_instruction": instruction,
              "natural_language_embedding": z(512),
              "base_pose_tool_reached": pose[t],
              "gripper_closed": np.array([closed[t]], np.float32),
              "gripper_closedness_commanded": np.array([command[t]], np.float32),
              "height_to_bottom": z(1), "orientation_box": z(2, 3), "orientation_start": z(4),
              "robot_orientation_positions_box": z(3, 3), "rotation_delta_to_go": z(3),
              "src_rotation": z(4), "vector_to_go": z(3), "workspace_bounds": z(3, 3),
          },
          "action": {
              "base_displacement_vector": z(2), "base_displacement_vertical_rotation": z(1),
              "gripper_closedness_action": np.array([command[t]], np.float32),
              "rotation_delta": rng.normal(scale=0.05, size=3).astype(np.float32),
              "terminate_episode": np.array([0, 1, 0] if t < length - 1 else [1, 0, 0],
                                            np.int32),
              "world_vector": rng.normal(scale=0.03, size=3).astype(np.float32),
          },
          "reward": float(t == length - 1), "discount": 1.0,
          "is_first": t == 0, "is_last": t == length - 1, "is_terminal": t == length - 1,
      })
    return steps


_BUILDERS = {BRIDGE: BridgeRlds, FRACTAL: FractalRlds}


def generate_dataset(kind: str, data_dir: str, *, num_episodes: int = 8, min_steps: int = 6,
                     max_steps: int = 12, seed: int = 0, faults: Mapping | None = None,
                     file_format: str = "array_record", num_shards: int | None = None) -> str:
  """Writes a synthetic RLDS dataset and returns its TFDS version directory.

  Args:
    kind: "bridge_dataset" or "fractal20220817_data" (the schema).
    data_dir: TFDS data dir; the dataset lands in `<data_dir>/<kind>/<version>/`.
    num_episodes, min_steps, max_steps: size; episode lengths are uniform in the range.
    seed: contents seed.
    faults: bad input to inject (see the module docstring).
    file_format: "array_record", or "tfrecord" as OXE is published (needs TensorFlow).
    num_shards: shards per split (None: TFDS decides by size, 1 for small data).
  """
  if kind not in _BUILDERS:
    raise ValueError(f"Unknown schema {kind!r}; choose one of: {', '.join(_BUILDERS)}.")
  builder = _BUILDERS[kind](num_episodes=num_episodes, min_steps=min_steps, max_steps=max_steps,
                            seed=seed, faults=faults, data_dir=data_dir, file_format=file_format)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(verify_ssl=False, num_shards=num_shards))
  return str(builder.data_path)
