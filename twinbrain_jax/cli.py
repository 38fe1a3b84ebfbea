"""Entry-point plumbing for the thin `scripts/*.py`: config flag parsing with clear errors."""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable, Sequence

from absl import app, flags, logging

from twinbrain_jax.config_lib import ConfigError

DEFAULT_COMPILATION_CACHE_DIR = "~/.cache/twinbrain_jax/xla"

_COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None,
    "Persistent XLA compilation cache: a later run of the same step (same model, shapes, mesh, "
    "jax/XLA version and flags) loads its compiled executable instead of compiling it again. "
    f"Default: $JAX_COMPILATION_CACHE_DIR or {DEFAULT_COMPILATION_CACHE_DIR} (off by default in "
    "the benchmarks, which time compilation); '' turns it off.")


def _one_line(error: BaseException) -> str:
  """The last meaningful line of an error (absl wraps config-file errors with a traceback)."""
  lines = [l.strip() for l in str(error).replace("\\n", "\n").splitlines() if l.strip()]
  lines = [l for l in lines if not l.startswith(("Traceback", "File ", "^", "Pass --help"))]
  last = lines[-1].strip("'\"") if lines else type(error).__name__
  return re.sub(r"^[\w.]*Error: ", "", last)


def _parse_flags_or_exit(argv: list[str]) -> list[str]:
  """Parses absl flags; a bad `--config` or override exits with one line naming it."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {_one_line(e)}")
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    # ml_collections raises these for an override of a field that does not exist.
    text = str(e).replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    field = re.search(r"'(\w+)'", text)
    bad = [a for a in argv[1:] if field and re.match(rf"--config\.(\w+\.)*{field.group(1)}[.=]", a)]
    hint = re.search(r"Did you mean .*", text)
    sys.exit(f"error: {bad[0] if bad else 'a --config override'} names no field of the config"
             f"{' (unknown ' + repr(field.group(1)) + ')' if field else ''}"
             f"{'. ' + hint.group(0).rstrip(chr(39)) if hint else ''}")


def with_host_device_count(xla_flags: str, count: int) -> str:
  """`xla_flags` with its fake CPU device count (if any) replaced by `count` (XLA aborts on an
  unknown flag, so the old one is removed, not renamed)."""
  kept = re.sub(r"(^|\s)--xla_force_host_platform_device_count=\S*", " ", xla_flags).split()
  return " ".join([*kept, f"--xla_force_host_platform_device_count={count}"])


def use_compilation_cache(cache_dir: str) -> None:
  """Points JAX's persistent compilation cache at `cache_dir` (created on first write); '' turns
  the cache off, also where `$JAX_COMPILATION_CACHE_DIR` would turn it on.

  Only compiles slower than `jax_persistent_cache_min_compile_time_secs` (1 s) are stored. The
  cache key includes the HLO, the compile options, `XLA_FLAGS` and the jax/jaxlib versions, so a
  changed model or flag compiles afresh.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if cache_dir:
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))
  else:
    jax.config.update("jax_enable_compilation_cache", False)


def run(main: Callable[[list[str]], None], *, compilation_cache: bool = True,
        info_logs: bool = True) -> None:
  """`absl.app.run(main)` reporting config errors as one clear line instead of a traceback.

  With `compilation_cache` (scripts that train, serve or evaluate) compiled steps are cached on
  disk (`--compilation_cache_dir`); scripts that time compilation pass False, so the cache is on
  there only when the flag names a directory. Scripts that print what their user needs pass
  `info_logs=False`: INFO lines (orbax's per-load lines, connections) then show only with an
  explicit `--verbosity=0`; warnings and errors always do.
  """

  @functools.wraps(main)
  def checked_main(argv):
    if not info_logs and not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    cache_dir = _COMPILATION_CACHE_DIR.value
    if cache_dir is None:
      cache_dir = (os.environ.get("JAX_COMPILATION_CACHE_DIR", DEFAULT_COMPILATION_CACHE_DIR)
                   if compilation_cache else "")
    use_compilation_cache(cache_dir)
    try:
      return main(argv)
    except ConfigError as e:
      sys.exit(f"error: {e}")

  app.run(checked_main, flags_parser=_parse_flags_or_exit)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A markdown table of string cells, for the `scripts/bench_*.py` outputs."""
  lines = [header, ["---"] * len(header), *rows]
  return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
  """The median wall time of `repeats` calls of `fn`, each waited for (`jax.block_until_ready`);
  for the `scripts/bench_*.py` tables."""
  return interleaved_seconds([fn], repeats, warmup=0, block=repeats)[0][0]


def interleaved_seconds(fns: Sequence[Callable[[], object]], runs: int, warmup: int = 1,
                        block: int = 1) -> list[tuple[float, float]]:
  """Times each of `fns` `runs` times, alternating between them in blocks of `block` calls so
  that all see the same background load (each call waited for); returns (median, min) seconds
  per function.

  Every block starts with `warmup` untimed calls: the first call after another framework ran
  pays for cold caches (a `small` JAX train step after a PyTorch one: ~950 ms against ~700 ms).
  """
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  times = [[] for _ in fns]
  while len(times[0]) < runs:
    for fn, out in zip(fns, times):
      for _ in range(warmup):
        jax.block_until_ready(fn())
      for _ in range(min(block, runs - len(out))):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - start)
  return [(float(np.median(t)), float(np.min(t))) for t in times]
