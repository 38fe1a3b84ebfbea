"""The `make demo` run: the Meta-World closed loop on a CPU, each stage a project script.

1. scripted-expert demonstrations of a few tasks (`scripts/make_metaworld_dataset.py`), kept in
   the work dir and reused by the next run;
2. a brief training of `configs/twinbrain.py:metaworld_demo` (`scripts/train.py`), fresh each run;
3. its inference bundle (`scripts/export.py`);
4. the policy server on that bundle (`scripts/serve.py`), and the evaluation of a few episodes per
   task through it with openpi-client (`scripts/eval_metaworld.py --server`), next to the scripted
   expert and random actions on the same held-out seeds.

The stages run as child processes, exactly the commands a user would type (the demo prints
them); TensorFlow, which the dataset writer and the training data path load, then never shares
a process with the renderer (Mesa's software OpenGL crashes beside it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from twinbrain_jax.sim import evaluation
from twinbrain_jax.sim import metaworld as mw

REPO = pathlib.Path(__file__).resolve().parents[2]
# Generous: only catches a server that never comes up (it compiles the sampler first).
SERVER_START_TIMEOUT_S = 1800


@dataclasses.dataclass(frozen=True)
class DemoSettings:
  """What the demo runs. The defaults take ~10 minutes on 2 idle CPU cores (docs/metaworld.md).

  Three tasks whose motions a briefly trained tiny model learns; the honest success rate it
  reaches is printed next to the expert's and random actions'.
  """
  tasks: str = "drawer-close-v3,window-open-v3,button-press-topdown-v3"
  episodes_per_task: int = 20  # expert demonstrations tried per task
  config: str = "configs/twinbrain.py:metaworld_demo"
  train_steps: int | None = None  # None: the config's train.num_steps
  eval_episodes: int = 5  # per task, on mw.eval_seeds
  max_steps: int = 200  # episode limit of the evaluation
  num_videos: int = 5  # the trained policy's recorded episodes per task (all, by default)
  data_format: str = "rlds"  # the demonstrations as RLDS, or as a LeRobot v3.0 dataset

  def __post_init__(self):
    mw.resolve_tasks(self.tasks)  # Raises with close matches on a misspelt task.
    if self.data_format not in ("rlds", "lerobot"):
      raise ValueError(f"DemoSettings.data_format={self.data_format!r}; choose rlds or lerobot.")
    for name in ("episodes_per_task", "eval_episodes", "max_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"DemoSettings.{name} must be >= 1; got {getattr(self, name)}.")
    if self.train_steps is not None and self.train_steps < 1:
      raise ValueError(f"DemoSettings.train_steps must be >= 1; got {self.train_steps}.")


@dataclasses.dataclass(frozen=True)
class DemoPaths:
  """Where a demo in `workdir` writes: `data/` is kept between runs, the rest is replaced."""
  workdir: str
  data_format: str = "rlds"

  data = property(lambda self: os.path.join(self.workdir, "data"))

  @property
  def dataset(self) -> str:
    from twinbrain_jax.sim import metaworld_dataset as mwd  # pylint: disable=g-import-not-at-top
    return mwd.dataset_dir(self.data, self.data_format)

  tokenizer = property(lambda self: os.path.join(self.data, "tokenizer"))
  run = property(lambda self: os.path.join(self.workdir, "run"))
  checkpoints = property(lambda self: os.path.join(self.run, "checkpoints"))
  bundle = property(lambda self: os.path.join(self.workdir, "bundle"))
  eval = property(lambda self: os.path.join(self.workdir, "eval"))


class StageError(RuntimeError):
  """A stage's command failed; the message names the stage and the command."""


def script(name: str, *flags: str) -> list[str]:
  """The command that runs `scripts/<name>` with `flags` in this Python."""
  return [sys.executable, str(REPO / "scripts" / name), *flags]


