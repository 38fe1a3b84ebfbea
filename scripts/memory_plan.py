"""Per-device memory of a training run, from abstract arrays and AOT compilation (nothing is
allocated). Fakes `--num_devices` CPU devices when no accelerator is present.

  python scripts/memory_plan.py --config=configs/twinbrain.py:qwen25vl_3b --num_devices=16
  python scripts/memory_plan.py --config=configs/twinbrain.py:qwen25vl_3b --num_devices=8 \
      --config.mesh.fsdp=4 --config.mesh.data=2 --batch_size=64
"""

import os
import re
import sys

# The fake device count must be set before JAX starts.
_match = [re.match(r"--num_devices=(\d+)", a) for a in sys.argv]
_count = next((m.group(1) for m in _match if m), "8")
if "JAX_PLATFORMS" not in os.environ or os.environ["JAX_PLATFORMS"] == "cpu":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=", "--unused=") +
      f" --xla_force_host_platform_device_count={_count}")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from twinbrain_jax import cli  # noqa: E402
from twinbrain_jax.training import memory  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/twinbrain.py:tiny", "Config file:preset.")
flags.DEFINE_integer("num_devices", 8, "Fake CPU devices (CPU only).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch; default data.batch_size.")
_COMPILE = flags.DEFINE_bool("compile", True, "AOT-compile the step for its temporaries.")


def main(argv):
  del argv
  plan = memory.memory_plan(_CONFIG.value, _BATCH.value, _COMPILE.value)
  gib = lambda b: "n/a" if b is None else f"{b / 2**30:9.3f}"
  print(f"preset {_CONFIG.value.get('preset')}  mesh {plan.mesh}  global batch {plan.batch_size}  "
        f"params: {plan.trainable_params / 1e9:.2f} B trainable, "
        f"{plan.frozen_params / 1e9:.2f} B frozen")
  print("| per device (GiB) | |")
  print("|---|---|")
  for name, value in (("trainable params", plan.params_bytes),
                      ("frozen left brain", plan.frozen_bytes),
                      ("optimizer state", plan.optimizer_bytes),
                      ("gradients", plan.gradient_bytes),
                      ("step temporaries (XLA)", plan.temp_bytes),
                      ("total", plan.total_bytes)):
    print(f"| {name} | {gib(value)} |")


if __name__ == "__main__":
  cli.run(main)
