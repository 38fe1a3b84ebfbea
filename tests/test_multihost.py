"""Multi-process training on one machine: `scripts/launch_local.py` runs `scripts/train.py` as
2 processes x 4 fake CPU devices (localhost coordinator, gloo collectives) and it trains exactly
what 1 process x 8 devices trains; a SIGTERM to one of the processes stops both at one step with
one checkpoint, from which 1 process x 8 devices resumes. The launcher itself: prefixed output,
forwarded signals, a failed child stops the job. Data positions across process counts.

The default run keeps the 2-process job (SIGTERM test); the comparisons with the 1-process run
are marked slow."""

import json
import os
import pathlib
import re
import signal
import sys
import textwrap
import time

import absl.flags
import jax
import numpy as np
import pytest

import processes
from fixtures_training import REPO, tiny_config
from twinbrain_jax.data import pipeline
from twinbrain_jax.training import checkpoint as checkpoint_lib
from twinbrain_jax.training import demo_data, export, loop
from twinbrain_jax.training import optimizer as optimizer_lib

absl.flags.FLAGS.mark_as_parsed()  # grain reads absl flags.

NUM_STEPS, STOP_STEP, SIGNALLED_PROCESS = 3, 2, 1
# Two processes reduce across the gloo TCP collectives, one across in-process CPU collectives:
# the summation order of the gradients may differ, so float32 results may differ in the last
# bits, and Adam's normalised updates turn a relative difference in a small gradient into a
# difference of up to the learning rate. Losses are compared within LOSS_RTOL; every parameter
# within PARAM_TOL of the learning rate summed over the steps taken (how far Adam can have moved
# it: a batch assembled in another order moves parameters by about that much), measured in
# docs/training.md.
LOSS_RTOL, PARAM_TOL = 1e-5, 1e-2
# The action expert's attention key biases get a zero gradient in exact arithmetic (softmax is
# invariant to adding q.b to every key), so their Adam updates are normalised rounding noise
# (of the order of the learning rate times the step count) in any two runs that sum in another
# order: they are left out of the parameter comparison.
# Unrolled: block_0 (cross) and block_1 (self); scanned: blocks/{cross,self}_attention.
_NOISE_ONLY = re.compile(r"\['action_expert'\]\[('block_\d+'|'blocks'\]\['\w+_attention')\]"
                         r"\['attn'\]\['key'\]\['bias'\]")

# Runs scripts/train.py in one process of the job; records its pid and its `TrainResult`
# (full-precision losses) under OUT. Process SIGNALLED_PROCESS, after step STOP_STEP, publishes
# its pid in OUT/waiting_for_sigterm and waits until a SIGTERM from outside has been handled:
# the signal lands at a known step, whatever the machine's speed.
_TRAIN_IN_JOB = textwrap.dedent("""
    import json, os, runpy, sys, time
    import jax
    from twinbrain_jax.training import loop
    out, stop_step, stop_process = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    open(os.path.join(out, f"pid_{os.getpid()}"), "w").close()
    handled = []
    real_handle, real_train = loop._Preemption._handle, loop.train
    def handle(self, signum, frame):
      real_handle(self, signum, frame)
      handled.append(signum)
    def on_step(step):
      if step == stop_step and jax.process_index() == stop_process:
        with open(os.path.join(out, "waiting.tmp"), "w") as f:
          f.write(str(os.getpid()))
        os.replace(os.path.join(out, "waiting.tmp"), os.path.join(out, "waiting_for_sigterm"))
        while not handled:
          time.sleep(0.05)
    def train(config, workdir, **kwargs):
      result = real_train(config, workdir, on_step=on_step, **kwargs)
      with open(os.path.join(out, f"result_{jax.process_index()}.json"), "w") as f:
        json.dump(dict(losses=result.losses, start_step=result.start_step,
                       final_step=result.final_step, preempted=result.preempted), f)
      return result
    loop._Preemption._handle, loop.train = handle, train
    sys.argv = ["scripts/train.py", *sys.argv[4:]]
    runpy.run_path("scripts/train.py", run_name="__main__")
""")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  """The tiny preset on generated bridge + fractal data; 16 samples per step in 2 micro-batches
  of 8 (one per device)."""
  config = demo_data.prepare(tiny_config((8, 1, 1)), str(tmp_path_factory.mktemp("data")),
                             num_episodes=6, num_eval_episodes=2)
  config.train.update(num_steps=NUM_STEPS, log_every=1, progress_bar=False, grad_accum_steps=2,
                      eval_data_dir=None)
  config.data.batch_size = 16
  config.checkpoint.update(every=1000, keep_last=10)  # Only the preemption's checkpoint.
  return config


