"""Policy: the training preprocessing, un-normalised actions, compiles, batches, bad input."""

import dataclasses
import os
import pathlib
import shutil
import sys

import jax
import ml_collections
import numpy as np
import pytest

import processes
from fixtures_data import oxe_data_dir  # noqa: F401  (pytest fixture)
from fixtures_serving import (bad_observation, make_policy_dirs, observation,  # noqa: F401
                              tiny_policy_dirs, twinbrain_configs, write_policy_dirs)
from twinbrain_jax.data import normalization
from twinbrain_jax.data.pipeline import DataPipeline
from twinbrain_jax.models.twinbrain import sample_actions
from twinbrain_jax.serving.policy import ObservationError, Policy
from twinbrain_jax.training import export, loop

LEROBOT_FIXTURES = pathlib.Path(__file__).parent / "data" / "lerobot"


@pytest.fixture(scope="module")
def policy(tiny_policy_dirs):
  return Policy.load(tiny_policy_dirs.bundle_dir)


def test_policy_preprocesses_like_the_training_pipeline(policy, tiny_policy_dirs):
  """Raw episode data through the policy == the pipeline's sample through the training loop's
  ModelInputs, for a step of each dataset (bridge state 7 -> padded 8, fractal 8)."""
  config = tiny_policy_dirs.config
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.update(batch_size=4, num_epochs=1, shuffle=False)
  pipeline = DataPipeline(data, train=False)
  train_inputs = loop.model_inputs(config)
  seen = set()
  for batch in pipeline.batches:
    for row in range(len(batch["dataset_id"])):
      entry = pipeline.entries[int(batch["dataset_id"][row])]
      if entry.spec.name in seen or batch["step_index"][row] == 0:
        continue
      seen.add(entry.spec.name)
      episode = entry.source.episode(int(batch["episode_index"][row]))
      t = int(batch["step_index"][row])
      _, raw_states = normalization.standardized_episode(episode)
      raw = dict(image=episode.image(t, entry.spec.image_keys[0]), state=raw_states[t],
                 instruction=episode.instruction(t), dataset=entry.spec.name)
      assert raw["image"].shape[:2] != tuple(data.image_size)  # The policy must resize.
      want = train_inputs({k: batch[k][row:row + 1] for k in ("image", "instruction", "state")})
      got = policy.model_batch([policy.check(raw)])
      assert set(got) == set(want)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    if len(seen) == 2:
      break
  assert seen == {"bridge_dataset", "fractal20220817_data"}


