"""The `make demo` run: generated data -> train, stop, resume -> export -> sample from the bundle."""

from __future__ import annotations

import os
import shutil

import jax
import ml_collections
import numpy as np

from twinbrain_jax.data.pipeline import DataPipeline
from twinbrain_jax.inputs import ModelInputs
from twinbrain_jax.models.twinbrain import sample_actions
from twinbrain_jax.training import demo_data, export, loop


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, np.ndarray]:
  """Runs the demo in `workdir` (its previous run outputs are replaced); returns the sampled raw
  actions per dataset (none when SIGTERM or Ctrl-C stopped it, after saving a checkpoint)."""
  for name in (config.checkpoint.dir, config.train.tensorboard_dir, "bundle"):
    shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
  config = demo_data.prepare(config, workdir)
  config.train.progress_bar = True
  total = int(config.train.num_steps)
  print(f"data: {config.data.datasets} in {config.data.data_dir}; "
        f"{jax.device_count()} devices, mesh {dict(config.mesh)}")

  first = loop.train(config, workdir, stop_after=total // 2)
  if first.preempted:  # SIGTERM / Ctrl-C: stop the demo, not only this run.
    return {}
  print(f"stopped at step {first.final_step} (checkpoint saved); losses "
        + " ".join(f"{s}:{l:.3f}" for s, l in sorted(first.losses.items())))
  second = loop.train(config, workdir)
  if second.preempted:
    return {}
  print(f"resumed at step {second.start_step}, finished at {second.final_step}; losses "
        + " ".join(f"{s}:{l:.3f}" for s, l in sorted(second.losses.items())))
  print("validation loss: " + " ".join(f"{s}:{l:.3f}" for s, l in sorted(
      {**first.eval_losses, **second.eval_losses}.items())))
  t = second.throughput
  print(f"throughput: {t['samples_per_s']:.1f} samples/s, {t['tokens_per_s']:.0f} tokens/s, "
        f"MFU {t['mfu']:.2%} of {config.train.peak_flops_per_device:.3g} FLOP/s per device")

  bundle_dir = export.export_checkpoint(os.path.join(workdir, config.checkpoint.dir),
                                        os.path.join(workdir, "bundle"), dtype="float32")
  bundle = export.load_bundle(bundle_dir)
  print(f"exported {bundle_dir}")

  # One held-out observation per dataset, through the bundle only.
  eval_config = ml_collections.ConfigDict(config.data.to_dict())
  eval_config.update(data_dir=config.train.eval_data_dir, batch_size=len(config.data.datasets),
                     num_epochs=1, shuffle=False)
  pipeline = DataPipeline(eval_config, train=False)
  bundle_config = bundle.config
  inputs = ModelInputs(bundle.model.config, bundle.tokenizer,
                       bundle_config.inputs.max_left_tokens, bundle_config.inputs.max_right_tokens,
                       loop.image_size(config.data))
  sampled = {}
  for name in config.data.datasets:
    dataset_id = list(config.data.datasets).index(name)
    batch = next(b for b in pipeline.batches if (b["dataset_id"] == dataset_id).any())
    row = int(np.argmax(batch["dataset_id"] == dataset_id))
    sample = {k: v[row:row + 1] for k, v in batch.items()}
    obs = inputs(sample)
    obs = {k: v for k, v in obs.items() if k not in ("actions", "action_mask")}
    actions = sample_actions(bundle.model, bundle.params, obs, inputs.image_grid_thw(1),
                             jax.random.key(0), bundle_config.flow.num_steps,
                             bundle_config.flow.method)
    raw = export.unnormalize_actions(bundle, np.asarray(actions)[0], name)
    sampled[name] = raw
    np.set_printoptions(precision=3, suppress=True)
    print(f"{name}: instruction {str(sample['instruction'][0])!r}; first 3 of {raw.shape[0]} "
          f"un-normalised actions:\n{raw[:3]}")
  return sampled
