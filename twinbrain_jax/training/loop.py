"""The training loop: data -> sharded step -> metrics, validation, checkpoints, preemption.

    result = train(config, workdir)

Resumes from the latest whole checkpoint in `<workdir>/<checkpoint.dir>` when there is one
(train state, data position and all), so re-running the same command after a crash or a
preemption continues the run; the losses after a resume are those of an uninterrupted run.
Damaged steps after it are skipped with a warning and moved to `damaged/`. SIGTERM or SIGINT
makes the loop save at the next step boundary and return (`result.preempted`); during start-up
it returns before writing anything.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from twinbrain_jax import sharding as sharding_lib
from twinbrain_jax.config_lib import ConfigError
from twinbrain_jax.data.pipeline import DataPipeline
from twinbrain_jax.inputs import ModelInputs, model_inputs_for
from twinbrain_jax.models import families, libra, vlm
from twinbrain_jax.models.tokenizer import QwenTokenizer
from twinbrain_jax.models.twinbrain import train_step_flops
from twinbrain_jax.training import checkpoint as checkpoint_lib
from twinbrain_jax.training import optimizer as optimizer_lib
from twinbrain_jax.training import state as state_lib
from twinbrain_jax.training import step as step_lib


@dataclasses.dataclass
class TrainResult:
  """What a `train` call did.

  Attributes:
    state: the final train state.
    start_step: the step it started from (0, or the restored checkpoint's).
    final_step: the step it stopped at.
    losses: step -> training loss of every step it logged (step s = the loss of update s).
    eval_losses: step -> validation loss.
    preempted: it stopped on SIGTERM (after saving).
    throughput: the last logged samples/s, tokens/s, TFLOP/s per device and MFU.
  """
  state: Any
  start_step: int
  final_step: int
  losses: dict[int, float]
  eval_losses: dict[int, float]
  preempted: bool
  throughput: dict[str, float]


def image_size(data_config: ml_collections.ConfigDict) -> tuple[int, int]:
  """The pipeline's image size after zero-padding to `data.pad_to_multiple`."""
  multiple = int(data_config.pad_to_multiple) or 1
  return tuple(int(math.ceil(s / multiple) * multiple) for s in data_config.image_size)


def tokenizer_dir(config: ml_collections.ConfigDict) -> str:
  path = config.init.tokenizer or config.init.hf_checkpoint
  if not path:
    raise ConfigError("No tokenizer: set init.tokenizer (a dir with tokenizer.json) or "
                      "init.hf_checkpoint.")
  return path


def answer_loss_weight(config: ml_collections.ConfigDict) -> float:
  """`train.answer_loss_weight`: co-training's weight of the right brain's answer loss (0: none;
  TwinBrain family only)."""
  weight = float(config.train.get("answer_loss_weight", 0.0) or 0.0)
  if weight and families.family(config) != "twinbrain":
    raise ConfigError(f"train.answer_loss_weight={weight} co-trains a TwinBrain-family VLA; "
                      f"config.family={families.family(config)!r} has its own loss.")
  if weight < 0:
    raise ConfigError(f"train.answer_loss_weight={weight} must be >= 0.")
  return weight


def model_inputs(config: ml_collections.ConfigDict) -> ModelInputs:
  return model_inputs_for(state_lib.model_config(config),
                          QwenTokenizer.from_file(tokenizer_dir(config)),
                          config.inputs.max_left_tokens, config.inputs.max_right_tokens,
                          image_size(config.data), config.inputs.get("max_lm_tokens", 0) or 0)


def _step_flops(inputs: ModelInputs, batch_size: int, num_repeats: int) -> int:
  """Analytic FLOPs of one train step of the config's model family."""
  if isinstance(inputs.config, vlm.VlmConfig):
    return vlm.train_step_flops(inputs.config, batch_size, inputs.max_lm_tokens,
                                inputs.patches_per_image)["total"]
  if isinstance(inputs.config, libra.LibraConfig):
    return libra.train_step_flops(inputs.config, batch_size, inputs.max_left_tokens,
                                  inputs.patches_per_image, num_repeats)["total"]
  return train_step_flops(inputs.config, batch_size, inputs.max_left_tokens,
                          inputs.max_right_tokens, inputs.patches_per_image, num_repeats)["total"]


class _Preemption:
  """Turns SIGTERM and SIGINT into a flag read between start-up phases and at step boundaries
  (main thread only). A second SIGINT interrupts at once, as Ctrl-C twice is meant to.

  In a multi-process job the signal may reach one process only (a preempted host, a `kill`);
  `agreed()` tells every process whether any of them was signalled, so that all stop at the same
  step boundary and write one consistent checkpoint. It all-gathers one int32 per process: a tiny
  collective, but it waits for the step in flight, so the host prepares the next batch only once
  the device is done with the current one (one process needs nothing of that).
  """

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for signum in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # Not the main thread: no handler, no preemption saves.
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    logging.warning("%s: stopping at the next step boundary (with a checkpoint) or start-up "
                    "phase (writing nothing).", signal.Signals(signum).name)
    self.requested = True

  def agreed(self) -> bool:
    """Whether any process was signalled. Every process must call it at the same points."""
    if jax.process_count() == 1:
      return self.requested
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)


