"""The scripts' persistent compilation cache (`cli.run`, `--compilation_cache_dir`): a second run
of the same step loads the compiled executable, with the same result; '' and the benchmark
scripts' `compilation_cache=False` write nothing."""

import os
import pathlib
import sys

import pytest

import processes

# A script as thin as `scripts/*.py`: one jitted function, its result printed.
_SCRIPT = """
import sys
import jax, jax.numpy as jnp
from twinbrain_jax import cli
def main(argv):
  f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
  print(repr(float(f(jnp.arange(12.0).reshape(3, 4) / 7))))
cli.run(main, compilation_cache=sys.argv.pop(1) == "cache")
"""
_HIT = "Persistent compilation cache hit"


def _run_script(mode, flags, env_cache_dir):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(env_cache_dir),
             # Cache even this tiny compile; log cache hits and misses to stderr.
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_LOG_COMPILES="1",
             PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
  result = processes.run([sys.executable, "-c", _SCRIPT, mode, *flags], env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  return float(result.stdout), result.stderr


def _entries(path):
  return sorted(p.name for p in path.glob("*-cache")) if path.exists() else []


def test_a_second_run_loads_the_compiled_step(tmp_path):
  cache, env_cache = tmp_path / "cache", tmp_path / "env_cache"
  first, log = _run_script("cache", [f"--compilation_cache_dir={cache}"], env_cache)
  assert _HIT not in log
  entries = _entries(cache)
  assert any(name.startswith("jit__lambda") for name in entries), entries
  second, log = _run_script("cache", [f"--compilation_cache_dir={cache}"], env_cache)
  assert _HIT in log and second == first
  assert _entries(cache) == entries and not env_cache.exists()


@pytest.mark.parametrize("mode,flags,written", [
    ("cache", [], "env"),  # no flag: $JAX_COMPILATION_CACHE_DIR
    ("cache", ["--compilation_cache_dir="], None),  # '' turns it off, also over the variable
    ("no_cache", [], None),  # benchmark scripts: off unless the flag names a directory
    ("no_cache", ["--compilation_cache_dir={flag}"], "flag"),
])
def test_where_the_cache_is_written(tmp_path, mode, flags, written):
  dirs = {"env": tmp_path / "env_cache", "flag": tmp_path / "flag_cache"}
  _run_script(mode, [f.format(flag=dirs["flag"]) for f in flags], dirs["env"])
  for name, path in dirs.items():
    assert bool(_entries(path)) == (name == written), (name, _entries(path))
