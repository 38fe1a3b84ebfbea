"""Train-step time, tokens/s and analytic-FLOP MFU of a preset's sharded training step, and the
action-chunk latency, on whatever devices JAX sees (meant for GPUs and TPUs).

  python scripts/bench_accelerator.py --config=configs/twinbrain.py:qwen25vl_3b --batch_size=64
  python scripts/bench_accelerator.py --config=configs/twinbrain.py:small --batch_size=32 \
      --config.model.dtype=bfloat16 --peak=h100

The step is the training loop's (`step.make_train_step`, FSDP/DP per `config.mesh`, random
init); inputs are synthetic prompts with one `data.image_size` image per sample and
`--text_tokens` instruction tokens. MFU = analytic FLOPs per step (`train_step_flops`) / step
time / (devices x the dense bf16 peak of `--peak`, or `train.peak_flops_per_device`).
"""

import time

import flax.linen as nn
import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from twinbrain_jax import cli
from twinbrain_jax import sharding as sharding_lib
from twinbrain_jax.models.twinbrain import (TwinBrainVLA, sample_actions, synthetic_observation,
                                            train_step_flops)
from twinbrain_jax.training import optimizer as optimizer_lib
from twinbrain_jax.training import state as state_lib
from twinbrain_jax.training import step as step_lib
from twinbrain_jax.training.loop import image_size

# Dense (no sparsity) bf16 peak FLOP/s per device, from the vendors' data sheets.
PEAK_FLOPS = {
    "h100": 989e12,   # H100 SXM
    "h200": 989e12,   # H200 SXM (same compute as H100 SXM)
    "a100": 312e12,   # A100 SXM / PCIe
    "tpu_v4": 275e12,
    "tpu_v5e": 197e12,
    "tpu_v5p": 459e12,
}

_CONFIG = config_flags.DEFINE_config_file("config", "configs/twinbrain.py:small", "Config:preset.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global train batch; default data.batch_size.")
_TEXT = flags.DEFINE_integer("text_tokens", 24, "Instruction tokens per prompt.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps (median reported).")
_PEAK = flags.DEFINE_enum("peak", None, sorted(PEAK_FLOPS),
                          "Device whose peak the MFU uses; default train.peak_flops_per_device.")


def main(argv):
  del argv
  config = _CONFIG.value
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.logical_axis_rules(config.logical_axis_rules, mesh)
  batch_size = int(_BATCH.value or config.data.batch_size)
  step_lib.check_batch_size(batch_size, mesh, int(config.train.grad_accum_steps))
  model_config = state_lib.model_config(config)
  model = TwinBrainVLA(model_config)
  patch = model_config.backbone.vision.patch_size
  height, width = image_size(config.data)
  obs, grid = synthetic_observation(model_config, [_TEXT.value] * batch_size,
                                    (1, height // patch, width // patch))
  expert = model_config.action_expert
  rng = np.random.default_rng(0)
  batch = dict(obs, actions=rng.uniform(-1, 1, (batch_size, expert.action_horizon,
                                                 expert.action_dim)).astype(np.float32),
               action_mask=np.ones((batch_size, expert.action_horizon), bool))
  tx = optimizer_lib.make_optimizer(config.train)
  _, shardings = state_lib.abstract_state(model, tx, mesh, rules, config.seed)
  state = state_lib.create_train_state(model, tx, mesh, rules, config.seed, shardings)
  batch_shardings = step_lib.batch_shardings(mesh, batch)
  batch = {k: jax.device_put(v, batch_shardings[k]) for k, v in batch.items()}
  step = step_lib.jit_train_step(
      step_lib.make_train_step(model, tx, grid, config.flow.num_repeats,
                               int(config.train.grad_accum_steps)),
      shardings, batch_shardings, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = [state]

    def run():
      holder[0], metrics = compiled(holder[0], batch)
      return metrics["loss"]

    jax.block_until_ready(run())  # Warm-up.
    step_s = cli.median_seconds(run, _REPEATS.value)
    params = holder[0].all_params()
    obs1 = {k: (v[:, :1] if k.endswith("position_ids") else v[:1]) for k, v in obs.items()}
    obs1["pixel_values"] = obs["pixel_values"][:int(np.prod(grid[0]))]
    sampler = jax.jit(lambda p, o, r: sample_actions(model, p, o, grid[:1], r,
                                                     num_steps=config.flow.num_steps))
    chunk = sampler.lower(params, obs1, jax.random.key(0)).compile()
    jax.block_until_ready(chunk(params, obs1, jax.random.key(0)))
    chunk_s = cli.median_seconds(lambda: chunk(params, obs1, jax.random.key(0)), _REPEATS.value)

  flops = train_step_flops(model_config, batch_size, obs["left_input_ids"].shape[1],
                           obs["right_input_ids"].shape[1], int(np.prod(grid[0])),
                           config.flow.num_repeats)["total"]
  peak = PEAK_FLOPS[_PEAK.value] if _PEAK.value else float(config.train.peak_flops_per_device)
  tokens = batch_size * (obs["left_input_ids"].shape[1] + obs["right_input_ids"].shape[1])
  device = jax.devices()[0]
  # Accelerators report their allocator's high-water mark; XLA:CPU reports nothing.
  peak_bytes = (device.memory_stats() or {}).get("peak_bytes_in_use")
  peak_gib = f"{peak_bytes / 2**30:.1f}" if peak_bytes else "n/a"
  print(f"\n{config.get('preset')} on {jax.device_count()} x {device.platform} "
        f"({device.device_kind}), mesh {dict(mesh.shape)}, compute {model_config.dtype}, "
        f"global batch {batch_size}, peak {peak:.3g} FLOP/s per device\n")
  print("| train step ms | compile s | samples/s | tokens/s | TFLOP/step | MFU | chunk ms "
        "(batch 1) | peak GiB per device |")
  print("|---|---|---|---|---|---|---|---|")
  print(f"| {1e3 * step_s:.1f} | {compile_s:.1f} | {batch_size / step_s:.1f} | "
        f"{tokens / step_s:.0f} | {flops / 1e12:.4g} | "
        f"{flops / step_s / (peak * jax.device_count()):.2%} | {1e3 * chunk_s:.1f} | {peak_gib} |")


if __name__ == "__main__":
  cli.run(main, compilation_cache=False)
