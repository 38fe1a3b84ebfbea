"""Tiny generated bridge/fractal RLDS datasets (ArrayRecord), built once per test session."""

import absl.flags
import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from twinbrain_jax.data import config as data_config
from twinbrain_jax.data import generate, pipeline, rlds

# grain worker processes read absl flags; tests have no `app.run`.
absl.flags.FLAGS.mark_as_parsed()

NUM_EPISODES = 10


@pytest.fixture(scope="session")
def oxe_data_dir(tmp_path_factory):
  """A TFDS data dir with `bridge_dataset` and `fractal20220817_data` (10 episodes of 6-12 steps)."""
  data_dir = str(tmp_path_factory.mktemp("oxe"))
  generate.generate_dataset(generate.BRIDGE, data_dir, num_episodes=NUM_EPISODES, seed=1)
  generate.generate_dataset(generate.FRACTAL, data_dir, num_episodes=NUM_EPISODES, seed=2)
  return data_dir


def small_config(data_dir, **overrides):
  """`config.data` for tests: small images, short horizon, no augmentation."""
  c = data_config.default_data_config()
  c.data_dir = data_dir
  c.batch_size = 4
  c.image_size = (32, 40)
  c.action_horizon = 5
  c.read_threads = 2
  c.prefetch_batches = 2
  c.augment.enabled = False
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def raw_episodes(data_dir, name):
  """All episodes of a generated dataset, decoded by TFDS itself: list of dicts of stacked steps.

  Images are decoded by TFDS (not by the pipeline's reader) and kept per step.
  """
  builder = tfds.builder_from_directory(rlds.resolve_dataset_dir(data_dir, name))
  source = builder.as_data_source(split="train")
  episodes = []
  for i in range(len(source)):
    steps = [source[i]["steps"][t] for t in range(len(source[i]["steps"]))]
    episodes.append(steps)
  return episodes


def stack(steps, *path):
  values = []
  for s in steps:
    for p in path:
      s = s[p]
    values.append(np.asarray(s))
  return np.stack(values).astype(np.float64)


def binarize_reference(g):
  """Bridge gripper: per t the first determined value at or after t, else the raw last value."""
  out = []
  for t in range(len(g)):
    value = g[-1]
    for x in g[t:]:
      if x > 0.95 or x < 0.05:
        value = 1.0 if x > 0.95 else 0.0
        break
    out.append(value)
  return np.array(out)


def rel2abs_reference(g):
  """Fractal gripper: absolute 1 open / 0 closed from relative commands."""
  commands = [(1 if x < -0.1 else -1 if x > 0.1 else 0) for x in g]
  first = next((c for c in commands if c), None)
  state = 1 if first is None else -first
  out = []
  for c in commands:
    state = c or state
    out.append((state + 1) / 2)
  return np.array(out)


def reference_standardize(name, steps):
  """float64 `(actions [T', 7], states [T', S])` computed directly from TFDS-decoded steps."""
  if name == generate.BRIDGE:
    state = stack(steps, "observation", "state")
    action = stack(steps, "action")
    gripper = binarize_reference(action[:, 6].astype(np.float32))
    actions = np.concatenate([state[1:, :6] - state[:-1, :6], gripper[:-1, None]], axis=1)
    return actions, state[:-1]
  actions = np.concatenate([stack(steps, "action", "world_vector"),
                            stack(steps, "action", "rotation_delta"),
                            rel2abs_reference(stack(steps, "action",
                                                    "gripper_closedness_action")[:, 0])[:, None]],
                           axis=1)
  states = np.concatenate([stack(steps, "observation", "base_pose_tool_reached"),
                           stack(steps, "observation", "gripper_closed")], axis=1)
  return actions, states


def assert_resume_is_exact(config, checkpoint_dir, workers=(0, 2), saved_after=3):
  """Saves a pipeline's iterator with orbax after `saved_after` batches, then restores it into
  fresh pipelines with each worker count: the next 3 batches equal the uninterrupted ones.
  Returns those batches."""
  shard = grain.sharding.ShardOptions(0, 1)
  it = pipeline.DataPipeline(config, shard_options=shard).iterator()
  for _ in range(saved_after):
    next(it)
  manager = ocp.CheckpointManager(checkpoint_dir,
                                  options=ocp.CheckpointManagerOptions(create=True))
  manager.save(saved_after, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = [next(it) for _ in range(3)]
  it.close()
  for count in workers:
    config.num_workers = count
    restored = pipeline.DataPipeline(config, shard_options=shard).iterator()
    manager.restore(saved_after,
                    args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert restored.get_state()["next_batch"] == saved_after
    for want in expected:
      got = next(restored)
      assert set(got) == set(want)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    restored.close()
  return expected
