"""Shared fixtures. Eight fake CPU devices must be requested before JAX is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shutil  # noqa: E402
import tempfile  # noqa: E402

# Every compile of this test process and of the scripts its tests start goes through a
# persistent compilation cache of its own (the scripts' default, ~/.cache, stays untouched): the
# same tiny steps, compiled again by other tests and script runs, load instead of compiling.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="twinbrain_jax_test_xla_cache_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILATION_CACHE

import sys  # noqa: E402

import pytest  # noqa: E402


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


def pytest_unconfigure(config):
  del config
  shutil.rmtree(_COMPILATION_CACHE, ignore_errors=True)
