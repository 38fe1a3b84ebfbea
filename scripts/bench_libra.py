"""Benchmarks Libra-VLA's latency per executed chunk against single-model systems, on CPU.

  python scripts/bench_libra.py --presets=tiny,small

Rows, per preset (batch 1, fp32, one 224x224 image, a 24-token instruction, random weights):
  monolithic      one VLM + DiT (TwinBrain's `monolithic` variant, Qwen-GR00T): one full model
                  call per chunk (VLM once, DiT per ODE step)
  twinbrain       both brains + DiT, one full call per chunk
  libra M=1,2,5   interleaved runtime: the planner every M chunks, the refiner every chunk;
                  the mean over whole plan cycles, i.e. (planner + M x refiner) / M
  libra async     M=2, the planner in a background thread; the time each `step` call takes
                  (the caller never waits for the planner once a plan exists; on a CPU the
                  background planner competes for the same cores)
Every system samples with `flow.num_steps` Euler steps; Libra's chunk is one segment of H steps.
The machine's load average is printed with the table (the figures depend on it).
"""

import os
import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from twinbrain_jax import cli
from twinbrain_jax.models import libra, twinbrain
from twinbrain_jax.serving.libra import AsyncRunner, InterleavedRunner

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "configs"))
import libra as libra_configs  # noqa: E402
import twinbrain as twinbrain_configs  # noqa: E402

_PRESETS = flags.DEFINE_list("presets", ["tiny", "small"], "Presets of configs/libra.py.")
_CYCLES = flags.DEFINE_integer("cycles", 6, "Timed plan cycles (of M chunks) per Libra row; "
                               "timed calls per single-model row.")
_SEGMENTS = flags.DEFINE_list("segments", ["1", "2", "5"], "M of the interleaved rows.")
_TEXT_TOKENS = flags.DEFINE_integer("text_tokens", 24, "Instruction tokens per prompt.")

IMAGE_GRID = (1, 16, 16)  # 224 x 224 pixels.


def _time_calls(fn, calls):
  """Wall seconds of each of `calls` calls of `fn` (which returns host numpy, so it waits)."""
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return np.asarray(times)


def _single_model_chunk(preset, variant, calls):
  """(params in M, seconds per chunk) of a TwinBrain-family model sampling one chunk per call."""
  cd = twinbrain_configs.get_config(preset)
  cd.model.update(variant=variant, left_param_dtype="float32", state_dim=7)
  cd.model.action_expert.update(dropout=0.0, state_dim=7)
  config = twinbrain.TwinBrainConfig.from_config_dict(cd.model)
  model = twinbrain.TwinBrainVLA(config)
  obs, grid = twinbrain.synthetic_observation(config, [_TEXT_TOKENS.value], IMAGE_GRID)
  noisy = jnp.zeros(twinbrain.action_chunk_shape(config, 1))
  params = nn.unbox(jax.jit(lambda r: model.init(r, obs, grid, noisy, jnp.zeros(1))["params"])(
      jax.random.key(0)))
  sample = jax.jit(lambda p, o, r: twinbrain.sample_actions(model, p, o, grid, r,
                                                            num_steps=cd.flow.num_steps))
  run = lambda: np.asarray(sample(params, obs, jax.random.key(1)))
  run()  # Compile.
  return sum(x.size for x in jax.tree.leaves(params)) / 1e6, _time_calls(run, calls)


def _libra_parts(preset, num_segments):
  """(params in M, plan_fn, refine_fn, batch) of Libra with M = `num_segments`."""
  cd = libra_configs.get_config(preset)
  cd.model.update(num_segments=num_segments, state_dim=7)
  cd.model.refiner.update(dropout=0.0, state_dim=7)
  config = libra.LibraConfig.from_config_dict(cd.model)
  model = libra.LibraVLA(config)
  obs, grid = libra.synthetic_observation(config, [_TEXT_TOKENS.value], IMAGE_GRID)
  noise = jnp.zeros(libra.segment_shape(config, 1))
  params = nn.unbox(jax.jit(lambda r: model.init(r, obs, grid, noise, jnp.zeros(1))["params"])(
      jax.random.key(0)))
  plan = jax.jit(lambda p, o: libra.plan(model, p, o, grid))
  refine = jax.jit(lambda p, o, b, n: libra.refine(model, p, o, b, n,
                                                   num_steps=cd.flow.num_steps))
  plan_fn = lambda batch: np.asarray(plan(params, batch))[0]
  refine_fn = lambda batch, bins: np.asarray(refine(params, batch, bins[None], noise))[0]
  refine_fn(obs, plan_fn(obs)[0])  # Compile both.
  return sum(x.size for x in jax.tree.leaves(params)) / 1e6, plan_fn, refine_fn, obs


def bench_preset(preset):
  rows = []
  calls = _CYCLES.value * 2
  for variant in ("monolithic", "twinbrain"):
    size, times = _single_model_chunk(preset, variant, calls)
    rows.append(dict(system=variant, params_m=size, times=times))
  for m in map(int, _SEGMENTS.value):
    size, plan_fn, refine_fn, batch = _libra_parts(preset, m)
    runner = InterleavedRunner(plan_fn, refine_fn)
    times = _time_calls(lambda: runner.step(batch), _CYCLES.value * m)
    bins = plan_fn(batch)[0]
    rows.append(dict(system=f"libra interleaved M={m}", params_m=size, times=times,
                     plan_ms=1e3 * np.median(_time_calls(lambda: plan_fn(batch), 3)),
                     refine_ms=1e3 * np.median(_time_calls(lambda: refine_fn(batch, bins), 3))))
    if m == 2:
      runner = AsyncRunner(plan_fn, refine_fn)
      runner.step(batch)  # The first plan is synchronous: not part of the steady state.
      times = _time_calls(lambda: runner.step(batch), _CYCLES.value * m)
      runner.wait_for_plan()
      runner.close()
      rows.append(dict(system="libra async M=2", params_m=size, times=times,
                       plans=runner.plan_calls - 1))
  return rows


def print_table(preset, rows, load_before):
  print(f"\n{preset}: latency per executed chunk on {jax.devices()[0].platform} "
        f"({os.cpu_count()} cores), fp32, batch 1; load average (1, 5, 15 min) before "
        f"{load_before}, after {os.getloadavg()}\n")
  header = ("| preset | system | params (M) | mean ms / chunk | p90 ms | vs monolithic | "
            "planner ms | refiner ms |")
  print(header)
  print("|" + "---|" * (header.count("|") - 1))
  base = rows[0]["times"].mean()
  for r in rows:
    mean = r["times"].mean()
    extra = (f"{r['plan_ms']:.1f} | {r['refine_ms']:.1f}" if "plan_ms" in r
             else f"({r['plans']} plans in background) | " if "plans" in r else " | ")
    print(f"| {preset} | {r['system']} | {r['params_m']:.1f} | {1e3 * mean:.1f} | "
          f"{1e3 * np.percentile(r['times'], 90):.1f} | {100 * (mean / base - 1):+.1f} % | "
          f"{extra} |", flush=True)


def main(argv):
  del argv
  for preset in _PRESETS.value:  # One table per preset, printed as soon as it is measured.
    load_before = os.getloadavg()
    print_table(preset, bench_preset(preset), load_before)


if __name__ == "__main__":
  cli.run(main, compilation_cache=False)
