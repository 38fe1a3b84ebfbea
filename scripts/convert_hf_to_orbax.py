"""Converts a Hugging Face Qwen2.5-VL checkpoint directory to an orbax checkpoint of the params.

  python scripts/convert_hf_to_orbax.py --hf_dir=/ckpt/Qwen2.5-VL-3B-Instruct \
      --out_dir=/ckpt/qwen25vl_3b_orbax --dtype=bfloat16

Writes `out_dir/params` (orbax) and `out_dir/config.json`; restore with
`twinbrain_jax.models.hf_loading.restore_orbax(out_dir, mesh=..., rules=...)`. The params are
loaded sharded over the config's mesh (`--config.mesh.fsdp=-1` for FSDP over all devices).
"""

import jax
import jax.numpy as jnp
from absl import flags
from ml_collections import config_flags

from twinbrain_jax import cli, sharding
from twinbrain_jax.models import hf_loading

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/twinbrain.py:tiny", "Config file:preset (only its mesh and rules are used).")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face checkpoint directory.", required=True)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write the orbax checkpoint.",
                               required=True)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter dtype.")


def main(argv):
  del argv
  config = _CONFIG.value
  sharding.maybe_initialize_distributed(config.distributed)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_axis_rules(config.logical_axis_rules, mesh)
  params = hf_loading.load_params(_HF_DIR.value, param_dtype=jnp.dtype(_DTYPE.value), mesh=mesh,
                                  rules=rules)
  hf_loading.save_orbax(params, _OUT_DIR.value, _HF_DIR.value)
  count = sum(x.size for x in jax.tree.leaves(params))
  print(f"wrote {count / 1e6:.1f}M {_DTYPE.value} parameters to {_OUT_DIR.value}")


if __name__ == "__main__":
  cli.run(main)