def _overrides(config) -> list[str]:
  return [f"--config.data.data_dir={config.data.data_dir}",
          f"--config.init.tokenizer={config.init.tokenizer}",
          f"--config.data.batch_size={config.data.batch_size}",
          f"--config.train.num_steps={config.train.num_steps}",
          f"--config.train.grad_accum_steps={config.train.grad_accum_steps}",
          "--config.train.progress_bar=False", "--config.train.log_every=1",
          f"--config.checkpoint.every={config.checkpoint.every}",
          f"--config.checkpoint.keep_last={config.checkpoint.keep_last}"]


@pytest.fixture(scope="module")
def one_process(config, tmp_path_factory):
  """1 process x 8 devices (this one), uninterrupted, with a checkpoint at STOP_STEP:
  (workdir, result)."""
  config = config.copy_and_resolve_references()
  config.checkpoint.every = STOP_STEP
  workdir = tmp_path_factory.mktemp("one_process")
  start = time.perf_counter()
  result = loop.train(config, str(workdir))
  print(f"1 process x 8 devices, {NUM_STEPS} steps: {time.perf_counter() - start:.0f} s")
  return workdir, result


@pytest.fixture(scope="module")
def two_processes(config, tmp_path_factory):
  """2 processes x 4 devices through the launcher; process 1 gets a SIGTERM after step
  STOP_STEP. (workdir, the launcher's status and output, per-process results, pids)."""
  root = tmp_path_factory.mktemp("two_processes")
  workdir, out = root / "run", root / "out"
  out.mkdir()
  args = [sys.executable, "scripts/launch_local.py", "--num_processes=2",
          "--devices_per_process=4", "--", "-c", _TRAIN_IN_JOB, str(out), str(STOP_STEP),
          str(SIGNALLED_PROCESS), "--config=configs/twinbrain.py:tiny", f"--workdir={workdir}",
          *_overrides(config)]
  waiting = out / "waiting_for_sigterm"
  start = time.perf_counter()
  with processes.started(args, root / "log", cwd=REPO) as job:
    job.wait_for(waiting.exists, f"step {STOP_STEP} in process {SIGNALLED_PROCESS}")
    os.kill(int(waiting.read_text()), signal.SIGTERM)
    code = job.wait()
    stdout, stderr = job.stdout, job.stderr
  print(f"2 processes x 4 devices, {STOP_STEP} steps and the preemption's checkpoint: "
        f"{time.perf_counter() - start:.0f} s")
  results = {i: json.loads((out / f"result_{i}.json").read_text()) for i in range(2)
             if (out / f"result_{i}.json").exists()}
  pids = [int(p.name.split("_")[1]) for p in out.glob("pid_*")]
  return workdir, dict(code=code, stdout=stdout, stderr=stderr), results, pids


def _alive(pid: int) -> bool:
  try:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
  except FileNotFoundError:
    return False
  return "zombie" not in status


