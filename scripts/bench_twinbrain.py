"""Benchmarks TwinBrainVLA: train-step time, action-chunk latency (cached context vs recomputing
the brains every ODE step) and the analytic FLOPs of a train step.

  python scripts/bench_twinbrain.py --presets=tiny,small [--torch]

Inputs follow the benchmark convention: one 224x224 image per sample (16x16 patches, 64 merged
image tokens) and a 12-word instruction (~24 prompt tokens); train batch 4, inference batch 1.
`--torch` also times the same train step and chunk in PyTorch (`models/torch_reference.py`:
HF transformers' Qwen2.5-VL brains, AsyMoT through the left brain's KV cache, the same DiT;
`tests/test_torch_reference.py` checks it computes the same loss and gradients), fp32 only.
"""

import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from twinbrain_jax import cli, flow_matching
from twinbrain_jax.models.twinbrain import (TwinBrainConfig, TwinBrainVLA, compute_loss,
                                            sample_actions, synthetic_observation,
                                            train_step_flops)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "configs"))
import twinbrain as twinbrain_configs  # noqa: E402

_PRESETS = flags.DEFINE_list("presets", ["tiny", "small"], "Presets of configs/twinbrain.py.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed runs per measurement (median reported).")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch", 4, "Train batch size.")
_TEXT_TOKENS = flags.DEFINE_integer("text_tokens", 24, "Instruction tokens per prompt.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype (model.dtype); parameters stay fp32.")
_SCAN = flags.DEFINE_bool("scan_layers", True, "Scanned (True) or unrolled layer stacks.")
_TORCH = flags.DEFINE_bool("torch", False, "Also time the PyTorch twin of the step and chunk "
                           "(needs torch and transformers, `make install`'s test extra).")
flags.register_multi_flags_validator(
    ["torch", "dtype"], lambda f: not f["torch"] or f["dtype"] == "float32",
    "--torch compares fp32 steps; leave --dtype at float32.")

IMAGE_GRID = (1, 16, 16)  # 224 x 224 pixels.


def _compile_and_time(jitted, args, repeats):
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))  # warm-up
  return compile_s, cli.median_seconds(lambda: compiled(*args), repeats), compiled


def sample_actions_recomputing_brains(model, params, obs, grid, rng, num_steps):
  """The naive sampler: both brains and the context K/V run again at every ODE step."""
  variables = {"params": params}

  def velocity_fn(x_t, t):
    # Tie the inputs to the step so XLA cannot hoist the brains out of the ODE loop
    # (x * 0 is not folded for floats).
    step_obs = dict(obs, pixel_values=obs["pixel_values"] + 0.0 * t[0])
    context, mask = model.apply(variables, step_obs, grid, method=TwinBrainVLA.encode)
    kv = model.apply(variables, context, method=TwinBrainVLA.context_kv)
    return model.apply(variables, x_t, t, kv, mask, obs["state"], method=TwinBrainVLA.velocity)

  expert = model.config.action_expert
  shape = (obs["state"].shape[0], expert.action_horizon, expert.action_dim)
  return flow_matching.sample_actions(velocity_fn, rng, shape, num_steps=num_steps)


def bench_preset(preset, repeats):
  config_dict = twinbrain_configs.get_config(preset)
  model_cd = config_dict.model
  model_cd.left_param_dtype = "float32"  # fp32 parameters throughout, as the benchmark specifies
  model_cd.dtype = _DTYPE.value
  model_cd.scan_layers = _SCAN.value
  model_cd.action_expert.dropout = 0.0
  model_cd.state_dim = model_cd.action_expert.state_dim = 7  # the benchmark's state width
  config = TwinBrainConfig.from_config_dict(model_cd)
  num_repeats, num_steps = config_dict.flow.num_repeats, config_dict.flow.num_steps
  model = TwinBrainVLA(config)
  batch_size = _TRAIN_BATCH.value
  obs, grid = synthetic_observation(config, [_TEXT_TOKENS.value] * batch_size, IMAGE_GRID)
  expert = config.action_expert
  rng = np.random.default_rng(0)
  batch = dict(obs, actions=rng.uniform(-1, 1, (batch_size, expert.action_horizon,
                                                 expert.action_dim)).astype(np.float32),
               action_mask=np.ones((batch_size, expert.action_horizon), bool))
  noisy = jnp.zeros((batch_size, expert.action_horizon, expert.action_dim))
  params = jax.jit(lambda r: model.init(r, obs, grid, noisy, jnp.zeros(batch_size))["params"])(
      jax.random.key(0))
  params = nn.unbox(params)
  trainable = {k: v for k, v in params.items() if k != "left"}
  frozen = params.get("left")
  tx = optax.adamw(1e-4)
  opt_state = tx.init(trainable)

  # The frozen brain is an argument, as in training/step.py: closed over, its weights would be
  # baked into the executable as constants (a 234 MB HLO module for `small`).
  def train_step(trainable, frozen, opt_state, batch, rng):
    loss_fn = lambda tr: compute_loss(model, dict(tr, left=frozen) if frozen is not None else tr,
                                      batch, grid, rng, num_repeats=num_repeats)
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  train_args = (trainable, frozen, opt_state, batch, jax.random.key(1))
  train_compile, train_s, train_compiled = _compile_and_time(jax.jit(train_step), train_args,
                                                             repeats)

  obs1 = {k: (v[:, :1] if k.endswith("position_ids") else v[:1]) for k, v in obs.items()}
  obs1["pixel_values"] = obs["pixel_values"][:int(np.prod(IMAGE_GRID))]
  grid1 = grid[:1]
  cached = jax.jit(lambda p, o, r: sample_actions(model, p, o, grid1, r, num_steps=num_steps))
  naive = jax.jit(lambda p, o, r: sample_actions_recomputing_brains(model, p, o, grid1, r,
                                                                    num_steps))
  cached_compile, cached_s, cached_compiled = _compile_and_time(
      cached, (params, obs1, jax.random.key(2)), repeats)
  naive_compile, naive_s, _ = _compile_and_time(naive, (params, obs1, jax.random.key(2)), repeats)

  torch_row = {}
  if _TORCH.value:
    torch_train, torch_chunk = torch_twin_step_and_chunk(config, obs, grid, batch, obs1, grid1,
                                                         num_repeats, num_steps)
    (jax_train_s, _), (torch_train_s, _) = cli.interleaved_seconds(
        [lambda: train_compiled(*train_args), torch_train], repeats, block=3)
    (jax_chunk_s, _), (torch_chunk_s, _) = cli.interleaved_seconds(
        [lambda: cached_compiled(params, obs1, jax.random.key(2)), torch_chunk], repeats,
        block=3)
    torch_row = dict(jax_train_ms=1e3 * jax_train_s, torch_train_ms=1e3 * torch_train_s,
                     jax_chunk_ms=1e3 * jax_chunk_s, torch_chunk_ms=1e3 * torch_chunk_s)
  flops = train_step_flops(config, batch_size, obs["left_input_ids"].shape[1],
                           obs["right_input_ids"].shape[1], int(np.prod(IMAGE_GRID)), num_repeats)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  return dict(preset=preset, remat=config.remat_policy, params_m=num_params / 1e6,
              train_ms=1e3 * train_s, train_compile_s=train_compile, gflops=flops["total"] / 1e9,
              gflops_per_s=flops["total"] / 1e9 / train_s, cached_ms=1e3 * cached_s,
              cached_compile_s=cached_compile, naive_ms=1e3 * naive_s,
              naive_compile_s=naive_compile, **torch_row)


