"""Shared fixtures. Eight fake CPU devices must be requested before JAX is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# XLA:CPU aborts the process when one of the fake devices has not reached a collective 40 s after
# the others (`rendezvous.cc: Termination timeout ... Exiting`), which a starved thread on 2 loaded
# cores can take: wait up to 30 minutes instead (the test run's own hang timeout), for this process
# and the scripts it starts.
if "xla_cpu_collective_call_terminate_timeout_seconds" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += (" --xla_cpu_collective_call_terminate_timeout_seconds=1800"
                              " --xla_cpu_collective_call_warn_stuck_timeout_seconds=120")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# No persistent compilation cache in the tests, nor in the scripts they start ('' turns the
# scripts' default ~/.cache/twinbrain_jax/xla off): every test compiles what it checks and
# nothing is written outside the test's directories (the cache is tested on its own).
os.environ["JAX_COMPILATION_CACHE_DIR"] = ""

import sys  # noqa: E402

import pytest  # noqa: E402

from fixtures_demo import tiny_demo  # noqa: E402,F401  (one tiny demo per session, see there)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
  """TensorFlow stays out of the test processes: it makes its LLVM symbols global on import, and
  Mesa's software OpenGL (Meta-World rendering, in the same pytest worker) then segfaults. Tests
  that need TensorFlow run it in a subprocess."""
  result = yield
  if "tensorflow" in sys.modules:
    raise AssertionError(f"{item.nodeid} loaded TensorFlow into the pytest worker; run the "
                         "TensorFlow part in a subprocess (see tests/test_data_convert.py).")
  return result