def test_a_sigterm_to_one_process_stops_both_at_one_step_with_one_checkpoint(two_processes):
  workdir, job, results, pids = two_processes
  assert job["code"] == 0, job["stderr"][-5000:]
  assert len(pids) == 2 and not any(map(_alive, pids))  # No process left behind.
  # Both stopped after the same step; process 0 learnt of the signal through the agreement.
  assert sorted(results) == [0, 1]
  for result in results.values():
    assert (result["start_step"], result["final_step"], result["preempted"]) == (0, STOP_STEP,
                                                                                 True)
  assert results[0]["losses"] == results[1]["losses"]
  # The preemption's checkpoint: whole, with both processes' data positions (they are one
  # global position).
  directory = workdir / "checkpoints"
  assert [(s.step, s.whole) for s in checkpoint_lib.list_steps(directory)] == [(STOP_STEP, True)]
  positions = [json.loads(p.read_text())
               for p in sorted((directory / str(STOP_STEP) / "data").glob("*.json"))]
  assert len(positions) == 2 and positions[0] == positions[1]
  assert positions[0]["next_batch"] == STOP_STEP
  # Only process 0 reports: the summary line and the step metrics come from it alone.
  summary = [l for l in job["stdout"].splitlines() if "stopped at step" in l]
  assert summary == [f"[0] stopped at step {STOP_STEP} (started at 0, preempted=True); "
                     f"last loss {results[0]['losses'][str(STOP_STEP)]:.4f}"]
  assert "loop.py" in job["stderr"] and not any(
      l.startswith("[1] ") and "] step " in l for l in job["stderr"].splitlines())


def _summed_lr(config, steps: int) -> float:
  """The largest group's learning rate summed over the first `steps` optimizer steps."""
  return max(sum(float(schedule(s)) for s in range(steps))
             for schedule in optimizer_lib.group_schedules(config.train).values())


def _assert_params_close(got_tree, want_tree, summed_lr: float) -> float:
  """Every parameter (but the noise-only ones) within PARAM_TOL * `summed_lr`; returns the
  largest difference as a fraction of `summed_lr`."""
  got = {jax.tree_util.keystr(path): leaf
         for path, leaf in jax.tree_util.tree_flatten_with_path(got_tree)[0]}
  want = {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(want_tree)[0]}
  assert got.keys() == want.keys()
  assert len([k for k in got if _NOISE_ONLY.fullmatch(k)]) == 2  # Cross and self blocks.
  largest = 0.0
  for key in sorted(got):
    if _NOISE_ONLY.fullmatch(key):
      continue
    a, b = np.asarray(got[key], np.float32), np.asarray(want[key], np.float32)
    np.testing.assert_allclose(a, b, rtol=0, atol=PARAM_TOL * summed_lr, err_msg=key)
    largest = max(largest, float(np.abs(a - b).max()) / summed_lr)
  return largest


@pytest.mark.slow  # The 1-process reference adds about 2 minutes to the 2-process job's 3.
def test_two_processes_train_what_one_process_trains(one_process, two_processes, config):
  """The same losses (two optimizer steps of two micro-batches) and final parameters."""
  one_dir, one = one_process
  two_dir, job, results, _ = two_processes
  assert job["code"] == 0, job["stderr"][-5000:]
  two_losses = {int(s): v for s, v in results[0]["losses"].items()}
  steps = list(range(1, STOP_STEP + 1))
  assert sorted(two_losses) == steps
  np.testing.assert_allclose([two_losses[s] for s in steps], [one.losses[s] for s in steps],
                             rtol=LOSS_RTOL)
  two_params, _, _ = export.restore_checkpoint(two_dir / "checkpoints", STOP_STEP)
  one_params, _, _ = export.restore_checkpoint(one_dir / "checkpoints", STOP_STEP)
  largest = _assert_params_close(two_params, one_params, _summed_lr(config, STOP_STEP))
  print(f"2 vs 1 process: losses {[two_losses[s] for s in steps]} vs "
        f"{[one.losses[s] for s in steps]}; largest parameter difference {largest:.3g} of the "
        "summed learning rate")


@pytest.mark.slow
def test_one_process_resumes_the_two_process_checkpoint(one_process, two_processes, config):
  """1 process x 8 devices continues from the step the 2-process job stopped at: the losses of
  the remaining steps and the final parameters are those of the uninterrupted run."""
  _, one = one_process
  two_dir, job, _, _ = two_processes
  assert job["code"] == 0, job["stderr"][-5000:]
  resumed = loop.train(config.copy_and_resolve_references(), str(two_dir))
  assert (resumed.start_step, resumed.final_step, resumed.preempted) == (STOP_STEP, NUM_STEPS,
                                                                         False)
  steps = list(range(STOP_STEP + 1, NUM_STEPS + 1))
  assert sorted(resumed.losses) == steps
  np.testing.assert_allclose([resumed.losses[s] for s in steps], [one.losses[s] for s in steps],
                             rtol=LOSS_RTOL)
  largest = _assert_params_close(resumed.state.params, one.state.params,
                                 _summed_lr(config, NUM_STEPS))
  print(f"resumed on 1 process: losses {[resumed.losses[s] for s in steps]} vs "
        f"{[one.losses[s] for s in steps]}; largest parameter difference {largest:.3g} of the "
        "summed learning rate")