def _writer(logdir: str):
  if jax.process_index() != 0:
    return None
  from tensorboardX import SummaryWriter  # Imported lazily: only the chief writes.
  # tensorboardX names the file by the second it is opened (and the host): a run restarted within
  # that second would overwrite its previous file. The sub-second time and the pid keep every
  # start's file, and names still sort in the order they were opened.
  return SummaryWriter(logdir, filename_suffix=f".{time.time_ns() % 10**9:09d}.{os.getpid()}")


def _eval_pipeline(config: ml_collections.ConfigDict, train_pipeline: DataPipeline
                   ) -> DataPipeline | None:
  """The held-out pipeline, normalising with the training statistics (as the policy will)."""
  if not config.train.eval_data_dir:
    return None
  eval_config = ml_collections.ConfigDict(config.data.to_dict())
  eval_config.update(data_dir=config.train.eval_data_dir, split=config.train.eval_split,
                     stats_dir=None)
  pipeline = DataPipeline(eval_config, train=False)
  for entry, train_entry in zip(pipeline.entries, train_pipeline.entries):
    entry.stats = dataclasses.replace(entry.stats, action=train_entry.stats.action,
                                      state=train_entry.stats.state)
  return pipeline


def _check_widths(pipeline: DataPipeline, model_config: Any) -> None:
  """The data's state and action widths must be the model's: the pipeline zero-pads every
  dataset to `data.state_dim` / `data.action_dim` (default: the widest dataset's). The VLM reads
  neither."""
  if isinstance(model_config, vlm.VlmConfig):
    return
  if isinstance(model_config, libra.LibraConfig):
    action_field, model_action_dim = "model.action_dim", model_config.action_dim
  else:
    action_field = "model.action_expert.action_dim"
    model_action_dim = model_config.action_expert.action_dim
  for name, data_width, model_width, model_field in (
      ("state", pipeline.state_dim, model_config.state_dim, "model.state_dim"),
      ("action", pipeline.action_dim, model_action_dim, action_field)):
    if data_width != model_width:
      raise ConfigError(
          f"The data's {name}s have width {data_width} (data.{name}_dim, default the widest "
          f"dataset's) but {model_field} is {model_width}; set --config.data.{name}_dim="
          f"{model_width} (zero-pads narrower datasets) or --config.{model_field}={data_width}.")


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None,
          on_step: Callable[[int], None] | None = None) -> TrainResult:
  """Trains `config` in `workdir`, resuming from its latest whole checkpoint.

  SIGTERM or SIGINT during start-up returns before anything is written (`result.preempted`,
  `result.state` None); during training, after saving at the next step boundary.

  Args:
    config: a `configs/twinbrain.py` or `configs/libra.py` config.
    workdir: checkpoints, TensorBoard events (paths in the config are relative to it).
    stop_after: stop (with a checkpoint) after this many steps of this call, as if preempted.
    on_step: called with the step number after every step (tests use it to send signals).
  """
  with _Preemption() as preemption:  # First, so that start-up is covered too.
    return _train(config, workdir, preemption, stop_after, on_step)


def _preempted_in_startup(checkpoint_dir: str, *to_close) -> TrainResult:
  """Closes what start-up opened; the result of a run stopped before its first step."""
  for closable in to_close:
    closable.close()
  start = max((s.step for s in checkpoint_lib.list_steps(checkpoint_dir) if s.whole), default=0)
  logging.warning("Stopped during start-up; no checkpoint was written. Re-run to resume from "
                  "step %d.", start)
  return TrainResult(state=None, start_step=start, final_step=start, losses={}, eval_losses={},
                     preempted=True, throughput={})


