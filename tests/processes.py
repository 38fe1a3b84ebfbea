"""Subprocesses for tests that cannot outlive the test, also when it fails or pytest is killed.

Every child runs in its own process group with `PR_SET_PDEATHSIG = SIGKILL` (it dies with the
pytest worker that started it), and `started` kills the whole group on exit. Waits take a
`hang_timeout`: it only catches a hang, so make it generous (a loaded 2-core machine compiles
slowly); a slow machine must never fail a test.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence

# Generous bounds that only catch hangs.
HANG_TIMEOUT_S = 1800

# Runs before the real command (exec keeps the death signal); `preexec_fn` is unsafe in a
# process with threads, as every JAX process is.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL('libc.so.6').prctl(1, signal.SIGKILL); "  # PR_SET_PDEATHSIG
    "os.getppid() == int(sys.argv[1]) or os._exit(1); "  # The parent died before prctl.
    "os.execvp(sys.argv[2], sys.argv[2:])")


def _kill_group(proc: subprocess.Popen, grace_s: float = 10.0):
  if proc.poll() is not None:
    return
  with contextlib.suppress(ProcessLookupError):
    os.killpg(proc.pid, signal.SIGTERM)
  try:
    proc.wait(timeout=grace_s)
  except subprocess.TimeoutExpired:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class Started:
  """A running child with its output in files (a pipe nobody reads would block it)."""

  def __init__(self, proc: subprocess.Popen, stdout: pathlib.Path, stderr: pathlib.Path):
    self.proc, self._stdout, self._stderr = proc, stdout, stderr

  @property
  def stdout(self) -> str:
    return self._stdout.read_text(errors="replace")

  @property
  def stderr(self) -> str:
    return self._stderr.read_text(errors="replace")

  def wait_for(self, condition: Callable[[], bool], what: str,
               hang_timeout: float = HANG_TIMEOUT_S) -> None:
    """Polls `condition` until it holds; fails if the child exits first or nothing happens."""
    deadline = time.monotonic() + hang_timeout
    while not condition():
      if self.proc.poll() is not None:
        raise AssertionError(f"the process exited ({self.proc.returncode}) before {what}:\n"
                             f"{self.stderr[-3000:]}")
      if time.monotonic() > deadline:
        raise AssertionError(f"no {what} after {hang_timeout} s (hung?):\n{self.stderr[-3000:]}")
      time.sleep(0.5)

  def wait(self, hang_timeout: float = HANG_TIMEOUT_S) -> int:
    return self.proc.wait(timeout=hang_timeout)


@contextlib.contextmanager
def started(args: Sequence[str], log_dir: pathlib.Path | None = None,
            **popen_kwargs) -> Iterator[Started]:
  """Starts `args`; on exit (normal or not) the child's whole process group is stopped.

  Output goes to `log_dir/{stdout,stderr}.txt` (a new temporary directory if None).
  """
  log_dir = pathlib.Path(log_dir or tempfile.mkdtemp(prefix="proc_"))
  log_dir.mkdir(parents=True, exist_ok=True)
  stdout, stderr = log_dir / "stdout.txt", log_dir / "stderr.txt"
  with open(stdout, "w") as out, open(stderr, "w") as err:
    proc = subprocess.Popen([sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *args],
                            stdout=out, stderr=err, text=True, start_new_session=True,
                            **popen_kwargs)
  try:
    yield Started(proc, stdout, stderr)
  finally:
    _kill_group(proc)


def run(args: Sequence[str], log_dir: pathlib.Path | None = None,
        hang_timeout: float = HANG_TIMEOUT_S, **popen_kwargs) -> subprocess.CompletedProcess:
  """Runs `args` to completion, like `subprocess.run(..., capture_output=True, text=True)`."""
  with started(args, log_dir, **popen_kwargs) as child:
    code = child.wait(hang_timeout)
    return subprocess.CompletedProcess(list(args), code, child.stdout, child.stderr)
