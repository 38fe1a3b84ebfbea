"""Training on a LeRobot dataset (video cameras, written by lerobot 0.4.4): a few steps, and a
run stopped and resumed reproduces the uninterrupted one exactly (data position included).

Slow (three short runs, each compiling the step: ~6 min on 2 busy cores); the default run
checks the LeRobot data position's exact restore in test_data_lerobot.py and the loop's exact
resume on RLDS in test_training_loop.py."""

import pathlib

import absl.flags
import jax
import numpy as np
import pytest

from fixtures_training import tiny_config
from twinbrain_jax.training import demo_data, loop

absl.flags.FLAGS.mark_as_parsed()  # grain reads absl flags.

FIXTURES = pathlib.Path(__file__).parent / "data" / "lerobot"


def _config(tmp_path, name, camera):
  config = tiny_config((8, 1, 1))
  demo_data.write_tokenizer(str(tmp_path / "tokenizer"), config.model, demo_data.CORPUS)
  config.init.tokenizer = str(tmp_path / "tokenizer")
  config.data.update(
      datasets=(dict(name="so100_like", format="lerobot", dir=str(FIXTURES / name),
                     cameras=(camera,), state="observation.state", action="action"),),
      weights=(1.0,), data_dir=None, stats_dir=str(tmp_path / "stats"),
      state_dim=config.model.state_dim, action_dim=config.model.action_expert.action_dim)
  config.train.update(num_steps=4, log_every=1, progress_bar=False, eval_data_dir=None)
  config.checkpoint.update(every=2, keep_last=5)
  return config


@pytest.mark.slow
@pytest.mark.parametrize("name, camera", [("v30_image", "observation.image"),
                                          ("v21_video", "observation.images.top")])
def test_a_few_steps_on_the_other_layouts(tmp_path, name, camera):
  """Image cameras with several episodes per file (v3.0), and v2.1's one file per episode."""
  config = _config(tmp_path, name, camera)
  config.train.num_steps = 2
  result = loop.train(config, str(tmp_path / "run"))
  assert sorted(result.losses) == [1, 2]
  assert all(np.isfinite(loss) for loss in result.losses.values())


@pytest.mark.slow
def test_train_on_a_lerobot_dataset_and_resume_exactly(tmp_path):
  config = _config(tmp_path, "v30_video", "observation.images.top")
  whole = loop.train(config, str(tmp_path / "whole"))
  assert sorted(whole.losses) == [1, 2, 3, 4]
  assert all(np.isfinite(loss) for loss in whole.losses.values())
  first = loop.train(config, str(tmp_path / "split"), stop_after=2)
  resumed = loop.train(config, str(tmp_path / "split"))
  assert first.final_step == 2 and resumed.start_step == 2 and resumed.final_step == 4
  assert {**first.losses, **resumed.losses} == whole.losses
  for got, want in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(whole.state.params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
