"""The training loop on generated data: exact resume, resume past a damaged step, preemption by
SIGTERM or SIGINT (also during start-up), bad input."""

import logging
import os
import pathlib
import shutil
import signal
import sys
import textwrap

import absl.flags
import jax
import numpy as np
import pytest

import processes
from fixtures_training import REPO, tiny_config
from twinbrain_jax.config_lib import ConfigError
from twinbrain_jax.training import checkpoint as checkpoint_lib
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


@pytest.fixture(scope="module")
def uninterrupted(data_config, tmp_path_factory):
  """Six steps in one go, checkpoints at 2, 4, 6: (config, workdir, result)."""
  config = data_config.copy_and_resolve_references()
  config.train.eval_data_dir = None
  workdir = tmp_path_factory.mktemp("uninterrupted")
  return config, workdir, loop.train(config, str(workdir))


def test_stop_at_k_and_resume_reproduces_the_uninterrupted_losses(uninterrupted, tmp_path):
  config, _, uninterrupted = uninterrupted
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


def test_resume_skips_a_damaged_latest_step_and_sets_it_aside(uninterrupted, tmp_path, caplog):
  config, first_workdir, first = uninterrupted
  shutil.copytree(first_workdir / "checkpoints", tmp_path / "checkpoints")
  directory = tmp_path / "checkpoints"
  assert [s.step for s in checkpoint_lib.list_steps(directory)] == [2, 4, 6]
  shutil.rmtree(directory / "6" / "data")  # E.g. a kill while deleting it.
  with caplog.at_level(logging.WARNING):
    resumed = loop.train(config, str(tmp_path))
  assert "Skipping checkpoint step 6" in caplog.text and "data/ is missing" in caplog.text
  assert resumed.start_step == 4 and resumed.final_step == 6
  # From the whole step 4, the run retraces the first one exactly.
  assert resumed.losses == {s: first.losses[s] for s in (5, 6)}
  # The damaged step is kept aside, not deleted; step 6 is saved again, whole.
  assert (directory / "damaged" / "6" / "state").is_dir()
  assert not (directory / "damaged" / "6" / "data").exists()
  assert [(s.step, s.whole) for s in checkpoint_lib.list_steps(directory)] == [(2, True),
                                                                               (4, True),
                                                                               (6, True)]


# Runs scripts/train.py with a signal sent to itself while a start-up phase runs: a preemption
# notice that arrives exactly then, without racing a clock.
_SIGNAL_DURING = textwrap.dedent("""
    import os, runpy, signal, sys
    from twinbrain_jax.training import loop
    signum, phase = getattr(signal, sys.argv[1]), sys.argv[2]
    module = loop if phase == "DataPipeline" else loop.checkpoint_lib
    real = getattr(module, phase)
    def signalled(*args, **kwargs):
      os.kill(os.getpid(), signum)
      return real(*args, **kwargs)
    setattr(module, phase, signalled)
    sys.argv = ["scripts/train.py", *sys.argv[3:]]
    runpy.run_path("scripts/train.py", run_name="__main__")
""")


def _files(root):
  """Every file under `root` with its size and modification time."""
  return {(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
          for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("signum,phase", [("SIGTERM", "DataPipeline"), ("SIGINT", "restore")])
def test_a_signal_during_startup_exits_0_and_writes_nothing(data_config, tmp_path, signum,
                                                            phase):
  workdir = tmp_path / "run"
  config = data_config.copy_and_resolve_references()
  config.train.eval_data_dir = None
  if phase == "restore":  # A run to resume: its step-0 checkpoint (nothing compiled).
    config.train.num_steps = 0
    loop.train(config, str(workdir))
    assert [s.step for s in checkpoint_lib.list_steps(workdir / "checkpoints")] == [0]
  before = _files(workdir) if workdir.exists() else None
  done = processes.run(
      [sys.executable, "-c", _SIGNAL_DURING, signum, phase, "--config=configs/twinbrain.py:tiny",
       f"--workdir={workdir}", f"--config.data.data_dir={config.data.data_dir}",
       f"--config.init.tokenizer={config.init.tokenizer}", "--config.train.progress_bar=False",
       f"--config.model.left_dtype={config.model.left_dtype}",  # As the checkpoint it resumes.
       "--config.train.num_steps=1000"],
      tmp_path / "log", cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == 0, done.stderr[-3000:]
  assert "stopped at step 0 (started at 0, preempted=True); no step run" in done.stdout
  assert "Stopped during start-up; no checkpoint was written" in done.stderr
  assert (_files(workdir) if workdir.exists() else None) == before


def test_sigterm_as_soon_as_the_script_catches_it_exits_0(data_config, tmp_path):
  workdir = tmp_path / "run"
  args = [sys.executable, "scripts/train.py", "--config=configs/twinbrain.py:tiny",
          f"--workdir={workdir}", f"--config.data.data_dir={data_config.data.data_dir}",
          f"--config.init.tokenizer={data_config.init.tokenizer}"]

  def catches_sigterm():  # The caught-signals mask of the child's first thread.
    status = pathlib.Path(f"/proc/{run.proc.pid}/status").read_text()
    mask = int(next(l for l in status.splitlines() if l.startswith("SigCgt:")).split()[1], 16)
    return bool(mask & (1 << (signal.SIGTERM - 1)))

  with processes.started(args, tmp_path / "log", cwd=REPO,
                         env=dict(os.environ, JAX_PLATFORMS="cpu")) as run:
    run.wait_for(catches_sigterm, "a SIGTERM handler")
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 0, run.stderr[-3000:]
    out = run.stdout
  # Whenever it landed (imports, start-up, a step), it stopped the run early ...
  assert "preempted=False" not in out, out
  # ... and left nothing partial behind.
  assert all(s.whole for s in checkpoint_lib.list_steps(workdir / "checkpoints"))


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


def test_data_narrower_than_the_model_is_a_config_error(data_config, tmp_path):
  config = data_config.copy_and_resolve_references()
  config.data.action_dim = 0  # The widest dataset's: 7 (bridge, fractal).
  config.model.action_expert.action_dim = 9
  with pytest.raises(ConfigError, match=r"actions have width 7 \(data.action_dim.*but "
                                        r"model.action_expert.action_dim is 9; set "
                                        r"--config.data.action_dim=9"):
    loop.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists() or not any(
      (tmp_path / "run" / "checkpoints").iterdir())


def test_unknown_preset_is_a_one_line_error():
  done = processes.run([sys.executable, "scripts/train.py", "--config=configs/twinbrain.py:huge",
                        "--workdir=/tmp/unused"], cwd=REPO,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode != 0
  assert "Unknown preset 'huge'" in done.stderr and "qwen25vl_3b" in done.stderr
  assert "Traceback" not in done.stderr