# --- the launcher, with stand-in children (no JAX) -------------------------------------------

# A child: prints its process id (from the flags the launcher appends), then waits for SIGTERM
# (prints it, exits 0), or exits with status 3 at once if it is process FAIL.
_CHILD = textwrap.dedent("""
    import os, signal, sys, time
    index = int(next(a for a in sys.argv if a.startswith("--config.distributed.process_id="))
                .split("=")[1])
    address = next(a for a in sys.argv if a.startswith("--config.distributed.coordinator"))
    print(f"process {index} of {sys.argv[-2].split('=')[1]} at {address.split('=')[1]}, "
          f"{os.environ['XLA_FLAGS']}", flush=True)
    if str(index) == sys.argv[1]:
      sys.exit(3)
    signal.signal(signal.SIGTERM, lambda *_: (print("SIGTERM", flush=True), sys.exit(0)))
    open(os.path.join(sys.argv[2], f"ready_{index}_{os.getpid()}"), "w").close()
    while True:
      time.sleep(0.1)
""")


def _launch_children(tmp_path, fail: int):
  args = [sys.executable, "scripts/launch_local.py", "--num_processes=3",
          "--devices_per_process=2", "--grace_s=20", "--", "-c", _CHILD, str(fail),
          str(tmp_path)]
  return processes.started(args, tmp_path / "log", cwd=REPO)


def test_launcher_forwards_sigterm_and_prefixes_output(tmp_path):
  with _launch_children(tmp_path, fail=-1) as job:
    job.wait_for(lambda: len(list(tmp_path.glob("ready_*"))) == 3, "three ready children")
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait() == 0, job.stderr
    out = job.stdout
  pids = [int(p.name.split("_")[2]) for p in tmp_path.glob("ready_*")]
  assert not any(map(_alive, pids))
  for i in range(3):
    line = next(l for l in out.splitlines() if l.startswith(f"[{i}] process"))
    assert f"process {i} of 3 at localhost:" in line
    assert line.endswith("--xla_force_host_platform_device_count=2")
    assert f"[{i}] SIGTERM" in out.splitlines()


def test_launcher_stops_the_job_when_one_process_fails(tmp_path):
  with _launch_children(tmp_path, fail=1) as job:
    code = job.wait()
    err = job.stderr
  assert code == 3, err
  assert "launch_local: process 1 exited with status 3; stopping the others." in err
  pids = [int(p.name.split("_")[2]) for p in tmp_path.glob("ready_*")]
  assert not any(map(_alive, pids))


def test_data_positions_that_disagree_are_an_error_for_another_process_count(config, tmp_path):
  """A job with another number of processes takes the one position all saved files hold; files
  that disagree (not written by this pipeline) are refused with the fix."""
  iterator = pipeline.DataPipeline(config.data).iterator()
  manager = checkpoint_lib.make_manager(str(tmp_path), config.checkpoint)
  data_dir = tmp_path / "7" / "data"
  data_dir.mkdir(parents=True)
  for i, next_batch in enumerate((5, 5)):
    (data_dir / f"process_{i}-of-2.json").write_text(
        json.dumps(dict(iterator.get_state(), next_batch=next_batch)))
  checkpoint_lib._restore_data(manager, 7, iterator)
  assert iterator.get_state()["next_batch"] == 5
  (data_dir / "process_1-of-2.json").write_text(json.dumps(dict(iterator.get_state(),
                                                                next_batch=6)))
  with pytest.raises(pipeline.PipelineStateError,
                     match=r"do not agree on one position.*resume with the number of processes"):
    checkpoint_lib._restore_data(manager, 7, iterator)
  iterator.close()
  manager.close()
