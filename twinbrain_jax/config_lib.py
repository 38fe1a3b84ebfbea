"""Small helpers shared by the `configs/*.py` files: presets and validation."""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Callable, Mapping

import ml_collections


class ConfigError(ValueError):
  """A configuration that names something unknown or inconsistent."""


def select_preset(arg: str | None, presets: Mapping[str, Callable[[], ml_collections.ConfigDict]],
                  config_file: str, default: str) -> ml_collections.ConfigDict:
  """Returns `presets[arg]()`; an unknown name is an error listing the known ones."""
  name = arg or default
  if name not in presets:
    raise ConfigError(
        f"Unknown preset {name!r} for {config_file}; choose one of: {', '.join(sorted(presets))} "
        f"(e.g. --config={config_file}:{default}).")
  config = presets[name]()
  config.preset = name
  return config


def preset_from_file(path: str | pathlib.Path, preset: str) -> ml_collections.ConfigDict:
  """`<path>:<preset>` of a config file loaded by path (`configs/` is not a package), so one
  config file can start from another's presets."""
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem + "_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)
