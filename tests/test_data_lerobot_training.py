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

FIXTURE = pathlib.Path(__file__).parent / "data" / "lerobot" / "v30_video"


@pytest.mark.slow
def test_train_on_a_lerobot_dataset_and_resume_exactly(tmp_path):
  config = tiny_config((8, 1, 1))
  demo_data.write_tokenizer(str(tmp_path / "tokenizer"), config.model, demo_data.CORPUS)
  config.init.tokenizer = str(tmp_path / "tokenizer")
  config.data.update(
      datasets=(dict(name="so100_like", format="lerobot", dir=str(FIXTURE),
                     cameras=("observation.images.top",), state="observation.state",
                     action="action"),),
      weights=(1.0,), data_dir=None, stats_dir=str(tmp_path / "stats"),
      state_dim=config.model.state_dim, action_dim=config.model.action_expert.action_dim)
  config.train.update(num_steps=4, log_every=1, progress_bar=False, eval_data_dir=None)
  config.checkpoint.update(every=2, keep_last=5)
  whole = loop.train(config, str(tmp_path / "whole"))
  assert sorted(whole.losses) == [1, 2, 3, 4]
  assert all(np.isfinite(loss) for loss in whole.losses.values())
  first = loop.train(config, str(tmp_path / "split"), stop_after=2)
  resumed = loop.train(config, str(tmp_path / "split"))
  assert first.final_step == 2 and resumed.start_step == 2 and resumed.final_step == 4
  assert {**first.losses, **resumed.losses} == whole.losses
  for got, want in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(whole.state.params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
