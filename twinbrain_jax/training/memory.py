"""Memory plan: per-device bytes of a training run, before anything is allocated.

Params, optimizer state and gradients come from the abstract (sharded) train state; the step's
temporaries (activations kept for the backward pass, workspace) from XLA's ahead-of-time
compilation of the real train step (`jit(...).lower(abstract...).compile().memory_analysis()`).
"""

from __future__ import annotations

import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from twinbrain_jax import sharding as sharding_lib
from twinbrain_jax.models.twinbrain import TwinBrainVLA
from twinbrain_jax.training import optimizer as optimizer_lib
from twinbrain_jax.training import state as state_lib
from twinbrain_jax.training import step as step_lib
from twinbrain_jax.training.loop import image_size

# The planned step is compiled, never run: on CPU, LLVM's optimisation of the generated code is
# wasted time, and XLA's buffer assignment (the bytes reported) is made before it. Halves the
# compile and gives the same bytes (docs/training.md).
PLAN_ONLY_CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                                  "xla_llvm_disable_expensive_passes": True}
# XLA:CPU has no bf16 matmul: it converts bf16 operands to f32, and its loop-invariant code
# motion then converts a whole stack of bf16 weights (`[layers, ...]`, a frozen brain) to f32
# ahead of the layer loop, once for the forward and once for the backward loop. A GPU or TPU
# multiplies bf16 natively and holds no such copies, so the plan compiles without those passes
# (`cpu_bf16_as_native`); the conversion then happens one layer at a time inside the loop.
CPU_BF16_AS_NATIVE_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion,"
                                                        "while-loop-expensive-invariant-code-motion"}


