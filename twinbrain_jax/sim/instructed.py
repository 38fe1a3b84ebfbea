"""Task families where the instruction decides: one first frame, K goals given only in words.

On MT10 the first frame already tells the task, so a policy can ignore its instruction. Here it
cannot: `reach-place` is Meta-World's reach-v3 scene (the puck and the arm; the goal marker is
hidden), and the goal is one of K named places around the puck, named only in the instruction:

  place   where the hand must go                  (image directions of the upright `corner2` frame)
  left    0.15 m to the left of the puck           the image's right axis, projected on the table
  right   0.15 m to the right of the puck
  front   0.15 m in front of the puck              toward the camera, projected on the table
  back    0.15 m behind the puck                   away from the camera
  all 0.07 m above the table (the puck is 2 cm high; the gripper starts 0.15 m high, so no
  place is reached at reset, and places are >= 0.21 m apart).

Success is Meta-World's own reach test (`info["success"]`: the gripper's tool centre within
0.05 m of the target) with the place as the target, so an instruction-blind policy can satisfy
at most one of the K instructions of a scene: its success rate falls to about 1/K. The seed
fixes the scene (puck position); the K instructions of one seed share the same first frame.
The scripted expert (`expert_action`) moves the tool centre straight to the place.

Each place has phrasings split in two: `seen` (the first one canonical) are the instructions of
the tasks `reach-place-<place>`, used for demonstrations and evaluation; `heldout` are the
instructions of `reach-place-<place>-heldout`, which only evaluation and the VQA corpus
(`sim/vqa.py`, as questions) use: `sim/metaworld_dataset.py` refuses to write them into VLA
training data. An episode's phrasing is picked by its seed (`InstructedTask.instruction`).

This module is data and geometry only (numpy); `sim/metaworld.py` builds the environments.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SEEN, HELDOUT = "seen", "heldout"
HELDOUT_SUFFIX = "-heldout"


@dataclasses.dataclass(frozen=True)
class Place:
  """A named goal relative to the family's anchor object.

  Attributes:
    name: "left", ...
    right: metres along the image's right axis (on the table plane).
    toward_camera: metres toward the camera (on the table plane).
    seen: phrasings used in demonstrations and evaluation; `seen[0]` is canonical.
    heldout: phrasings never used in VLA training data.
  """
  name: str
  right: float
  toward_camera: float
  seen: tuple[str, ...]
  heldout: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Family:
  """Places around one object of a Meta-World scene.

  Attributes:
    name: the group name ("reach-place"); its tasks are `<name>-<place>[-heldout]`.
    base_task: the Meta-World task whose scene, physics, scripted policy and success test are
      used (its goal is replaced by the place; its goal marker is hidden).
    anchor: the object the places are named after, as the instructions call it.
    height: z of every place (m).
    places: the K places.
  """
  name: str
  base_task: str
  anchor: str
  height: float
  places: tuple[Place, ...]

  def tasks(self, phrasing: str = SEEN) -> tuple[str, ...]:
    suffix = HELDOUT_SUFFIX if phrasing == HELDOUT else ""
    return tuple(f"{self.name}-{p.name}{suffix}" for p in self.places)


@dataclasses.dataclass(frozen=True)
class InstructedTask:
  """One place of a family with one set of phrasings (`seen` or `heldout`)."""
  name: str
  family: Family
  place: Place
  phrasing: str

  @property
  def phrasings(self) -> tuple[str, ...]:
    return self.place.seen if self.phrasing == SEEN else self.place.heldout

  @property
  def canonical(self) -> str:
    """The place's canonical instruction (`seen[0]`), whatever the phrasing set."""
    return self.place.seen[0]

  def instruction(self, seed: int) -> str:
    """The phrasing of the episode from `seed` (they take turns over consecutive seeds)."""
    return self.phrasings[int(seed) % len(self.phrasings)]

  def target(self, anchor: np.ndarray, right_axis: np.ndarray,
             toward_axis: np.ndarray) -> np.ndarray:
    """The place `[3]` (m) for the anchor object at `anchor` `[3]`; `right_axis`, `toward_axis`
    `[3]`: horizontal unit vectors (the image's right, toward the camera)."""
    xy = (np.asarray(anchor, np.float64)[:2] + self.place.right * np.asarray(right_axis)[:2]
          + self.place.toward_camera * np.asarray(toward_axis)[:2])
    return np.array([xy[0], xy[1], self.family.height])


_OFFSET = 0.15
REACH_PLACE = Family(
    name="reach-place", base_task="reach-v3", anchor="puck", height=0.07,
    places=(
        Place("left", -_OFFSET, 0.0,
              seen=("Reach to the left of the puck",
                    "Move the gripper to the left side of the puck",
                    "Put the hand just left of the puck"),
              heldout=("Go to the spot on the puck's left",
                       "Bring the gripper beside the puck on its left")),
        Place("right", _OFFSET, 0.0,
              seen=("Reach to the right of the puck",
                    "Move the gripper to the right side of the puck",
                    "Put the hand just right of the puck"),
              heldout=("Go to the spot on the puck's right",
                       "Bring the gripper beside the puck on its right")),
        Place("front", 0.0, _OFFSET,
              seen=("Reach in front of the puck", "Move the gripper to the front of the puck",
                    "Put the hand just in front of the puck"),
              heldout=("Go to the spot before the puck, nearer the camera",
                       "Bring the gripper to the near side of the puck")),
        Place("back", 0.0, -_OFFSET,
              seen=("Reach behind the puck", "Move the gripper to the back of the puck",
                    "Put the hand just behind the puck"),
              heldout=("Go to the spot past the puck, away from the camera",
                       "Bring the gripper to the far side of the puck")),
    ))

FAMILIES: dict[str, Family] = {REACH_PLACE.name: REACH_PLACE}

TASKS: dict[str, InstructedTask] = {
    f"{family.name}-{place.name}{HELDOUT_SUFFIX if phrasing == HELDOUT else ''}":
        InstructedTask(f"{family.name}-{place.name}{HELDOUT_SUFFIX if phrasing == HELDOUT else ''}",
                       family, place, phrasing)
    for family in FAMILIES.values() for place in family.places for phrasing in (SEEN, HELDOUT)}

# Task groups: "<family>" (seen phrasings) and "<family>-heldout".
GROUPS: dict[str, tuple[str, ...]] = {
    **{f.name: f.tasks(SEEN) for f in FAMILIES.values()},
    **{f"{f.name}{HELDOUT_SUFFIX}": f.tasks(HELDOUT) for f in FAMILIES.values()}}


# The tool centre (between the finger tips, what the success test measures) hangs this far below
# the end effector (`raw[:3]`) with the gripper open.
TCP_BELOW_HAND = 0.045
EXPERT_GAIN = 10.0


def expert_action(raw: np.ndarray) -> np.ndarray:
  """A family's scripted expert: Meta-World observation `[39]` (hand `raw[:3]`, place in the
  goal slot `raw[36:39]`) -> action `[4]`: the tool centre straight to the place, gripper open."""
  hand, place = np.asarray(raw[:3]), np.asarray(raw[36:39])
  delta = place + np.array([0.0, 0.0, TCP_BELOW_HAND]) - hand
  return np.append(np.clip(EXPERT_GAIN * delta, -1.0, 1.0), 0.0).astype(np.float32)


def heldout_tasks(tasks) -> tuple[str, ...]:
  """Those of `tasks` whose instructions are held-out phrasings."""
  return tuple(t for t in tasks if t in TASKS and TASKS[t].phrasing == HELDOUT)
