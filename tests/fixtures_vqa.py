"""A tiny question-answer dataset in the `metaworld_vqa` schema, drawn without the simulator.

Each scene is a grey frame with one square; two question types whose answers the frame decides:
`left_right` (is the square left or right of the centre?) and `gripper` (is it red: "yes", or
blue: "no"?). Written through the corpus's own builder (`sim.vqa_dataset.VqaRlds`), so the
pipeline reads it exactly as the generated corpus.
"""

import numpy as np

from twinbrain_jax.sim import metaworld_dataset as mwd
from twinbrain_jax.sim import vqa_dataset as vd

SIZE = 112
QUESTIONS = dict(left_right=("Is the square to the left or to the right?", ("left", "right")),
                 gripper=("Is the gripper open?", ("yes", "no")))


def scene(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, str]]:
  """A frame `[SIZE, SIZE, 3]` uint8 and its answer per question type."""
  image = np.full((SIZE, SIZE, 3), 128, np.uint8)
  left, red = bool(rng.integers(2)), bool(rng.integers(2))
  x = int(rng.integers(4, SIZE // 2 - 36)) if left else int(rng.integers(SIZE // 2 + 4, SIZE - 36))
  y = int(rng.integers(4, SIZE - 36))
  image[y:y + 32, x:x + 32] = (220, 30, 30) if red else (30, 30, 220)
  return image, dict(left_right="left" if left else "right", gripper="yes" if red else "no")


def _episodes(split: str, num_scenes: int, seed: int):
  rng = np.random.default_rng(seed)
  for index in range(num_scenes):
    image, answers = scene(rng)
    png = mwd.png(image)
    steps = []
    for t, (name, (question, choices)) in enumerate(QUESTIONS.items()):
      steps.append({"observation": {"image": png, "state": np.zeros(4, np.float32)},
                    "question": question, "answer": answers[name], "question_type": name,
                    "choices": "|".join(choices), "is_first": t == 0,
                    "is_last": t == len(QUESTIONS) - 1})
    key = f"square/seed_{index}/step_0"
    yield key, {"steps": steps, "episode_metadata": {
        "episode_id": key, "task": "square", "seed": index, "step": 0, "split": split}}


def write_square_vqa(data_dir: str, train_scenes: int = 64, heldout_scenes: int = 16) -> str:
  """Writes `<data_dir>/metaworld_vqa/1.0.0/` (splits train and heldout); returns data_dir."""
  import tensorflow_datasets as tfds
  builder = vd.VqaRlds(image_size=(SIZE, SIZE), data_dir=data_dir, file_format="array_record",
                       splits={"train": _episodes("train", train_scenes, 0),
                               "heldout": _episodes("heldout", heldout_scenes, 1)})
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return data_dir
