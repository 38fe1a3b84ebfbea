"""Meta-World demonstrations written in both formats give the same training batches; the LeRobot
writer's output reads back exactly."""

import os
import pathlib
import sys

# Offscreen rendering without a display; must be set before mujoco is imported.
os.environ.setdefault("MUJOCO_GL", "egl")

import grain  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from processes import run  # noqa: E402
from tests.fixtures_data import small_config  # noqa: E402
from twinbrain_jax.data import config as data_config  # noqa: E402
from twinbrain_jax.data import oxe_registry, pipeline  # noqa: E402
from twinbrain_jax.sim import metaworld as mw  # noqa: E402
from twinbrain_jax.sim import metaworld_dataset as mwd  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high")

SIZE = oxe_registry.get_spec(mwd.NAME).image_shape
TASKS = "reach-v3,button-press-topdown-v3"  # Short expert episodes, two instructions.


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The same expert episodes as `metaworld` (RLDS) and `metaworld_lerobot` (LeRobot)."""
  directory = str(tmp_path_factory.mktemp("mw"))
  for data_format in mwd.FORMATS:
    mwd.write_dataset(directory, TASKS, episodes_per_task=2, image_size=SIZE,
                      data_format=data_format)
  return directory


def _config(data_dir, data_format, tmp_path, **overrides):
  entry = mwd.lerobot_entry() if data_format == "lerobot" else mwd.NAME
  return small_config(data_dir, datasets=(entry,), weights=(1.0,), image_size=(48, 48),
                      stats_dir=str(tmp_path / data_format), **overrides)


def test_both_formats_give_the_same_training_batches(data_dir, tmp_path):
  """Shuffled, augmented training batches: equal in every key but the episode's name (RLDS
  names it `<task>/seed_<seed>`, LeRobot has only its index)."""
  shard = grain.sharding.ShardOptions(0, 1)
  pipes = {f: pipeline.DataPipeline(_config(data_dir, f, tmp_path, **{"augment.enabled": True}),
                                    shard_options=shard) for f in mwd.FORMATS}
  rlds_stats, lerobot_stats = (pipes[f].entries[0].stats for f in mwd.FORMATS)
  assert rlds_stats.episode_lengths == lerobot_stats.episode_lengths
  np.testing.assert_array_equal(rlds_stats.state.q99, lerobot_stats.state.q99)
  instructions = set()
  for index in range(6):
    rlds_batch, lerobot_batch = (pipes[f].batches[index] for f in mwd.FORMATS)
    assert set(rlds_batch) == set(lerobot_batch)
    for key in rlds_batch:
      if key != "episode_id":
        np.testing.assert_array_equal(rlds_batch[key], lerobot_batch[key], err_msg=key)
    assert all(e.startswith(("reach-v3/seed_", "button-press-topdown-v3/seed_"))
               for e in rlds_batch["episode_id"])
    assert all(e.startswith("episode ") for e in lerobot_batch["episode_id"])
    instructions.update(rlds_batch["instruction"].tolist())
  assert instructions <= set(mw.INSTRUCTIONS.values()) and len(instructions) == 2


def test_the_lerobot_copy_holds_the_recorded_episodes(data_dir):
  """Frames (PNG, lossless), states, actions and tasks of the LeRobot copy equal the RLDS ones."""
  config = small_config(data_dir, datasets=(mwd.NAME, mwd.lerobot_entry()), weights=())
  with pytest.raises(ValueError, match="names 'metaworld' twice"):
    data_config.dataset_entries(config)
  config.datasets = (mwd.NAME,)
  rlds_source = data_config.dataset_entries(config)[0].open(data_dir, "train", 1)
  config.datasets = (mwd.lerobot_entry(),)
  lerobot_source = data_config.dataset_entries(config)[0].open(data_dir, "train", 1)
  assert lerobot_source.version == "v3.0" and lerobot_source.fps == mwd.FPS
  assert len(rlds_source) == len(lerobot_source) == 4
  for index in range(4):
    a, b = rlds_source.episode(index), lerobot_source.episode(index)
    assert len(a) == len(b)
    for key, values in a.lowdim().items():
      np.testing.assert_array_equal(values, b.lowdim()[key])
    for t in (0, len(a) - 1):
      np.testing.assert_array_equal(a.image(t, "image"), b.image(t, mwd.LEROBOT_CAMERA))
      assert a.instruction(t) == b.instruction(t)


def test_script_writes_the_lerobot_format_and_says_how_to_train(tmp_path):
  done = run([sys.executable, "scripts/make_metaworld_dataset.py", f"--data_dir={tmp_path}",
              "--tasks=reach-v3", "--episodes_per_task=1", "--image_size=32", "--format=lerobot"],
             tmp_path / "log", cwd=pathlib.Path(__file__).resolve().parents[1])
  assert done.returncode == 0, done.stderr[-3000:]
  assert (tmp_path / mwd.LEROBOT_DIR / "meta" / "info.json").is_file()
  assert not (tmp_path / mwd.NAME).exists()
  assert f"--config.data.datasets=({mwd.lerobot_entry()!r},)" in done.stdout
  assert "registry entry" not in done.stdout  # The LeRobot reader takes any frame size.