@dataclasses.dataclass
class MemoryPlan:
  """Bytes per device (the largest shard of each array)."""
  mesh: dict[str, int]
  batch_size: int
  trainable_params: int
  frozen_params: int
  params_bytes: int  # trainable
  frozen_bytes: int  # left brain
  optimizer_bytes: int
  gradient_bytes: int
  temp_bytes: int | None  # compiled step temporaries (includes the gradients while live)
  argument_bytes: int | None
  output_bytes: int | None
  alias_bytes: int | None  # donated inputs reused as outputs
  lower_seconds: float | None = None  # tracing + lowering of the step
  compile_seconds: float | None = None  # XLA compilation of the lowered step

  @property
  def total_bytes(self) -> int:
    """Resident state (params, frozen, optimizer) + the step's temporaries (gradients are
    among them); equals XLA's argument + output - alias + temp when compiled."""
    resident = self.params_bytes + self.frozen_bytes + self.optimizer_bytes
    if self.temp_bytes is None:
      return resident + self.gradient_bytes
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def abstract_batch(config: ml_collections.ConfigDict, batch_size: int, mesh) -> tuple[dict, np.ndarray]:
  """`jax.ShapeDtypeStruct`s of a model batch (fixed prompt lengths, one image per sample)."""
  model_config = state_lib.model_config(config)
  vision = model_config.backbone.vision
  height, width = image_size(config.data)
  grid = np.tile(np.array([[1, height // vision.patch_size, width // vision.patch_size]],
                          np.int64), (batch_size, 1))
  patches = int(grid[0].prod())
  left, right = config.inputs.max_left_tokens, config.inputs.max_right_tokens
  expert = model_config.action_expert
  shapes = dict(
      left_input_ids=((batch_size, left), jnp.int32),
      left_attention_mask=((batch_size, left), jnp.int32),
      left_position_ids=((3, batch_size, left), jnp.int32),
      right_input_ids=((batch_size, right), jnp.int32),
      right_attention_mask=((batch_size, right), jnp.int32),
      right_position_ids=((3, batch_size, right), jnp.int32),
      pixel_values=((batch_size * patches, vision.patch_dim), jnp.float32),
      state=((batch_size, model_config.state_dim), jnp.float32),
      actions=((batch_size, expert.action_horizon, expert.action_dim), jnp.float32),
      action_mask=((batch_size, expert.action_horizon), jnp.bool_))
  if model_config.variant == "monolithic":
    shapes = {k: v for k, v in shapes.items() if not k.startswith("left_")}
  zeros = {k: np.zeros((1,) * len(s), d) for k, (s, d) in shapes.items()}
  shardings = step_lib.batch_shardings(mesh, zeros)
  batch = {k: jax.ShapeDtypeStruct(s, d, sharding=shardings[k]) for k, (s, d) in shapes.items()}
  return batch, grid


def memory_plan(config: ml_collections.ConfigDict, batch_size: int | None = None,
                compile_step: bool = True, fast_cpu_compile: bool = True,
                cpu_bf16_as_native: bool = True) -> MemoryPlan:
  """The per-device memory of training `config` on its mesh over all devices.

  `fast_cpu_compile`: on CPU, compile without LLVM optimisation
  (`PLAN_ONLY_CPU_COMPILER_OPTIONS`); the step is never executed. `cpu_bf16_as_native`: on
  CPU, keep bf16 weights from being converted to f32 a whole layer stack at a time
  (`CPU_BF16_AS_NATIVE_OPTIONS`).
  """
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.logical_axis_rules(config.logical_axis_rules, mesh)
  batch_size = int(batch_size or config.data.batch_size)
  step_lib.check_batch_size(batch_size, mesh, int(config.train.grad_accum_steps))
  model = TwinBrainVLA(state_lib.model_config(config))
  tx = optimizer_lib.make_optimizer(config.train)
  abstract, shardings = state_lib.abstract_state(model, tx, mesh, rules, config.seed)
  params = state_lib.tree_bytes_per_device(abstract.params)
  temp = argument = output = alias = lower_seconds = compile_seconds = None
  if compile_step:
    batch, grid = abstract_batch(config, batch_size, mesh)
    step = step_lib.make_train_step(model, tx, grid, config.flow.num_repeats,
                                    int(config.train.grad_accum_steps))
    jitted = step_lib.jit_train_step(step, shardings, {k: v.sharding for k, v in batch.items()},
                                     mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      start = time.perf_counter()
      lowered = jitted.lower(abstract, batch)
      lower_seconds = time.perf_counter() - start
      options = {}
      if jax.default_backend() == "cpu":
        options.update(PLAN_ONLY_CPU_COMPILER_OPTIONS if fast_cpu_compile else {})
        options.update(CPU_BF16_AS_NATIVE_OPTIONS if cpu_bf16_as_native else {})
      compiled = lowered.compile(options or None)
      compile_seconds = time.perf_counter() - start - lower_seconds
    analysis = compiled.memory_analysis()
    temp, argument = int(analysis.temp_size_in_bytes), int(analysis.argument_size_in_bytes)
    output, alias = int(analysis.output_size_in_bytes), int(analysis.alias_size_in_bytes)
  return MemoryPlan(
      mesh=dict(mesh.shape), batch_size=batch_size,
      trainable_params=state_lib.count_params(abstract.params),
      frozen_params=state_lib.count_params(abstract.frozen), params_bytes=params,
      frozen_bytes=state_lib.tree_bytes_per_device(abstract.frozen),
      optimizer_bytes=state_lib.tree_bytes_per_device(abstract.opt_state),
      gradient_bytes=params, temp_bytes=temp, argument_bytes=argument, output_bytes=output,
      alias_bytes=alias, lower_seconds=lower_seconds, compile_seconds=compile_seconds)


class DoesNotFit(ValueError):
  """Not even one sample per data-parallel device fits; `plan` is that batch's plan."""

  def __init__(self, message: str, plan: MemoryPlan):
    super().__init__(message)
    self.plan = plan


def largest_fitting_batch(config: ml_collections.ConfigDict, budget_bytes: int,
                          max_per_device: int = 4096, log=print,
                          fast_cpu_compile: bool = True, cpu_bf16_as_native: bool = True
                          ) -> tuple[MemoryPlan, MemoryPlan]:
  """The largest global batch whose compiled step fits `budget_bytes` per device.

  Every figure comes from a compiled step. Batches are multiples of the data-parallel size
  (times `grad_accum_steps`). The search compiles per-device batches 1 and 2, extrapolates the
  line through batch 1 and the largest fitting batch until one does not fit, then narrows
  [largest that fits, smallest that does not] by secant and bisection steps in turn until the
  two are adjacent.

  Returns:
    (the plan of the largest fitting batch, the plan of the next batch, which does not fit).

  Raises:
    DoesNotFit: not even a batch of one sample per data-parallel device fits.
  """
  mesh_size = sharding_lib.data_parallel_size(sharding_lib.make_mesh(config.mesh))
  step = mesh_size * int(config.train.grad_accum_steps)
  plans: dict[int, MemoryPlan] = {}

  def plan(per_device: int) -> MemoryPlan:
    if per_device not in plans:
      plans[per_device] = memory_plan(config, per_device * step,
                                      fast_cpu_compile=fast_cpu_compile,
                                      cpu_bf16_as_native=cpu_bf16_as_native)
      log(f"  batch {per_device * step}: {plans[per_device].total_bytes / 2**30:.2f} GiB "
          f"per device (compile {plans[per_device].compile_seconds:.0f} s)")
    return plans[per_device]

  def secant(a: int, b: int) -> int:
    """Where the line through the plans of per-device batches a < b reaches the budget."""
    slope = max((plan(b).total_bytes - plan(a).total_bytes) / (b - a), 1.0)
    return a + int((budget_bytes - plan(a).total_bytes) // slope)

  if plan(1).total_bytes > budget_bytes:
    raise DoesNotFit(f"Even a batch of {step} (1 per data-parallel device) needs "
                     f"{plan(1).total_bytes / 2**30:.1f} GiB per device > the budget "
                     f"{budget_bytes / 2**30:.1f} GiB; use more devices or remat.", plan(1))
  fits, too_big, guess, bisect, probed = 1, max_per_device + 1, 2, False, False
  while too_big - fits > 1:
    if plan(guess).total_bytes <= budget_bytes:
      fits = guess
    else:
      too_big = guess
    # Secant through the bracket's ends (through batch 1 before a batch too big is known),
    # alternating with bisection so that the bracket at least halves every two compiles.
    if too_big > max_per_device:
      # The line's last batch, else one more; if that one fit too, the line is no guide.
      line = secant(1, fits)
      if line > fits:
        guess, probed = line, False
      else:
        guess, probed = (2 * fits, False) if probed else (fits + 1, True)
    else:
      guess = (fits + too_big) // 2 if bisect else secant(fits, too_big)
      bisect = not bisect
    if not fits < guess < too_big:
      guess = (fits + too_big) // 2
  return plan(fits), plan(too_big)
