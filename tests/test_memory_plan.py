"""The memory plan's search for the largest batch that fits (with stand-in compiled plans)."""

import dataclasses
import os
import pathlib
import sys

import ml_collections
import pytest

import processes
from twinbrain_jax import cli
from twinbrain_jax.training import memory

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class _Plan:
  batch_size: int
  total_bytes: int
  compile_seconds: float = 0.0


@pytest.mark.parametrize("bytes_per_device_batch", [
    lambda b: 10 + 3 * b,  # linear
    lambda b: 10 + b + b * b // 40,  # grows faster than the line through batches 1 and 2
    lambda b: 70 + b // 20,  # nearly flat (full remat)
])
def test_largest_fitting_batch_is_exact(monkeypatch, bytes_per_device_batch):
  config = ml_collections.ConfigDict(dict(
      mesh=dict(data=-1, fsdp=1, tensor=1), train=dict(grad_accum_steps=1)))
  compiled = []

  def fake_plan(config, batch_size, fast_cpu_compile, cpu_bf16_as_native):
    assert fast_cpu_compile and cpu_bf16_as_native
    compiled.append(batch_size)
    return _Plan(batch_size, bytes_per_device_batch(batch_size // 8))

  monkeypatch.setattr(memory, "memory_plan", fake_plan)
  budget = 200
  fits, too_big = memory.largest_fitting_batch(config, budget, log=lambda _: None)
  per_device = max(b for b in range(1, 5000) if bytes_per_device_batch(b) <= budget)
  assert fits.batch_size == 8 * per_device and fits.total_bytes <= budget
  assert too_big.batch_size == 8 * (per_device + 1) and too_big.total_bytes > budget
  # Each batch compiled once; logarithmic in the range even for a step-like curve.
  assert len(compiled) == len(set(compiled)) <= 30, compiled
  if bytes_per_device_batch(3) - bytes_per_device_batch(2) == 3:  # Linear: the line is exact.
    assert len(compiled) == 4, compiled


def test_a_budget_below_one_sample_per_device_says_so_with_that_plan(monkeypatch):
  config = ml_collections.ConfigDict(dict(
      mesh=dict(data=-1, fsdp=1, tensor=1), train=dict(grad_accum_steps=1)))
  monkeypatch.setattr(memory, "memory_plan", lambda config, batch_size, **_: _Plan(batch_size, 50))
  with pytest.raises(memory.DoesNotFit, match="Even a batch of 8 .* needs") as error:
    memory.largest_fitting_batch(config, 49, log=lambda _: None)
  assert error.value.plan.batch_size == 8 and error.value.plan.total_bytes == 50


def test_compiled_plan_of_the_tiny_step():
  """The real path: abstract state + AOT-compiled step on an FSDP mesh of 8 fake devices. The
  plan-only compile (no LLVM optimisation) reports the same bytes as the default compile."""
  from fixtures_training import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config((1, 8, 1))
  fast = memory.memory_plan(config, batch_size=16)
  full = memory.memory_plan(config, batch_size=16, fast_cpu_compile=False)
  for name in ("temp_bytes", "argument_bytes", "output_bytes", "alias_bytes", "total_bytes"):
    assert getattr(fast, name) == getattr(full, name), name
  resident = fast.params_bytes + fast.frozen_bytes + fast.optimizer_bytes
  # The donated state comes back as the step's output, in the same buffers.
  assert fast.alias_bytes >= resident > 0
  assert fast.argument_bytes > resident  # The state and the batch.
  assert fast.total_bytes == (fast.argument_bytes + fast.output_bytes - fast.alias_bytes
                              + fast.temp_bytes)
  assert fast.temp_bytes > 0 and fast.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
  # FSDP over 8 devices: each device holds about an eighth of the trainable parameters.
  assert fast.params_bytes * 8 >= fast.trainable_params * 4
  assert fast.params_bytes * 8 < fast.trainable_params * 4 * 1.5


def test_the_script_replaces_the_device_count_of_xla_flags(tmp_path):
  """`make` exports XLA_FLAGS with a device count: the script's own count replaces it, and the
  other flags stay."""
  assert cli.with_host_device_count(
      "--xla_force_host_platform_device_count=8 --xla_cpu_enable_fast_math=false", 4) == (
          "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=4")
  assert cli.with_host_device_count("", 2) == "--xla_force_host_platform_device_count=2"
  result = processes.run(
      [sys.executable, "scripts/memory_plan.py", "--num_devices=4", "--compile=false",
       "--config=configs/twinbrain.py:tiny", "--config.mesh.data=4"], tmp_path,
      cwd=REPO, env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| tiny | {'data': 4, 'fsdp': 1, 'tensor': 1} |" in result.stdout, result.stdout[-2000:]
