"""The `config.data` block: which datasets, how samples are built, how they are loaded."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults of the OXE recipe: bridge + fractal weight 1 each, one camera at 224x224, H = 16."""
  c = ml_collections.ConfigDict()
  # TFDS data dir holding `<dataset>/<version>/` ArrayRecord RLDS datasets.
  c.data_dir = config_dict.placeholder(str)
  # Registry names (twinbrain_jax/data/oxe_registry.py) and mixture weights.
  c.datasets = ("bridge_dataset", "fractal20220817_data")
  c.weights = (1.0, 1.0)
  c.split = "train"
  # Norm stats JSON location; None writes/reads `norm_stats.<split>.json` next to the data.
  c.stats_dir = config_dict.placeholder(str)
  # False: a bad episode is an error. True: it is skipped, counted and logged.
  c.skip_bad_episodes = False
  c.seed = 0
  c.shuffle = True
  # None: endless weighted mixture (training). N: every step of every dataset N times, no
  # weighting (evaluation, statistics).
  c.num_epochs = config_dict.placeholder(int)
  # Global batch; each process gets batch_size / process_count.
  c.batch_size = 128
  # Images: resized to image_size, then zero-padded (bottom/right) to a multiple of
  # pad_to_multiple (28 = Qwen2.5-VL patch 14 x merge 2; 0 = no padding).
  c.image_size = (224, 224)
  c.pad_to_multiple = 0
  c.num_cameras = 1
  c.obs_history = 1
  c.action_horizon = 16
  # Past the episode end: "repeat_last" repeats the last action, "zero" writes zeros (both
  # masked out in `action_mask`).
  c.pad_mode = "repeat_last"
  # Zero-pad states/actions of every dataset to this width; 0 = the widest in the mixture.
  c.state_dim = 0
  c.action_dim = 0
  c.augment = ml_collections.ConfigDict(dict(
      enabled=True, crop_scale=(0.9, 1.0), crop_ratio=(0.9, 1.1), brightness=0.2,
      contrast=0.2, saturation=0.2, hue=0.05))
  # Loading: worker processes (0 = in the main process), reader threads per process, and
  # batches buffered ahead.
  c.num_workers = 0
  c.read_threads = 8
  c.prefetch_batches = 4
  return c
