"""Runs a training script as a multi-process JAX job on this machine's CPU (multi-host, tested
on one machine).

  python scripts/launch_local.py --num_processes=2 --devices_per_process=4 -- \
      scripts/train.py --config=configs/twinbrain.py:tiny --workdir=/tmp/run1 ...

Child i runs `python <script> <args> --config.distributed.coordinator_address=localhost:<port>
--config.distributed.num_processes=N --config.distributed.process_id=i` (so the script must take
the `--config` flags, as every training script does) with `JAX_PLATFORMS=cpu` and
`--xla_force_host_platform_device_count=<devices_per_process>` in `XLA_FLAGS`; the coordinator
port is a free localhost port, and the processes talk through JAX's gloo CPU collectives (this
JAX's default). Each line a child prints is prefixed with `[i] `.

SIGTERM and SIGINT are forwarded to every child once (the training loop then stops all of them at
one step boundary, with one checkpoint). When a child fails (non-zero status or a signal), the
others are sent SIGTERM and, after --grace_s, SIGKILL; the launcher's status is then non-zero.
Every child dies with the launcher, also when it is killed.
"""

import ctypes
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

from absl import app, flags

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Processes of the job.", lower_bound=1)
_DEVICES = flags.DEFINE_integer("devices_per_process", 4, "Fake CPU devices per process.",
                                lower_bound=1)
_GRACE_S = flags.DEFINE_float("grace_s", 30.0, "After a child failed: seconds the others get to "
                              "exit on SIGTERM before they are killed.")

_PR_SET_PDEATHSIG = 1
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  """A localhost TCP port nothing listens on now."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def child_env(devices: int) -> dict[str, str]:
  """The environment with `devices` fake CPU devices (replacing any device count in XLA_FLAGS)."""
  xla_flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
               if not f.startswith(_DEVICE_COUNT_FLAG)]
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=" ".join([*xla_flags, f"{_DEVICE_COUNT_FLAG}={devices}"]))


def child_command(command: list[str], port: int, num_processes: int, index: int) -> list[str]:
  return [sys.executable, *command,
          f"--config.distributed.coordinator_address=localhost:{port}",
          f"--config.distributed.num_processes={num_processes}",
          f"--config.distributed.process_id={index}"]


def _die_with_launcher():
  """In the child before exec (the launcher has no threads, so this is safe)."""
  ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _Prefixer:
  """Copies a child's output to ours line by line, each line prefixed."""

  def __init__(self, prefix: bytes, out):
    self._prefix, self._out, self._partial = prefix, out, b""

  def feed(self, data: bytes) -> None:
    *lines, self._partial = (self._partial + data).split(b"\n")
    for line in lines:
      self._out.write(self._prefix + line + b"\n")
    self._out.flush()

  def close(self) -> None:
    if self._partial:
      self.feed(b"\n")


def launch(command: list[str], num_processes: int, devices: int, grace_s: float) -> int:
  """Runs the job; returns 0 when every child exited with 0, else the first failure's status."""
  port = free_port()
  env = child_env(devices)
  forward = []  # Signals received, to forward from the main loop.
  previous = {s: signal.signal(s, lambda signum, _: forward.append(signum))
              for s in (signal.SIGTERM, signal.SIGINT)}
  selector = selectors.DefaultSelector()
  children = []
  try:
    for i in range(num_processes):
      # Own session: a terminal's Ctrl-C reaches the children once, through the launcher.
      child = subprocess.Popen(child_command(command, port, num_processes, i), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True, preexec_fn=_die_with_launcher)
      children.append(child)
      prefix = f"[{i}] ".encode()
      selector.register(child.stdout, selectors.EVENT_READ, _Prefixer(prefix, sys.stdout.buffer))
      selector.register(child.stderr, selectors.EVENT_READ, _Prefixer(prefix, sys.stderr.buffer))
    failure, kill_at = None, None
    while selector.get_map():
      for key, _ in selector.select(timeout=0.2):
        data = os.read(key.fd, 1 << 16)
        if data:
          key.data.feed(data)
        else:
          key.data.close()
          selector.unregister(key.fileobj)
      while forward:
        signum = forward.pop(0)
        for child in children:
          if child.poll() is None:
            child.send_signal(signum)
      for i, child in enumerate(children):
        if failure is None and child.poll() not in (None, 0):
          failure = child.returncode
          sys.stderr.write(f"launch_local: process {i} exited with status {failure}; stopping "
                           "the others.\n")
          for other in children:
            if other.poll() is None:
              other.send_signal(signal.SIGTERM)
          kill_at = time.monotonic() + grace_s
      if kill_at is not None and time.monotonic() > kill_at:
        for child in children:
          if child.poll() is None:
            child.kill()
        kill_at = None
    codes = [child.wait() for child in children]
  finally:
    for child in children:
      if child.poll() is None:
        child.kill()
        child.wait()
    for signum, handler in previous.items():
      signal.signal(signum, handler)
  if failure is None and any(codes):
    failure = next(code for code in codes if code)
  return 0 if failure is None else (failure if failure > 0 else 128 - failure)


def main(argv):
  command = argv[1:]
  if not command:
    sys.exit("error: give the script to run after `--`, e.g. "
             "`launch_local.py --num_processes=2 -- scripts/train.py --workdir=...`.")
  sys.exit(launch(command, _NUM_PROCESSES.value, _DEVICES.value, _GRACE_S.value))


if __name__ == "__main__":
  app.run(main)