def test_actions_are_the_sampler_output_unnormalised_with_the_bundle_stats(policy):
  obs = observation(seed=1, dataset="fractal20220817_data")
  result = policy.infer(dict(obs, seed=7))
  batch = policy.model_batch([policy.check(obs)])
  grid = policy.inputs.image_grid_thw(1)
  sample = jax.jit(lambda params, batch, rng: sample_actions(policy.bundle.model, params, batch,
                                                             grid, rng))
  normalized = np.asarray(sample(policy.bundle.params, batch, jax.random.key(7)))[0]
  stats = policy.bundle.norm_stats["fractal20220817_data"]["action"]
  low, high = np.asarray(stats["q01"]), np.asarray(stats["q99"])
  # Six movement dims map [-1, 1] to [q01, q99]; the gripper thresholds at 0.5 (see the spec).
  want = (np.clip(normalized[:, :6], -1, 1) + 1) / 2 * (high[:6] - low[:6]) + low[:6]
  assert result["actions"].shape == (16, 7) and result["actions"].dtype == np.float32
  np.testing.assert_allclose(result["actions"][:, :6], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(result["actions"][:, 6], normalized[:, 6] > 0.5)
  timing = result["policy_timing"]
  assert all(timing[k] > 0 for k in ("preprocess_ms", "model_ms", "postprocess_ms"))


def test_deterministic_per_seed_and_batch_rows_equal_single_calls(policy):
  observations = [observation(seed=i, dataset=d, image_shape=s, instruction=text)
                  for i, (d, s, text) in enumerate([
                      ("bridge_dataset", (64, 64), "open the top drawer"),
                      ("fractal20220817_data", (256, 320), "pick up the coke can"),
                      ("bridge_dataset", (480, 640), "stack the green block")])]
  single = [policy.infer(o)["actions"] for o in observations]
  np.testing.assert_array_equal(policy.infer(observations[0])["actions"], single[0])
  batched = policy.infer_batch(observations)["actions"]  # Padded to a batch of 4.
  assert batched.shape == (3, 16, 7)
  for got, want in zip(batched, single):
    np.testing.assert_allclose(got, want, atol=1e-5)
  # The actions depend on the observation and on the seed (so the checks above can fail).
  assert np.abs(single[0] - single[2]).max() > 1e-3
  reseeded = policy.infer(dict(observations[0], seed=123))["actions"]
  assert np.abs(reseeded - single[0]).max() > 1e-3


def test_compiles_once_per_batch_bucket(tiny_policy_dirs):
  policy = Policy.load(tiny_policy_dirs.bundle_dir, max_batch_size=2)
  for i, (shape, text) in enumerate([((50, 70), "close the middle drawer"),
                                     ((300, 200), "put eggplant into yellow basket and then "
                                                  "move the sponge to the left of the blue cloth"),
                                     ((112, 112), "")]):
    policy.infer(observation(seed=i, image_shape=shape, instruction=text))
  assert sorted(policy.compile_seconds) == [1]
  result = policy.infer_batch([observation(seed=i) for i in range(3)])  # Buckets 2 and 1.
  assert result["actions"].shape == (3, 16, 7)
  assert sorted(policy.compile_seconds) == [1, 2]


def test_checkpoint_dir_serves_the_same_actions_as_its_bundle(policy, tiny_policy_dirs):
  from_checkpoint = Policy.load(tiny_policy_dirs.checkpoint_dir)
  obs = observation(seed=3)
  np.testing.assert_allclose(from_checkpoint.infer(obs)["actions"],
                             policy.infer(obs)["actions"], atol=1e-5)
  assert from_checkpoint.metadata() == policy.metadata()


@pytest.mark.parametrize("obs, message", [
    (bad_observation(image=None), r"no 'image'.*send image \(uint8"),
    (bad_observation(state=None, instruction=None), r"no 'state', 'instruction'"),
    (bad_observation(image=np.zeros((64, 64, 3), np.float32)),
     r"'image'.*dtype float32.*uint8"),
    (bad_observation(image=np.zeros((64, 64), np.uint8)),
     r"'image'.*shape \(64, 64\).*\[H, W, 3\]"),
    (bad_observation(image=[np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 4), np.uint8)]),
     r"'image'\]\[1\] has shape \(8, 8, 4\)"),
    (bad_observation(image="a picture"), r"'image'.*is a str; send a numpy array"),
    (bad_observation(state=np.zeros(8, np.float32)),
     r"'state'.*shape \(8,\).*'bridge_dataset' expects \[7\]"),
    (bad_observation(state=np.array([np.nan] * 7)), r"'state'.*not finite"),
    (bad_observation(instruction=np.array([1, 2])),
     r"'instruction'.*ndarray; send the task as a str"),
    (bad_observation(instruction="stack the block " * 100),
     r"'instruction'.*too long.*max_left_tokens"),
    (bad_observation(dataset="kuka"), r"'dataset'\]='kuka' is unknown.*bridge_dataset"),
    (bad_observation(seed=-1), r"'seed'\]=-1"),
    (bad_observation(dataset=None), r"names no 'dataset'.*several.*send dataset="),
    ([1, 2, 3], r"observation is a list; send a dict"),
])
def test_bad_observations_are_named(policy, obs, message):
  with pytest.raises(ObservationError, match=message):
    policy.infer(obs)