def _train(config: ml_collections.ConfigDict, workdir: str, preemption: _Preemption,
           stop_after: int | None, on_step: Callable[[int], None] | None) -> TrainResult:
  checkpoint_dir = os.path.join(workdir, config.checkpoint.dir)
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.logical_axis_rules(config.logical_axis_rules, mesh)
  train_cfg = config.train
  accum = int(train_cfg.grad_accum_steps)
  step_lib.check_batch_size(int(config.data.batch_size), mesh, accum)
  inputs = model_inputs(config)
  model = families.build_model(inputs.config)
  if isinstance(model, libra.LibraVLA) and int(config.data.action_horizon) != (
      inputs.config.plan_length):
    raise ConfigError(f"data.action_horizon={config.data.action_horizon} must equal Libra's plan "
                      f"length L = M x H = {inputs.config.plan_length} (model.num_segments x "
                      "model.segment_length).")
  answer_weight = answer_loss_weight(config)
  if answer_weight and not inputs.max_lm_tokens:
    raise ConfigError(f"train.answer_loss_weight={answer_weight} needs question-answer rows: set "
                      "inputs.max_lm_tokens > 0 and a dataset with answers (metaworld_vqa) in "
                      "data.datasets.")
  if config.init.get("vlm_checkpoint") and config.init.get("hf_checkpoint"):
    raise ConfigError("init.hf_checkpoint and init.vlm_checkpoint are both set; a run starts "
                      "from one pretrained backbone.")
  groups = families.TRAINABLE_GROUPS[families.family(config)]
  tx = optimizer_lib.make_optimizer(train_cfg, groups)
  schedules = optimizer_lib.group_schedules(train_cfg, groups)
  abstract, shardings = state_lib.abstract_state(model, tx, mesh, rules, config.seed)
  if preemption.agreed():
    return _preempted_in_startup(checkpoint_dir)

  pipeline = DataPipeline(config.data)
  _check_widths(pipeline, inputs.config)
  data_iter = pipeline.iterator()
  eval_pipeline = _eval_pipeline(config, pipeline)
  norm_stats = {name: stats.to_json() for name, stats in pipeline.norm_stats.items()}
  config_json = checkpoint_lib.config_to_json(config)
  if preemption.agreed():
    return _preempted_in_startup(checkpoint_dir, data_iter)

  manager = checkpoint_lib.make_manager(checkpoint_dir, config.checkpoint)
  checkpoint_lib.purge_deleted(checkpoint_dir)  # What a killed run's retention left.
  if checkpoint_lib.list_steps(checkpoint_dir):
    start, state, _ = checkpoint_lib.restore(manager, abstract, data_iterator=data_iter,
                                             config=config_json)
    if preemption.agreed():
      return _preempted_in_startup(checkpoint_dir, data_iter, manager)
    # Steps after the restored one are damaged; this run saves those step numbers again.
    for moved in checkpoint_lib.set_aside(checkpoint_dir, start):
      logging.warning("Moved damaged checkpoint step to %s.", moved)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("twinbrain_jax:set_aside")
    manager.reload()
    logging.info("Resumed from step %d of %s.", start, manager.directory)
  else:
    start = 0
    state = state_lib.create_train_state(model, tx, mesh, rules, config.seed, shardings)
    if isinstance(model, libra.LibraVLA):
      state = state_lib.load_pretrained_libra(state, shardings, inputs.config,
                                              config.init.hf_checkpoint,
                                              config.init.get("siglip_checkpoint"),
                                              config.init.get("vlm_checkpoint"))
    elif isinstance(model, vlm.VisionLanguageModel):
      if config.init.hf_checkpoint or config.init.get("vlm_checkpoint"):
        raise ConfigError("A VLM run starts from random weights; leave init.hf_checkpoint and "
                          "init.vlm_checkpoint unset.")
    elif config.init.hf_checkpoint:
      state = state_lib.load_pretrained_backbones(state, shardings, inputs.config,
                                                  config.init.hf_checkpoint, mesh, rules)
    elif config.init.get("vlm_checkpoint"):
      state = state_lib.load_vlm_backbones(state, shardings, inputs.config,
                                           config.init.vlm_checkpoint, mesh)
    if preemption.agreed():
      return _preempted_in_startup(checkpoint_dir, data_iter, manager)

  batch_size = int(config.data.batch_size)
  grid = inputs.image_grid_thw(batch_size)
  step_fn = step_lib.make_train_step(model, tx, grid, config.flow.num_repeats, accum, schedules,
                                     answer_weight)
  flops = _step_flops(inputs, batch_size, config.flow.num_repeats)
  if isinstance(model, vlm.VisionLanguageModel):
    tokens_per_step = batch_size * inputs.max_lm_tokens
  else:
    tokens_per_step = batch_size * (inputs.max_left_tokens + inputs.max_right_tokens
                                    + (inputs.max_lm_tokens if answer_weight else 0))
  peak = float(train_cfg.peak_flops_per_device) * jax.device_count()

  def next_batch(iterator):
    return inputs(next(iterator))

  # Metrics are global (every process holds the same values): process 0 alone reports them.
  chief = jax.process_index() == 0
  writer = _writer(os.path.join(workdir, train_cfg.tensorboard_dir))
  bar = None
  if train_cfg.progress_bar and chief:
    import tqdm
    bar = tqdm.tqdm(total=train_cfg.num_steps, initial=start, desc="train", dynamic_ncols=True)
  losses, eval_losses, throughput = {}, {}, {}
  jitted = eval_step = batch_shardings = None
  step, preempted, saved_step = start, False, start
  interval_start, interval_steps = time.perf_counter(), 0

  def save(force=False):
    nonlocal saved_step
    saved_step = step
    checkpoint_lib.save(manager, step, state, data_iterator=data_iter, norm_stats=norm_stats,
                        config=config_json, force=force)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    while step < train_cfg.num_steps:
      if preemption.agreed() or (jax.process_count() > 1 and manager.reached_preemption(step)):
        preempted = True
        break
      if stop_after is not None and step - start >= stop_after:
        break
      local = next_batch(data_iter)
      if jitted is None:
        batch_shardings = step_lib.batch_shardings(mesh, local)
        jitted = step_lib.jit_train_step(step_fn, shardings, batch_shardings, mesh)
      state, metrics = jitted(state, step_lib.global_batch(local, batch_shardings))
      step += 1
      interval_steps += 1
      if on_step is not None:
        on_step(step)

      if step % train_cfg.log_every == 0 or step == train_cfg.num_steps:
        metrics = jax.device_get(metrics)  # Waits for the step: timing covers the compute.
        elapsed = time.perf_counter() - interval_start
        per_step = elapsed / interval_steps
        throughput = dict(step_time_s=per_step, samples_per_s=batch_size / per_step,
                          tokens_per_s=tokens_per_step / per_step,
                          tflops_per_device=flops / per_step / jax.device_count() / 1e12,
                          mfu=flops / per_step / peak)
        losses[step] = float(metrics["loss"])
        scalars = {k: float(v) for k, v in metrics.items()}
        scalars.update(throughput)
        if writer is not None:
          for key, value in scalars.items():
            writer.add_scalar(f"train/{key}", value, step)
        if bar is not None:
          bar.set_postfix(loss=f"{scalars['loss']:.4f}", gnorm=f"{scalars['grad_norm']:.3f}",
                          sps=f"{throughput['samples_per_s']:.1f}",
                          mfu=f"{throughput['mfu']:.2%}")
        if chief:
          logging.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
        interval_start, interval_steps = time.perf_counter(), 0
      if bar is not None:
        bar.update(1)

      if eval_pipeline is not None and (step % train_cfg.eval_every == 0
                                        or step == train_cfg.num_steps):
        if eval_step is None:
          eval_step = step_lib.make_eval_step(model, grid, config.flow.num_repeats, shardings,
                                              batch_shardings, mesh, answer_weight)
        eval_iter = eval_pipeline.iterator()  # The same held-out batches every time.
        values = [eval_step(state, step_lib.global_batch(next_batch(eval_iter), batch_shardings))
                  for _ in range(int(train_cfg.eval_batches))]
        eval_iter.close()
        eval_losses[step] = float(np.mean(jax.device_get(values)))
        if writer is not None:
          writer.add_scalar("eval/loss", eval_losses[step], step)
        if chief:
          logging.info("step %d: eval loss %.4f", step, eval_losses[step])
        interval_start = time.perf_counter()  # Validation time is not step time.

      if step % config.checkpoint.every == 0:
        save()
        interval_start = time.perf_counter()  # Nor is the blocking part of a save.

    if saved_step != step or manager.latest_step() is None:
      save(force=True)
    manager.wait_until_finished()
  manager.close()
  checkpoint_lib.purge_deleted(checkpoint_dir)  # The last save's retention.
  data_iter.close()
  if bar is not None:
    bar.close()
  if writer is not None:
    writer.flush()
    writer.close()
  return TrainResult(state=state, start_step=start, final_step=step, losses=losses,
                     eval_losses=eval_losses, preempted=preempted, throughput=throughput)