def torch_twin_step_and_chunk(config, obs, grid, batch, obs1, grid1, num_repeats, num_steps):
  """The PyTorch twin's train step (loss, backward, AdamW) and cached-context chunk as
  zero-argument callables, on the same inputs as the JAX ones."""
  import torch  # A benchmark/test dependency.

  from twinbrain_jax.models import torch_reference

  model = torch_reference.TwinBrainVLA(config, torch_reference.hf_backbone(config, 0).model,
                                       torch_reference.hf_backbone(config, 1).model)
  optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
  torch_obs = torch_reference.observation_to_torch(obs)
  torch_grid = torch.as_tensor(np.asarray(grid, np.int64))
  actions = torch.from_numpy(np.asarray(batch["actions"]))
  generator = torch.Generator().manual_seed(0)

  def train_step():
    noise, t = torch_reference.draw_noise_and_time(actions.shape[0], num_repeats,
                                                   actions.shape[1:], generator)
    optimizer.zero_grad(set_to_none=True)
    model.flow_loss(torch_obs, torch_grid, actions, noise, t).backward()
    optimizer.step()

  obs1_torch = torch_reference.observation_to_torch(obs1)
  grid1_torch = torch.as_tensor(np.asarray(grid1, np.int64))
  noise1 = torch.randn((1,) + tuple(actions.shape[1:]), generator=generator)

  def chunk():
    model.sample_actions(obs1_torch, grid1_torch, noise1, num_steps)

  return train_step, chunk


def main(argv):
  del argv
  rows = [bench_preset(p, _REPEATS.value) for p in _PRESETS.value]
  print(f"\nTwinBrainVLA on {jax.devices()[0].platform} ({jax.device_count()} device(s)), "
        f"compute {_DTYPE.value}, fp32 parameters, {'scanned' if _SCAN.value else 'unrolled'} "
        f"layers, remat {rows[0]['remat']}, train batch {_TRAIN_BATCH.value}, inference batch 1, "
        f"median of {_REPEATS.value} runs\n")
  print(cli.markdown_table(
      ["preset", "params (M)", "train step (ms)", "compile (s)", "GFLOP/step", "GFLOP/s",
       "chunk, cached (ms)", "compile (s)", "chunk, brains per step (ms)", "compile (s)",
       "speed-up"],
      [[r["preset"], f"{r['params_m']:.1f}", f"{r['train_ms']:.1f}",
        f"{r['train_compile_s']:.1f}", f"{r['gflops']:.2f}", f"{r['gflops_per_s']:.1f}",
        f"{r['cached_ms']:.1f}", f"{r['cached_compile_s']:.1f}", f"{r['naive_ms']:.1f}",
        f"{r['naive_compile_s']:.1f}", f"{r['naive_ms'] / r['cached_ms']:.2f}x"] for r in rows]))
  if _TORCH.value:
    import torch  # pylint: disable=g-import-not-at-top
    print(f"\nAgainst the PyTorch twin (torch {torch.__version__}, {torch.get_num_threads()} "
          "threads, fp32), timed in alternating blocks of 3 runs, each after an untimed one; "
          "ratio > 1: JAX is faster\n")
    print(cli.markdown_table(
        ["preset", "train step, JAX (ms)", "train step, PyTorch (ms)", "PyTorch / JAX",
         "chunk, JAX (ms)", "chunk, PyTorch (ms)", "PyTorch / JAX"],
        [[r["preset"], f"{r['jax_train_ms']:.1f}", f"{r['torch_train_ms']:.1f}",
          f"{r['torch_train_ms'] / r['jax_train_ms']:.2f}x", f"{r['jax_chunk_ms']:.1f}",
          f"{r['torch_chunk_ms']:.1f}", f"{r['torch_chunk_ms'] / r['jax_chunk_ms']:.2f}x"]
         for r in rows]))


if __name__ == "__main__":
  cli.run(main, compilation_cache=False)