def test_load_names_what_it_expected(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither an inference bundle .*config.json"):
    Policy.load(tmp_path)
  with pytest.raises(FileNotFoundError, match="not a directory"):
    Policy.load(tmp_path / "missing")


def test_libra_runtime_options_on_a_twinbrain_bundle_are_named(tiny_policy_dirs):
  with pytest.raises(ValueError,
                     match=r"TwinBrain policy; the Libra-VLA runtime options \(mode;.*leave them out"):
    Policy.load(tiny_policy_dirs.bundle_dir, mode="async")


def test_a_qwen3vl_policy_exports_and_serves(tmp_path, oxe_data_dir):
  """`qwen3vl_tiny` through checkpoint -> bundle -> Policy: the bundle rebuilds the Qwen3-VL
  model, images go through its processor (patch 16) and the policy returns finite actions, the
  same for the same seed."""
  dirs = make_policy_dirs(tmp_path, oxe_data_dir, "qwen3vl_tiny")
  policy = Policy.load(dirs.bundle_dir)
  assert policy.bundle.model.config.backbone.family == "qwen3vl"
  obs = observation(seed=3, dataset="bridge_dataset")
  batch = policy.model_batch([policy.check(obs)])
  assert batch["pixel_values"].shape[1] == 3 * 2 * 16 * 16  # C x T x patch 16 x 16
  actions = policy.infer(dict(obs, seed=5))["actions"]
  assert actions.shape == (policy.action_horizon, 7) and np.isfinite(actions).all()
  np.testing.assert_array_equal(policy.infer(dict(obs, seed=5))["actions"], actions)


def test_a_bundle_exported_from_a_mesh_loads_on_one_device(policy, tiny_policy_dirs, tmp_path):
  """The tiny bundle was exported from a train state on the tests' 8-device mesh; a process
  with one device (a one-GPU serving machine) loads it and gives the same actions."""
  assert len(jax.devices()) > 1
  obs = observation(seed=21)
  np.savez(tmp_path / "obs.npz", image=obs["image"], state=obs["state"])
  script = (
      "import sys, jax, numpy as np\n"
      "from twinbrain_jax.serving.policy import Policy\n"
      "assert len(jax.devices()) == 1, jax.devices()\n"
      "policy = Policy.load(sys.argv[1])\n"
      "obs = dict(np.load(sys.argv[2]), instruction=sys.argv[3], dataset='bridge_dataset')\n"
      "np.save(sys.argv[4], policy.infer(obs)['actions'])\n")
  result = processes.run(
      [sys.executable, "-c", script, str(tiny_policy_dirs.bundle_dir), str(tmp_path / "obs.npz"),
       obs["instruction"], str(tmp_path / "actions.npy")], tmp_path / "logs",
      env=dict(os.environ, XLA_FLAGS=""))
  assert result.returncode == 0, result.stderr[-3000:]
  np.testing.assert_allclose(np.load(tmp_path / "actions.npy"), policy.infer(obs)["actions"],
                             rtol=0, atol=1e-5)


def test_a_bundle_of_a_lerobot_run_serves_without_the_data(tmp_path):
  """A LeRobot entry's widths come from its `meta/info.json`: the bundle keeps a copy, so the
  policy loads and acts after the data is gone."""
  data_dir = tmp_path / "so100"
  shutil.copytree(LEROBOT_FIXTURES / "v30_video", data_dir)
  config = twinbrain_configs.get_config("tiny")
  config.data.update(datasets=(dict(name="my_robot", format="lerobot", dir=str(data_dir),
                                    cameras=("observation.images.top",)),),
                     weights=(1.0,), stats_dir=str(tmp_path / "stats"))
  dirs = write_policy_dirs(tmp_path / "policy", config)
  obs = dict(image=np.zeros((40, 48, 3), np.uint8), state=np.linspace(-1, 1, 6),
             instruction="pick up the cube")
  before = Policy.load(dirs.bundle_dir).infer(obs)["actions"]
  shutil.rmtree(data_dir)
  policy = Policy.load(dirs.bundle_dir)
  assert policy.datasets["my_robot"].state_dim == 6
  after = policy.infer(obs)["actions"]
  assert after.shape == (16, 4)
  np.testing.assert_array_equal(after, before)


def test_question_answer_data_of_a_cotrained_run_is_not_a_dataset_to_serve(tiny_policy_dirs):
  """A co-training mixture adds the VQA corpus (no actions, `action_dim` 0) to the robot data:
  the policy serves the robot dataset only, so observations need not name it."""
  bundle = export.load_bundle_or_checkpoint(tiny_policy_dirs.bundle_dir)
  config = ml_collections.ConfigDict(bundle.config.to_dict())
  robot = config.data.datasets[0]
  config.data.update(datasets=(robot, "metaworld_vqa"), weights=(1.0, 0.25))
  stats = dict(bundle.norm_stats, metaworld_vqa=bundle.norm_stats[robot])  # state and action
  policy = Policy(dataclasses.replace(bundle, config=config, norm_stats=stats))
  assert list(policy.datasets) == [robot] and policy.default_dataset == robot
  assert policy.infer(observation(seed=0))["actions"].shape == (16, 7)
