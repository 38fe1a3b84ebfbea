"""Meta-World environments in worker processes, stepped together (parallel evaluation).

    with EnvPool(4, image_size=112, max_steps=400) as pool:
      pool.send(0, "reset", "reach-v3", 1_000_000, True)    # non-blocking
      pool.send(1, "reset", "push-v3", 1_000_000, False)
      time_step = pool.receive(0)                            # mw.TimeStep
      pool.send(0, "step", action, False)

Each worker owns one `sim.metaworld.MetaWorldEnv` at a time (rebuilt when a reset names another
task) and answers every command with one `TimeStep`, so the physics and rendering of N
environments run in N processes while the caller (which holds the policy) batches their
requests. Workers are spawned, not forked: a forked child would share the parent's GL context
and the threads of JAX. An error inside a worker is raised in the caller as `WorkerError`
naming the worker's task and seed; a worker that dies (killed, crashed) is a `WorkerError` too.
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Sequence
from typing import Any

from twinbrain_jax.sim import metaworld as mw

# Generous: a command takes milliseconds, a task switch (building an env) about a second.
REPLY_TIMEOUT_S = 600.0


class WorkerError(RuntimeError):
  """A worker failed or died while running `task` from `seed`."""

  def __init__(self, message: str, *, task: str | None, seed: int | None):
    super().__init__(message)
    self.task, self.seed = task, seed


def _serve(conn, image_size: tuple[int, int], max_steps: int | None) -> None:
  """A worker's loop: ("reset", task, seed, render) | ("step", action, render) | ("close",)."""
  env = None
  try:
    while True:
      command, *args = conn.recv()
      if command == "close":
        return
      try:
        if command == "reset":
          task, seed, render = args
          if env is None or env.task != task:
            if env is not None:
              env.close()
            env = None  # Stays None if the new one fails to build.
            env = mw.make_env(task, image_size, max_steps)
          reply = ("ok", env.reset(seed, render=render), env.max_steps)
        elif command == "step":
          action, render = args
          reply = ("ok", env.step(action, render=render), env.max_steps)
        else:
          raise ValueError(f"unknown command {command!r}")
      except Exception as e:  # pylint: disable=broad-except
        reply = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", None)
      conn.send(reply)
  except (EOFError, KeyboardInterrupt):  # The caller went away, or Ctrl-C reached the group.
    return
  finally:
    if env is not None:
      env.close()


class EnvPool:
  """`num_envs` worker processes, one environment each (see the module docstring).

  Attributes:
    max_steps: the episode limit of the environment each worker last reset (per worker).
  """

  def __init__(self, num_envs: int, image_size: int | Sequence[int] = mw.DEFAULT_IMAGE_SIZE,
               max_steps: int | None = None):
    if num_envs < 1:
      raise ValueError(f"num_envs={num_envs}; give at least 1.")
    context = multiprocessing.get_context("spawn")
    self._conns, self._processes = [], []
    self._running: list[tuple[str | None, int | None]] = [(None, None)] * num_envs
    self.max_steps: list[int | None] = [None] * num_envs
    try:
      for _ in range(num_envs):
        parent, child = context.Pipe()
        process = context.Process(target=_serve, daemon=True,
                                  args=(child, mw.image_hw(image_size), max_steps))
        process.start()
        child.close()
        self._conns.append(parent)
        self._processes.append(process)
    except BaseException:
      self.close()
      raise

  def __len__(self) -> int:
    return len(self._conns)

  @property
  def pids(self) -> list[int]:
    return [p.pid for p in self._processes]

  def send(self, worker: int, command: str, *args: Any) -> None:
    """Sends "reset" (task, seed, render) or "step" (action, render) without waiting."""
    if command == "reset":
      self._running[worker] = (args[0], int(args[1]))
    try:
      self._conns[worker].send((command, *args))
    except (BrokenPipeError, ConnectionResetError, OSError) as e:
      raise self._died(worker, e) from None

  def receive(self, worker: int) -> mw.TimeStep:
    """The time step that answers `worker`'s last command."""
    conn = self._conns[worker]
    try:
      if not conn.poll(REPLY_TIMEOUT_S):
        raise self._error(worker, f"did not answer in {REPLY_TIMEOUT_S:.0f} s")
      status, payload, max_steps = conn.recv()
    except (EOFError, ConnectionResetError, OSError) as e:
      raise self._died(worker, e) from None
    if status != "ok":
      raise self._error(worker, f"failed: {payload}")
    self.max_steps[worker] = max_steps
    return payload

  def _died(self, worker: int, cause: BaseException) -> WorkerError:
    process = self._processes[worker]
    process.join(timeout=5.0)
    return self._error(worker, f"died (exit code {process.exitcode}, {type(cause).__name__})")

  def _error(self, worker: int, what: str) -> WorkerError:
    task, seed = self._running[worker]
    return WorkerError(f"environment worker {worker} (pid {self._processes[worker].pid}), "
                       f"running {task} from seed {seed}, {what}", task=task, seed=seed)

  def close(self) -> None:
    """Asks every worker to stop, then ends those that do not within a few seconds."""
    for conn in self._conns:
      try:
        conn.send(("close",))
      except (BrokenPipeError, ConnectionResetError, OSError):
        pass
    for process in self._processes:
      process.join(timeout=10.0)
      if process.is_alive():
        process.terminate()
        process.join(timeout=5.0)
    for conn in self._conns:
      conn.close()

  def __enter__(self) -> EnvPool:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
