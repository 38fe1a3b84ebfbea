"""Writes small LeRobot datasets with LeRobot's own code, and what its `LeRobotDataset` returns.

Runs in LeRobot's own environments, not the project's (lerobot pins torch, numpy and PyAV
where the project's lock cannot follow): lerobot 0.4.4 (requirements/lerobot-0.4.4.txt) writes
v3.0, lerobot 0.3.3 (requirements/lerobot-0.3.3.txt) writes v2.1:

  python3.11 -m venv .venv-lerobot && .venv-lerobot/bin/pip install --no-deps \
      -r requirements/lerobot-0.4.4.txt
  .venv-lerobot/bin/python scripts/make_lerobot_fixtures.py --out=tests/data/lerobot

(`make lerobot-fixtures` builds both environments, writes every dataset into a temporary
directory and runs the comparison tests on it.) The script writes the datasets of the codebase
version its lerobot writes. Under --out:
  v30_video/  v3.0, two cameras stored as AV1 videos (LeRobot's default encoder), episodes
              spread over several video files so that an episode starts inside a file; a
              1-frame episode; a task that changes inside an episode.
  v30_image/  v3.0, one camera stored as PNG images in the parquet, several episodes per data
              file and several data files.
  v21_video/  v2.1, two cameras stored as AV1 videos (one parquet and one mp4 per episode).
  <name>.reference.npz  for every frame of each dataset: index, episode_index, frame_index,
              timestamp, action, observation.state, task (as task_index into `tasks`); and for
              the frames in `frame_indices` (every third, and each episode's first and last),
              each camera's image as LeRobot returns it (float in [0, 1], here * 255 rounded to
              uint8: exact, the frames are 8-bit).
A dataset directory that exists is replaced only when the whole new one was written.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

FPS = 10
TASKS = ("pick up the red block", "push the button", "open the drawer")


def _frame(height: int, width: int, t: int, episode: int, camera: int) -> np.ndarray:
  """A smooth synthetic frame (gradients and a moving square), cheap to encode."""
  y, x = np.mgrid[0:height, 0:width]
  image = np.stack([(x * 4 + t * 9 + camera * 50) % 256, (y * 5 + episode * 40) % 256,
                    ((x + y) * 3 + t * 5) % 256], axis=-1)
  top, left = (t * 3) % max(1, height - 8), (t * 2 + episode * 5) % max(1, width - 8)
  image[top:top + 8, left:left + 8] = (255, 255 - 30 * camera, 40 * episode % 256)
  return image.astype(np.uint8)


def _features(cameras: dict, dtype: str) -> dict:
  features = {key: {"dtype": dtype, "shape": (h, w, 3), "names": ["height", "width", "channels"]}
              for key, (h, w) in cameras.items()}
  features["observation.state"] = {"dtype": "float32", "shape": (6,),
                                   "names": [f"joint_{i}" for i in range(6)]}
  features["action"] = {"dtype": "float32", "shape": (4,), "names": ["x", "y", "z", "gripper"]}
  return features


def _write(root: Path, cameras: dict, dtype: str, lengths, *, data_mb=None, video_mb=None,
           seed: int = 0):
  from lerobot.datasets.lerobot_dataset import LeRobotDataset
  v21 = _codebase_version() == "v2.1"
  rng = np.random.default_rng(seed)
  dataset = LeRobotDataset.create(repo_id=f"twinbrain/{root.name}", fps=FPS, root=root,
                                  features=_features(cameras, dtype), robot_type="synthetic",
                                  use_videos=dtype == "video")
  if data_mb or video_mb:
    dataset.meta.update_chunk_settings(data_files_size_in_mb=data_mb,
                                       video_files_size_in_mb=video_mb)
  for episode, length in enumerate(lengths):
    for t in range(length):
      # The task changes halfway through episode 2 (LeRobot keeps a task index per frame).
      task = TASKS[(episode + (t >= length // 2 and episode == 2)) % len(TASKS)]
      frame = {key: _frame(h, w, t, episode, i) for i, (key, (h, w)) in enumerate(cameras.items())}
      frame["observation.state"] = (np.sin(0.3 * t + np.arange(6)) + episode).astype(np.float32)
      frame["action"] = rng.uniform(-1, 1, 4).astype(np.float32)
      if v21:  # lerobot 0.3: the task is an argument.
        dataset.add_frame(frame, task=task)
      else:
        frame["task"] = task
        dataset.add_frame(frame)
    dataset.save_episode()
  if not v21:
    dataset.finalize()


def _codebase_version() -> str:
  from lerobot.datasets import lerobot_dataset
  return lerobot_dataset.CODEBASE_VERSION


def _dump(root: Path, out: Path):
  """What LeRobot's own reader returns for every frame (PyAV decoding, as lerobot falls back
  to without torchcodec)."""
  from lerobot.datasets.lerobot_dataset import LeRobotDataset
  dataset = LeRobotDataset(f"twinbrain/{root.name}", root=root, video_backend="pyav")
  tasks = sorted({dataset[i]["task"] for i in range(len(dataset))})
  columns = {k: [] for k in ("index", "episode_index", "frame_index", "timestamp", "action",
                             "observation.state", "task")}
  frames = {key: [] for key in dataset.meta.camera_keys}
  episodes = [int(dataset[i]["episode_index"]) for i in range(len(dataset))]
  boundaries = {i for i in range(len(dataset))
                if i in (0, len(dataset) - 1) or episodes[i] != episodes[i - 1]
                or episodes[i] != episodes[i + 1]}
  frame_indices = sorted(boundaries | set(range(0, len(dataset), 3)))
  for i in range(len(dataset)):
    item = dataset[i]
    for key in columns:
      columns[key].append(tasks.index(item[key]) if key == "task" else np.asarray(item[key]))
    if i not in frame_indices:
      continue
    for key in frames:
      chw = np.asarray(item[key], np.float32)
      frames[key].append(np.rint(chw.transpose(1, 2, 0) * 255).astype(np.uint8))
  arrays = {k: np.stack(v) for k, v in columns.items()}
  arrays.update({f"frame/{k}": np.stack(v) for k, v in frames.items()})
  arrays["tasks"] = np.array(tasks)
  arrays["frame_indices"] = np.array(frame_indices)
  np.savez_compressed(out, **arrays)


DATASETS = {
    # Two cameras of different sizes; video files hold ~2 episodes each.
    "v30_video": dict(cameras={"observation.images.top": (40, 48),
                               "observation.images.wrist": (32, 32)},
                      dtype="video", lengths=(12, 1, 9, 15, 7), video_mb=0.007, seed=1),
    "v30_image": dict(cameras={"observation.image": (32, 40)}, dtype="image",
                      lengths=(6, 8, 5, 7, 9, 4), data_mb=0.008, seed=2),
    "v21_video": dict(cameras={"observation.images.top": (40, 48),
                               "observation.images.wrist": (32, 32)},
                      dtype="video", lengths=(10, 1, 8, 6), seed=3),
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="Directory to write the datasets into.")
  args = parser.parse_args()
  version = _codebase_version()
  prefix = "v" + version[1:].replace(".", "")
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  for name in sorted(n for n in DATASETS if n.startswith(prefix + "_")):
    spec = DATASETS[name]
    with tempfile.TemporaryDirectory(dir=out) as tmp:
      root = Path(tmp) / name
      _write(root, spec["cameras"], spec["dtype"], spec["lengths"], data_mb=spec.get("data_mb"),
             video_mb=spec.get("video_mb"), seed=spec["seed"])
      _dump(root, Path(tmp) / f"{name}.reference.npz")
      if (out / name).exists():
        shutil.rmtree(out / name)
      shutil.move(str(root), str(out / name))
      shutil.move(str(Path(tmp) / f"{name}.reference.npz"), str(out / f"{name}.reference.npz"))
    files = sorted(p.relative_to(out / name) for p in (out / name).rglob("*") if p.is_file())
    size = sum((out / name / f).stat().st_size for f in files)
    info = json.loads((out / name / "meta" / "info.json").read_text())
    print(f"{name}: {info['codebase_version']}, {info['total_episodes']} episodes, "
          f"{info['total_frames']} frames, {size / 1024:.0f} kB in {len(files)} files")
    for f in files:
      print(f"  {f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