def dataset_commands(settings: DemoSettings, paths: DemoPaths) -> list[list[str]]:
  """The commands that make the demo's data, none when it is already there.

  Raises:
    FileExistsError: `paths.dataset` holds other tasks than `settings.tasks` (the demo never
      replaces data it did not make for these settings).
  """
  commands = []
  if os.path.exists(paths.dataset):
    from twinbrain_jax.sim import metaworld_dataset as mwd  # pylint: disable=g-import-not-at-top
    report = mwd.read_report(paths.dataset)
    have = [t["task"] for t in report["tasks"]]
    if have != list(mw.resolve_tasks(settings.tasks)):
      raise FileExistsError(
          f"{paths.dataset} holds demonstrations of {', '.join(have)}, not of the requested "
          f"{settings.tasks}; remove {paths.data} or choose another work dir.")
  else:
    commands.append(script(
        "make_metaworld_dataset.py", f"--data_dir={paths.data}", f"--tasks={settings.tasks}",
        f"--episodes_per_task={settings.episodes_per_task}", f"--config={settings.config}",
        f"--tokenizer_dir={paths.tokenizer}", f"--format={settings.data_format}",
        "--verbosity=-1"))
  if not commands and not os.path.exists(paths.tokenizer):
    commands.append(script("make_metaworld_dataset.py", f"--data_dir={paths.data}",
                            f"--config={settings.config}", f"--tokenizer_dir={paths.tokenizer}",
                            "--tokenizer_only"))
  return commands


def train_command(settings: DemoSettings, paths: DemoPaths) -> list[str]:
  flags = [f"--config={settings.config}", f"--workdir={paths.run}",
           f"--config.data.data_dir={paths.data}", f"--config.init.tokenizer={paths.tokenizer}",
           "--verbosity=-1"]  # Warnings and the progress bar, not library INFO logs.
  if settings.train_steps is not None:
    flags.append(f"--config.train.num_steps={settings.train_steps}")
  if settings.data_format == "lerobot":
    from twinbrain_jax.sim import metaworld_dataset as mwd  # pylint: disable=g-import-not-at-top
    flags += [f"--config.data.datasets=({mwd.lerobot_entry()!r},)", "--config.data.weights=(1.0,)"]
  return script("train.py", *flags)


def export_command(paths: DemoPaths) -> list[str]:
  return script("export.py", f"--checkpoint_dir={paths.checkpoints}", f"--out={paths.bundle}",
                 "--dtype=float32", "--verbosity=-1")


def serve_command(paths: DemoPaths) -> list[str]:
  # One client (the evaluation): batches of one, so only that size is compiled.
  return script("serve.py", f"--bundle={paths.bundle}", "--host=127.0.0.1", "--port=0",
                 "--max_batch=1")


def eval_command(settings: DemoSettings, paths: DemoPaths, policy: str, label: str,
                 plot_with: Sequence[str] = ()) -> list[str]:
  """`policy`: `expert`, `random` or `server=host:port`."""
  source = f"--{policy}" if policy.startswith("server=") else f"--policy={policy}"
  flags = [source, f"--label={label}", f"--tasks={settings.tasks}",
           f"--episodes={settings.eval_episodes}", f"--max_steps={settings.max_steps}",
           f"--output_dir={paths.eval}",
           f"--num_videos={settings.num_videos if policy.startswith('server=') else 0}"]
  if plot_with:
    flags.append("--plot_with=" + ",".join(plot_with))
  return script("eval_metaworld.py", *flags)


def _header(text: str) -> None:
  print(f"\n=== {text}", flush=True)


# Runs before a stage's command (exec keeps the death signal): the stage gets SIGTERM when the
# process that started it dies, even by SIGKILL. A stage runs in its own session, out of reach of
# the terminal's signals, and would otherwise run on orphaned; on SIGTERM a training stage saves
# its checkpoint and exits. (`preexec_fn` is unsafe in a process with threads.)
_TERM_WITH_PARENT = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM); "  # PR_SET_PDEATHSIG
    "os.getppid() == int(sys.argv[1]) or os._exit(1); "  # The parent died before prctl.
    "os.execvp(sys.argv[2], sys.argv[2:])")


def _start_stage(command: Sequence[str], **popen_kwargs) -> subprocess.Popen:
  """`command` in its own process group, stopped (SIGTERM) when this process dies."""
  return subprocess.Popen([sys.executable, "-c", _TERM_WITH_PARENT, str(os.getpid()), *command],
                          cwd=REPO, start_new_session=True, **popen_kwargs)


