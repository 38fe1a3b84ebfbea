"""The training loop on generated data: exact resume, preemption by SIGTERM, bad input."""

import os
import signal
import sys

import absl.flags
import jax
import numpy as np
import pytest

import processes
from fixtures_training import REPO, tiny_config
from twinbrain_jax.config_lib import ConfigError
from twinbrain_jax.training import demo_data, loop

absl.flags.FLAGS.mark_as_parsed()  # grain reads absl flags.


@pytest.fixture(scope="module")
def data_config(tmp_path_factory):
  """The tiny preset on generated bridge + fractal data and a synthetic tokenizer."""
  config = demo_data.prepare(tiny_config((8, 1, 1)), str(tmp_path_factory.mktemp("data")),
                             num_episodes=6, num_eval_episodes=2)
  config.train.update(num_steps=6, log_every=1, progress_bar=False)
  config.checkpoint.update(every=2, keep_last=5)
  return config


def test_stop_at_k_and_resume_reproduces_the_uninterrupted_losses(data_config, tmp_path):
  config = data_config.copy_and_resolve_references()
  config.train.eval_data_dir = None
  uninterrupted = loop.train(config, str(tmp_path / "a"))
  assert sorted(uninterrupted.losses) == [1, 2, 3, 4, 5, 6]
  first = loop.train(config, str(tmp_path / "b"), stop_after=3)
  assert first.final_step == 3 and not first.preempted
  resumed = loop.train(config, str(tmp_path / "b"))
  assert resumed.start_step == 3 and resumed.final_step == 6
  # Bit-exact: same params, optimizer state, data position and noise after the restore.
  assert {s: first.losses[s] for s in (1, 2, 3)} == {s: uninterrupted.losses[s] for s in (1, 2, 3)}
  assert resumed.losses == {s: uninterrupted.losses[s] for s in (4, 5, 6)}
  for got, want in zip(jax.tree.leaves(resumed.state.params),
                       jax.tree.leaves(uninterrupted.state.params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_sigterm_saves_and_the_rerun_resumes(data_config, tmp_path):
  workdir = tmp_path / "run"
  args = [sys.executable, "scripts/train.py", "--config=configs/twinbrain.py:tiny",
          f"--workdir={workdir}", f"--config.data.data_dir={data_config.data.data_dir}",
          f"--config.init.tokenizer={data_config.init.tokenizer}",
          "--config.train.progress_bar=False", "--config.checkpoint.every=2",
          "--config.train.log_every=1"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  first_checkpoint = workdir / "checkpoints" / "2"
  # The child is stopped (its whole group) when the block ends, also if an assertion fails.
  with processes.started(args + ["--config.train.num_steps=1000"], tmp_path / "first", cwd=REPO,
                         env=env) as run:
    run.wait_for(first_checkpoint.exists, "checkpoint 2")
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 0, run.stderr[-3000:]
    out = run.stdout
  line = [l for l in out.splitlines() if l.startswith("stopped at step")][-1]
  stopped = int(line.split()[3])
  assert "preempted=True" in line and 2 <= stopped < 1000
  assert (workdir / "checkpoints" / str(stopped)).exists()
  # The same command (with a closer end) continues from the saved step.
  done = processes.run(args + [f"--config.train.num_steps={stopped + 2}"], tmp_path / "second",
                       cwd=REPO, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"stopped at step {stopped + 2} (started at {stopped}, preempted=False)" in done.stdout


def test_batch_not_divisible_by_the_data_parallel_size(data_config, tmp_path):
  config = data_config.copy_and_resolve_references()
  config.data.batch_size = 12  # 8 data-parallel devices.
  with pytest.raises(ConfigError, match=r"data.batch_size=12 is not divisible by the "
                                        r"data-parallel size 8"):
    loop.train(config, str(tmp_path))
  config.data.batch_size = 8
  config.train.grad_accum_steps = 2
  with pytest.raises(ConfigError, match="grad_accum_steps=2; use a multiple of 16"):
    loop.train(config, str(tmp_path))


def test_unknown_preset_is_a_one_line_error():
  done = processes.run([sys.executable, "scripts/train.py", "--config=configs/twinbrain.py:huge",
                        "--workdir=/tmp/unused"], cwd=REPO,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode != 0
  assert "Unknown preset 'huge'" in done.stderr and "qwen25vl_3b" in done.stderr
  assert "Traceback" not in done.stderr
