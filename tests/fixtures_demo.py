"""`make demo` on tiny settings, run once per test session (shared by the demo and notebook tests;
mark their tests `xdist_group(DEMO_GROUP)` so one worker runs them all and builds it once).

The fixture `tiny_demo` is registered in conftest.py: a fixture imported into several test
modules is a separate fixture in each, and each would build its own demo.

    from fixtures_demo import DEMO_GROUP, TINY_DEMO
"""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

import processes

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO_GROUP = "tiny_demo"
# One task, two demonstrations, three training steps, one 12-step evaluation episode per policy.
TINY_DEMO = dict(tasks="drawer-close-v3", episodes_per_task=2, train_steps=3, eval_episodes=1,
                 max_steps=12, num_videos=1)
HANG_S = 1800  # Only catches a hang: a loaded 2-core machine compiles slowly.


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
  """(work dir, the finished `scripts/demo.py` process) of a tiny demo."""
  root = tmp_path_factory.mktemp("tiny_demo")
  workdir = root / "demo"
  args = [sys.executable, "scripts/demo.py", f"--workdir={workdir}",
          *(f"--{name}={value}" for name, value in TINY_DEMO.items())]
  result = processes.run(args, root / "logs", HANG_S, cwd=REPO,
                         env=dict(os.environ, XLA_FLAGS=""))  # What `make demo` runs.
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return workdir, result
