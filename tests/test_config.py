"""Config presets and the command-line errors users meet first."""

import os
import pathlib
import sys

import pytest

import processes
from twinbrain_jax import sharding
from twinbrain_jax.config_lib import ConfigError
from twinbrain_jax.models.twinbrain import TwinBrainConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import twinbrain as twinbrain_config  # noqa: E402  (configs/ is not a package)


@pytest.mark.parametrize("preset", sorted(twinbrain_config.PRESETS))
def test_presets_build_and_name_known_mesh_axes(preset):
  config = twinbrain_config.get_config(preset)
  assert config.preset == preset
  assert set(config.mesh.keys()) == set(sharding.MESH_AXES)
  rules = sharding.logical_axis_rules(config.logical_axis_rules)
  assert {"batch", "embed", "mlp", "heads", "kv", "vocab", "length"} <= {n for n, _ in rules}
  text = config.model.backbone.text
  head_dim = text.get("head_dim", text.hidden_size // text.num_attention_heads)
  assert sum(text.mrope_section) * 2 == head_dim
  model = TwinBrainConfig.from_config_dict(config.model)
  assert model.backbone.family == config.model.backbone.family
  vision = config.model.backbone.vision
  assert config.data.pad_to_multiple == vision.patch_size * vision.spatial_merge_size


def test_unknown_preset_lists_the_known_ones():
  with pytest.raises(ConfigError, match=r"Unknown preset 'huge'.*qwen25vl_3b.*tiny"):
    twinbrain_config.get_config("huge")


def _show_config(*args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  return processes.run([sys.executable, "scripts/show_config.py", *args], cwd=REPO, env=env)


def test_command_line_override_applies():
  result = _show_config("--config=configs/twinbrain.py:tiny", "--config.mesh.fsdp=2")
  assert result.returncode == 0, result.stderr
  assert "mesh: {'data': 4, 'fsdp': 2, 'tensor': 1}" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--config=configs/twinbrain.py:tiny", "--config.mesh.dta=2"],
     "error: --config.mesh.dta=2 names no field of the config (unknown 'dta'). "
     "Did you mean \"data\""),
    (["--config=configs/twinbrain.py:tiny", "--config.modl.seed=1"], "unknown 'modl'"),
    (["--config=configs/twinbrain.py:huge"], "error: Unknown preset 'huge'"),
    (["--config=configs/twinbrain.py:tiny", "--config.mesh.data=3"],
     "error: config.mesh {'data': 3, 'fsdp': 1, 'tensor': 1} multiplies to 3 devices but 8"),
    (["--config=configs/twinbrain.py:tiny", "--config.mesh.tensor=3"], "does not divide the 8"),
])
def test_command_line_errors_are_one_clear_line(args, message):
  result = _show_config(*args)
  assert result.returncode != 0
  assert message in result.stderr
  assert "Traceback" not in result.stderr
