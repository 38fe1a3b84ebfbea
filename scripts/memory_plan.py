"""Per-device memory of a training run, from abstract arrays and AOT compilation of the full
train step (nothing is allocated). Fakes `--num_devices` CPU devices when no accelerator is
present.

  python scripts/memory_plan.py --config=configs/twinbrain.py:qwen25vl_3b --num_devices=16
  python scripts/memory_plan.py --config=configs/twinbrain.py:qwen25vl_3b --num_devices=8 \
      --config.mesh.fsdp=4 --config.mesh.data=2 --batch_size=64
  # The largest batch that fits 80 GiB per device, without and with remat:
  python scripts/memory_plan.py --config=configs/twinbrain.py:qwen25vl_7b --num_devices=64 \
      --fit_gib=80 --remat_policies=none,full
"""

import os
import re
import sys

from twinbrain_jax import cli  # Imports no JAX.

# The fake device count must be set before JAX starts.
_match = [re.match(r"--num_devices=(\d+)", a) for a in sys.argv]
_count = int(next((m.group(1) for m in _match if m), "8"))
if "JAX_PLATFORMS" not in os.environ or os.environ["JAX_PLATFORMS"] == "cpu":
  os.environ["XLA_FLAGS"] = cli.with_host_device_count(os.environ.get("XLA_FLAGS", ""), _count)

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from twinbrain_jax.training import memory  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/twinbrain.py:tiny", "Config file:preset.")
flags.DEFINE_integer("num_devices", 8, "Fake CPU devices (CPU only).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch; default data.batch_size.")
_COMPILE = flags.DEFINE_bool("compile", True, "AOT-compile the step for its temporaries.")
_FIT_GIB = flags.DEFINE_float("fit_gib", None, "Search the largest global batch whose compiled "
                              "step fits this many GiB per device (ignores --batch_size).")
_FAST = flags.DEFINE_bool("fast_cpu_compile", True, "On CPU, compile without LLVM optimisation "
                          "(same bytes, about half the compile time; the step is never run).")
_BF16_NATIVE = flags.DEFINE_bool(
    "cpu_bf16_as_native", True, "On CPU, keep XLA from converting whole stacks of bf16 weights "
    "to f32 ahead of the layer loop (XLA:CPU has no bf16 matmul; accelerators hold no such "
    "copies). --nocpu_bf16_as_native plans with the copies.")
_REMAT = flags.DEFINE_list("remat_policies", None, "model.remat_policy values to plan, one row "
                           "each; default the config's.")


def _row(preset, remat, plan, note=""):
  gib = lambda b: "n/a" if b is None else f"{b / 2**30:.2f}"
  seconds = lambda s: "n/a" if s is None else f"{s:.0f}"
  return (f"| {preset} | {plan.mesh} | {remat} | {plan.batch_size} | {gib(plan.params_bytes)} | "
          f"{gib(plan.frozen_bytes)} | {gib(plan.optimizer_bytes)} | {gib(plan.temp_bytes)} | "
          f"{gib(plan.total_bytes)} | {seconds(plan.lower_seconds)} | "
          f"{seconds(plan.compile_seconds)} | {note} |")


def main(argv):
  del argv
  config = _CONFIG.value
  preset = config.get("preset")
  rows, plans = [], []
  for remat in _REMAT.value or [config.model.remat_policy]:
    config.model.remat_policy = remat
    if _FIT_GIB.value is None:
      plans.append(memory.memory_plan(config, _BATCH.value, _COMPILE.value, _FAST.value,
                                      _BF16_NATIVE.value))
      rows.append(_row(preset, remat, plans[-1]))
    else:
      print(f"{preset}, remat {remat}: the largest batch within {_FIT_GIB.value} GiB per device")
      try:
        fits, too_big = memory.largest_fitting_batch(config, int(_FIT_GIB.value * 2**30),
                                                     fast_cpu_compile=_FAST.value,
                                                     cpu_bf16_as_native=_BF16_NATIVE.value)
      except memory.DoesNotFit as err:  # This remat's row says so; the next remat still runs.
        print(f"  {err}")
        plans.append(err.plan)
        rows.append(_row(preset, remat, err.plan, "batch 1 per device does not fit"))
        continue
      plans.append(fits)
      rows += [_row(preset, remat, fits, "largest that fits"),
               _row(preset, remat, too_big, "next batch: does not fit")]
  print(f"\n{preset}: {plans[0].trainable_params / 1e9:.2f} B trainable, "
        f"{plans[0].frozen_params / 1e9:.2f} B frozen parameters. Per device, GiB; temporaries "
        "and total from XLA's memory_analysis() of the compiled step; lower / compile in s.\n")
  print("| preset | mesh | remat | global batch | trainable params | frozen params | "
        "optimizer state | step temporaries | total | lower s | compile s | |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  print("\n".join(rows))


if __name__ == "__main__":
  cli.run(main, compilation_cache=False)