def check_call(stage: str, command: Sequence[str]) -> None:
  """Runs `command` with the demo's own stdout/stderr; raises StageError if it fails."""
  print("$ " + shlex.join(command), flush=True)
  proc = _start_stage(command)
  try:
    code = proc.wait()
  finally:
    _stop(proc)
  if code != 0:
    raise StageError(f"{stage} failed (exit status {code}): {shlex.join(command)}")


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
  """Stops `proc`'s process group (SIGTERM, then SIGKILL after `grace_s`)."""
  if proc.poll() is not None:
    return
  try:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=grace_s)
  except ProcessLookupError:
    pass
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class _Server:
  """`scripts/serve.py` in the background: its output echoed with a prefix, its address parsed
  from the `serving on ws://HOST:PORT` line."""

  def __init__(self, command: Sequence[str]):
    print("$ " + shlex.join(command) + " &", flush=True)
    self.proc = _start_stage(command, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    self._addresses: queue.Queue[str] = queue.Queue()
    threading.Thread(target=self._echo, daemon=True).start()

  def _echo(self) -> None:
    for line in self.proc.stdout:
      print("[server] " + line, end="", flush=True)
      if line.startswith("serving on ws://"):
        self._addresses.put(line.strip().removeprefix("serving on ws://"))
    self._addresses.put("")  # The server's output ended: it exited.

  def wait_ready(self, timeout_s: float = SERVER_START_TIMEOUT_S) -> str:
    """`host:port` once the server listens (it compiles before it listens)."""
    try:
      address = self._addresses.get(timeout=timeout_s)
    except queue.Empty:
      raise StageError(f"the policy server did not start within {timeout_s} s") from None
    if not address:
      raise StageError(f"the policy server exited ({self.proc.wait()}) before it listened; "
                       "its output is above")
    return address

  def stop(self) -> None:
    _stop(self.proc)


def run(settings: DemoSettings, workdir: str) -> dict[str, Any]:
  """Runs the demo in `workdir`; returns the three evaluation results and the stage times.

  Raises:
    StageError: a stage failed (its output is above); later stages did not run.
  """
  paths = DemoPaths(os.path.abspath(workdir), settings.data_format)
  timings = {}
  start = time.perf_counter()

  _header(f"1/4 data: scripted-expert demonstrations of {settings.tasks}")
  commands = dataset_commands(settings, paths)
  if not commands or len(commands) == 1 and "--tokenizer_only" in commands[0]:
    print(f"reusing {paths.dataset}")
  for command in commands:
    check_call("making the dataset", command)
  timings["data"] = time.perf_counter() - start

  _header("2/4 training (fresh run)")
  for previous in (paths.run, paths.bundle, paths.eval):
    shutil.rmtree(previous, ignore_errors=True)
  t = time.perf_counter()
  check_call("training", train_command(settings, paths))
  timings["train"] = time.perf_counter() - t

  _header("3/4 export")
  t = time.perf_counter()
  check_call("export", export_command(paths))
  timings["export"] = time.perf_counter() - t

  _header("4/4 closed loop: baselines, then the trained policy through the server")
  t = time.perf_counter()
  os.makedirs(paths.eval, exist_ok=True)
  for baseline in ("expert", "random"):
    check_call(f"evaluating {baseline}", eval_command(settings, paths, baseline, baseline))
  server = _Server(serve_command(paths))
  try:
    address = server.wait_ready()
    baselines = [os.path.join(paths.eval, f"{b}.json") for b in ("expert", "random")]
    check_call("evaluating the policy through the server",
                eval_command(settings, paths, f"server={address}", "twinbrain", baselines))
  finally:
    server.stop()
  timings["closed_loop"] = time.perf_counter() - t
  timings["total"] = time.perf_counter() - start

  results = []
  for label in ("expert", "random", "twinbrain"):
    with open(os.path.join(paths.eval, f"{label}.json")) as f:
      results.append(json.load(f))
  _header(f"success on the held-out evaluation seeds ({settings.eval_episodes} episodes per "
          f"task, {settings.max_steps}-step limit, 95 % Wilson intervals)")
  print(evaluation.format_comparison(results))
  print(f"\nplot:   {os.path.join(paths.eval, 'twinbrain_success.png')}")
  print(f"videos: {os.path.join(paths.eval, 'twinbrain_videos')}/")
  print(f"bundle: {paths.bundle}  (python scripts/serve.py --bundle={paths.bundle})")
  print("time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()), flush=True)
  return dict(results=results, timings=timings)
