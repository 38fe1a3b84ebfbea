"""Entry-point plumbing for the thin `scripts/*.py`: config flag parsing with clear errors."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags


def _parse_flags_or_exit(argv: list[str]) -> list[str]:
  """Parses absl flags; a bad `--config` or override exits with one line naming it."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}\nPass --help for the flags.")
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    bad = [a for a in argv[1:] if a.startswith("--config")]
    detail = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ")
    sys.exit(f"error: could not apply {' '.join(bad) or 'the config flags'}: {detail}")


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)` with config errors reported as one clear line instead of a traceback."""
  app.run(main, flags_parser=_parse_flags_or_exit)
