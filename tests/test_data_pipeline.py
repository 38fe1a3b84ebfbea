"""The grain pipeline on generated bridge/fractal datasets: contents, mixtures, host shards,
iterator checkpoints and bad input."""

import collections
import dataclasses
import pathlib
import re
import shutil
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixtures_training
import processes
from tests.fixtures_data import (assert_resume_is_exact, oxe_data_dir,  # noqa: F401
                                 raw_episodes, reference_standardize, small_config, stack)
from twinbrain_jax.data import generate, normalization, oxe_registry, pipeline, rlds, transforms
from twinbrain_jax.training import demo_data

DATASETS = (generate.BRIDGE, generate.FRACTAL)


def _samples(pipe):
  return [pipe.samples[i] for i in range(len(pipe.samples))]


def _reference(data_dir):
  """Per dataset: raw steps, float64 standardised episodes and float64 q01/q99."""
  out = {}
  for name in DATASETS:
    episodes = raw_episodes(data_dir, name)
    standard = [reference_standardize(name, steps) for steps in episodes]
    actions = np.concatenate([a for a, _ in standard])
    states = np.concatenate([s for _, s in standard])
    out[name] = dict(steps=episodes, standard=standard,
                     action_q=np.percentile(actions, [1, 99], axis=0),
                     state_q=np.percentile(states, [1, 99], axis=0))
  return out


def _norm_reference(x, q, normalize_mask):
  low, high = q
  y = np.clip(2 * (x - low) / np.where(high > low, high - low, 1) - 1, -1, 1)
  y = np.where(high > low, y, 0)
  return np.where(normalize_mask, y, x)


@pytest.mark.parametrize("pad_mode", ["repeat_last", "zero"])
def test_samples_equal_direct_numpy_reference(oxe_data_dir, pad_mode):
  """Every sample of one epoch against float64 numpy from TFDS-decoded episodes.

  Tolerances: actions/states 2e-5 abs (float32 vs float64, values in [-1, 1]); images equal
  the resize of the TFDS-decoded frame exactly, and are within 1.5 grey levels (mean) of an
  antialiased bilinear XLA resize.
  """
  config = small_config(oxe_data_dir, num_epochs=1, pad_mode=pad_mode)
  pipe = pipeline.DataPipeline(config, train=False,
                               shard_options=grain.sharding.ShardOptions(0, 1))
  ref = _reference(oxe_data_dir)
  seen = set()
  for sample in _samples(pipe):
    name = DATASETS[int(sample["dataset_id"])]
    r = ref[name]
    e, t = int(sample["episode_index"]), int(sample["step_index"])
    seen.add((name, e, t))
    actions, states = r["standard"][e]
    normalize_mask = np.array([True] * 6 + [False])
    norm_actions = _norm_reference(actions, r["action_q"], normalize_mask)
    norm_actions[:, 6] = actions[:, 6] > 0.5
    horizon = config.action_horizon
    expected = np.zeros((horizon, 7))
    for h in range(horizon):
      if t + h < len(actions):
        expected[h] = norm_actions[t + h]
      elif pad_mode == "repeat_last":
        expected[h] = norm_actions[-1]
    np.testing.assert_allclose(sample["actions"], expected, rtol=0, atol=2e-5)
    np.testing.assert_array_equal(sample["action_mask"], t + np.arange(horizon) < len(actions))
    expected_state = _norm_reference(states[t], r["state_q"], True)
    np.testing.assert_allclose(sample["state"][:len(expected_state)], expected_state,
                               rtol=0, atol=2e-5)
    np.testing.assert_array_equal(sample["state"][len(expected_state):], 0)  # bridge 7 -> 8
    step = r["steps"][e][t]
    camera = "image_0" if name == generate.BRIDGE else "image"
    raw = step["observation"][camera]
    assert sample["image"].shape == (32, 40, 3) and sample["image"].dtype == np.uint8
    np.testing.assert_array_equal(sample["image"], transforms.resize(raw, (32, 40)))
    xla = jax.image.resize(jnp.asarray(raw, jnp.float32), (32, 40, 3), "linear", antialias=True)
    assert np.abs(sample["image"] - np.asarray(xla)).mean() < 1.5
    language = (step["language_instruction"] if name == generate.BRIDGE
                else step["observation"]["natural_language_instruction"])
    assert sample["instruction"] == language.decode()
  # One epoch covers every standardised step exactly once.
  expected_keys = {(n, e, t) for n in DATASETS for e, (a, _) in enumerate(ref[n]["standard"])
                   for t in range(len(a))}
  assert seen == expected_keys and len(pipe.samples) == len(expected_keys)


def test_unnormalize_inverts_pipeline_actions(oxe_data_dir):
  pipe = pipeline.DataPipeline(small_config(oxe_data_dir, num_epochs=1), train=False,
                               shard_options=grain.sharding.ShardOptions(0, 1))
  ref = _reference(oxe_data_dir)
  for sample in _samples(pipe)[:40]:
    name = DATASETS[int(sample["dataset_id"])]
    actions, _ = ref[name]["standard"][int(sample["episode_index"])]
    t = int(sample["step_index"])
    raw = pipe.unnormalize_actions(sample["actions"], int(sample["dataset_id"]))
    real = sample["action_mask"]
    truth = actions[t:t + real.sum()]
    low, high = ref[name]["action_q"]
    inside = (truth >= low) & (truth <= high)
    # Inside [q01, q99] the inverse is exact up to float32 rounding (1e-5 of the value range).
    np.testing.assert_allclose(raw[real][inside], truth[inside], rtol=0,
                               atol=1e-5 * float((high - low).max()))
    np.testing.assert_array_equal(raw[real][:, 6], truth[:, 6])


def test_multi_camera_history_and_patch_padding(oxe_data_dir):
  config = small_config(oxe_data_dir, num_epochs=1, num_cameras=2, obs_history=3,
                        pad_to_multiple=28)
  pipe = pipeline.DataPipeline(config, train=False,
                               shard_options=grain.sharding.ShardOptions(0, 1))
  ref = _reference(oxe_data_dir)
  for sample in _samples(pipe)[:30]:
    name = DATASETS[int(sample["dataset_id"])]
    e, t = int(sample["episode_index"]), int(sample["step_index"])
    assert sample["image"].shape == (3, 2, 56, 56, 3)  # [T_obs, n_cams, 32->56, 40->56, 3]
    np.testing.assert_array_equal(sample["history_mask"], t - 2 + np.arange(3) >= 0)
    cams = ("image_0", "image_1") if name == generate.BRIDGE else ("image",)
    np.testing.assert_array_equal(sample["image_mask"], [True, len(cams) == 2])
    for k in range(3):
      step = max(t - 2 + k, 0)
      for c, cam in enumerate(cams):
        raw = ref[name]["steps"][e][step]["observation"][cam]
        np.testing.assert_array_equal(sample["image"][k, c, :32, :40],
                                      transforms.resize(raw, (32, 40)))
      assert sample["image"][k, :, 32:].max() == 0 and sample["image"][k, :, :, 40:].max() == 0
      if len(cams) == 1:
        assert sample["image"][k, 1].max() == 0


def test_mixture_proportions(oxe_data_dir):
  """Weights 3:1 over 400 samples: the bridge fraction is 0.75 within 0.02."""
  config = small_config(oxe_data_dir, weights=(3.0, 1.0))
  pipe = pipeline.DataPipeline(config, shard_options=grain.sharding.ShardOptions(0, 1))
  it = pipe.iterator()
  ids = np.concatenate([next(it)["dataset_id"] for _ in range(100)])
  it.close()
  assert abs((ids == 0).mean() - 0.75) < 0.02, (ids == 0).mean()
  # An endless mixture revisits steps: more samples than one epoch of bridge.
  assert len(ids) > pipe.entries[0].stats.num_steps


def _rows(batches):
  """(dataset id, episode, step) of every sample of `batches`, in order."""
  return [key for batch in batches
          for key in zip(*(batch[k].tolist() for k in ("dataset_id", "episode_index",
                                                        "step_index")))]


def test_host_shards_disjoint_and_complete(oxe_data_dir):
  """Simulated processes each build their own rows of every global batch: disjoint, together
  complete, and concatenated in process order exactly the batches of one process."""
  shard = lambda index, count: grain.sharding.ShardOptions(index, count)
  # One evaluation epoch over 3 processes: every step exactly once (the last, partial global
  # batch is kept, so a process may have one batch more).
  config = small_config(oxe_data_dir, num_epochs=1, batch_size=3)
  per_host = []
  for index in range(3):
    pipe = pipeline.DataPipeline(config, train=False, shard_options=shard(index, 3))
    assert pipe.per_host_batch_size == 1
    per_host.append(_rows(pipe.batches))
  total = sum(e.stats.num_steps for e in pipe.entries)
  assert sum(map(len, per_host)) == len(set().union(*map(set, per_host))) == total
  assert max(map(len, per_host)) - min(map(len, per_host)) <= 1
  # One training epoch over 2 processes: the same number of full batches each, disjoint, and
  # together every sample of the full global batches.
  config = small_config(oxe_data_dir, num_epochs=1, batch_size=4)
  hosts = [pipeline.DataPipeline(config, shard_options=shard(i, 2)) for i in range(2)]
  assert len(hosts[0].batches) == len(hosts[1].batches) == total // 4
  rows = [_rows(h.batches) for h in hosts]
  assert not set(rows[0]) & set(rows[1])
  assert set(rows[0]) | set(rows[1]) == set(_rows(
      hosts[0].samples[:total // 4 * 4].batch(4, batch_fn=pipeline.collate)))
  # The endless training stream: process 0's and 1's halves of global batch b, concatenated,
  # are batch b of one process, augmentation included.
  config = small_config(oxe_data_dir, batch_size=4, **{"augment.enabled": True})
  one = pipeline.DataPipeline(config, shard_options=shard(0, 1))
  two = [pipeline.DataPipeline(config, shard_options=shard(i, 2)) for i in range(2)]
  for b in range(6):
    halves = [host.batches[b] for host in two]
    _batches_equal({k: np.concatenate([h[k] for h in halves]) for k in halves[0]},
                   one.batches[b])


def _batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_iterator_checkpoint_roundtrip_with_orbax(oxe_data_dir, tmp_path):
  """Save after 3 batches, restore into a fresh pipeline (also with 2 worker processes): the
  next 3 batches are identical, augmentation included."""
  config = small_config(oxe_data_dir, **{"augment.enabled": True})
  shard = grain.sharding.ShardOptions(0, 1)
  expected = assert_resume_is_exact(config, tmp_path / "ckpt")
  # Augmentation is on: images differ from the plain resize of the same steps.
  plain = pipeline.DataPipeline(small_config(oxe_data_dir), shard_options=shard)
  assert not np.array_equal(plain.batches[3]["image"], expected[0]["image"])
  np.testing.assert_array_equal(plain.batches[3]["episode_index"], expected[0]["episode_index"])


def test_restore_into_other_configuration_is_an_error(oxe_data_dir):
  shard = grain.sharding.ShardOptions(0, 1)
  state = pipeline.DataPipeline(small_config(oxe_data_dir), shard_options=shard).iterator()
  state = state.get_state()
  other = pipeline.DataPipeline(small_config(oxe_data_dir, seed=1), shard_options=shard)
  with pytest.raises(pipeline.PipelineStateError, match="another configuration"):
    other.iterator().set_state(state)


# --- bad input ---------------------------------------------------------------------------------


def _faulty(tmp_path, kind, faults, **kw):
  data_dir = str(tmp_path)
  generate.generate_dataset(kind, data_dir, num_episodes=4, min_steps=4, max_steps=5,
                            faults=faults, **kw)
  return data_dir


def _open(data_dir, kind, **overrides):
  config = small_config(data_dir, datasets=(kind,), weights=(1.0,), **overrides)
  return pipeline.DataPipeline(config, shard_options=grain.sharding.ShardOptions(0, 1))


def test_missing_directory_and_unknown_dataset(tmp_path):
  with pytest.raises(FileNotFoundError, match="bridge_dataset.*does not exist"):
    _open(str(tmp_path), generate.BRIDGE)
  with pytest.raises(KeyError, match="'droid' is not in the OXE registry"):
    _open(str(tmp_path), "droid")


@pytest.mark.parametrize("kind,faults,match", [
    (generate.BRIDGE, {"drop_key": "observation/state"},
     r"missing feature key 'steps/observation/state'"),
    (generate.FRACTAL, {"state_dim": 6},
     r"'steps/observation/base_pose_tool_reached' has shape \(6,\), the registry expects \(7,\)"),
])
def test_schema_errors(tmp_path, kind, faults, match):
  data_dir = _faulty(tmp_path, kind, faults)
  with pytest.raises(rlds.DataError, match=match):
    _open(data_dir, kind)


@pytest.mark.parametrize("kind,faults,match", [
    (generate.BRIDGE, {"nan_action": 2},
     r"record 2 \(episode_id='2', file_path='synthetic/bridge/2'\), key 'steps/action': "
     r"non-finite value nan"),
    (generate.FRACTAL, {"nan_action": 1},
     r"record 1, key 'steps/action/world_vector': non-finite value nan"),
    (generate.BRIDGE, {"inf_state": 3},
     r"record 3 \(episode_id='3', file_path='synthetic/bridge/3'\), key "
     r"'steps/observation/state': non-finite value inf"),
])
def test_bad_episodes_error_or_counted_skip(tmp_path, kind, faults, match):
  data_dir = _faulty(tmp_path, kind, faults)
  with pytest.raises(rlds.DataError, match=f"dataset '{kind}', {match}.*skip_bad_episodes"):
    _open(data_dir, kind)
  pipe = _open(data_dir, kind, skip_bad_episodes=True, num_epochs=1)
  bad = next(iter(faults.values()))
  assert pipe.num_skipped == {kind: 1} and pipe.num_empty == {kind: 0}
  assert pipe.norm_stats[kind].episode_lengths[bad] == 0
  episodes = collections.Counter(int(s["episode_index"]) for s in _samples(pipe))
  assert bad not in episodes and len(episodes) == 3
  # The stats file now records the skip; reading it without skipping is an error again.
  with pytest.raises(rlds.DataError, match="skip 1 bad episodes"):
    _open(data_dir, kind)


@pytest.mark.parametrize("kind,faults,match", [
    (generate.FRACTAL, {"empty": 0}, r"record 0: empty episode \(0 steps\)"),
    (generate.BRIDGE, {"one_step": 2},
     r"record 2 \(episode_id='2', file_path='synthetic/bridge/2'\): no steps left after "
     r"standardisation \(1 raw steps\)"),
])
def test_episodes_with_nothing_to_train_on_are_skipped_and_counted(tmp_path, kind, faults, match):
  """Default settings: no error; the episode is counted and recorded with the statistics."""
  data_dir = _faulty(tmp_path, kind, faults)
  for _ in range(2):  # Computing the statistics, then reading them back.
    pipe = _open(data_dir, kind, num_epochs=1)
    assert pipe.num_empty == {kind: 1} and pipe.num_skipped == {kind: 0}
    stats = pipe.norm_stats[kind]
    empty = next(iter(faults.values()))
    assert list(stats.empty) == [str(empty)] and stats.episode_lengths[empty] == 0
    assert re.search(f"dataset '{kind}', {match}", stats.empty[str(empty)])
    episodes = collections.Counter(int(s["episode_index"]) for s in _samples(pipe))
    assert empty not in episodes and len(episodes) == 3


def test_samples_carry_the_episode_id(oxe_data_dir):
  """Bridge names its episodes in `episode_metadata`; fractal has none: the record index."""
  config = small_config(oxe_data_dir, num_epochs=1, shuffle=False)
  pipe = pipeline.DataPipeline(config, train=False, shard_options=grain.sharding.ShardOptions(0, 1))
  for sample in _samples(pipe):
    name, index = DATASETS[int(sample["dataset_id"])], int(sample["episode_index"])
    want = str(index) if name == generate.BRIDGE else f"record {index}"
    assert sample["episode_id"] == want
  batch = pipe.batches[0]
  assert batch["episode_id"].shape == (config.batch_size,) and batch["episode_id"].dtype.kind == "U"


# --- dataset entries in the config ---------------------------------------------------------------


def test_a_renamed_dataset_in_a_known_schema_needs_no_code(oxe_data_dir, tmp_path):
  """A mirror of bridge under another name and directory reads exactly like bridge."""
  mirror = tmp_path / "mirror" / "my_widowx"
  shutil.copytree(rlds.resolve_dataset_dir(oxe_data_dir, generate.BRIDGE), mirror / "2.0.0")
  shard = grain.sharding.ShardOptions(0, 1)
  plain = pipeline.DataPipeline(
      small_config(oxe_data_dir, datasets=(generate.BRIDGE,), weights=(1.0,), num_epochs=1),
      train=False, shard_options=shard)
  entries = {
      "absolute dir": dict(name="my_widowx", spec=generate.BRIDGE, dir=str(mirror / "2.0.0")),
      "dataset dir, newest version": dict(name="my_widowx", spec=generate.BRIDGE,
                                          dir=str(mirror)),
      "relative dir": dict(name="my_widowx", spec=generate.BRIDGE, dir="my_widowx/2.0.0"),
      "version under data_dir": dict(name="my_widowx", spec=generate.BRIDGE, version="2.0.0"),
  }
  for what, entry in entries.items():
    config = small_config(str(tmp_path / "mirror"), datasets=(entry,), weights=(), num_epochs=1,
                          stats_dir=str(tmp_path / "stats" / what.replace(" ", "_")))
    renamed = pipeline.DataPipeline(config, train=False, shard_options=shard)
    assert list(renamed.norm_stats) == ["my_widowx"], what
    assert renamed.entries[0].spec.registry_name == generate.BRIDGE
    assert renamed.dataset_entries[0].weight == 1.0
    assert len(renamed.samples) == len(plain.samples)
    for i in range(0, len(plain.samples), 5):
      _batches_equal(renamed.samples[i], plain.samples[i])


def test_only_the_cameras_in_use_are_required(tmp_path):
  data_dir = _faulty(tmp_path, generate.BRIDGE, {"drop_key": "observation/image_3"})
  pipe = _open(data_dir, generate.BRIDGE, num_epochs=1)  # One camera: image_0.
  assert pipe.entries[0].source.cameras == ("image_0",)
  assert pipe.samples[0]["image"].shape == (32, 40, 3)
  with pytest.raises(rlds.DataError, match=r"missing feature key 'steps/observation/image_3'.*"
                                           r"registry entry 'bridge_dataset'.*data.num_cameras"):
    _open(data_dir, generate.BRIDGE, num_cameras=4, stats_dir=str(tmp_path / "s"))


@pytest.mark.parametrize("datasets,weights,match", [
    ((dict(name="a", spec=generate.BRIDGE, dri="x"),), (), r"data.datasets\[0\]: unknown key "
     r"'dri' \(did you mean 'dir'\?\)"),
    ((dict(name="a", spec=generate.BRIDGE, dir="x", version="1.0.0"),), (),
     r"sets both 'dir' and 'version'"),
    ((dict(spec=generate.BRIDGE),), (), r"has no 'name'"),
    ((generate.BRIDGE, dict(name=generate.BRIDGE, dir="x")), (), r"names 'bridge_dataset' twice"),
    ((dict(name="a", spec=generate.BRIDGE, weight=2.0),), (1.0,), r"has a 'weight' and "
     r"data.weights is set too"),
    ((generate.BRIDGE,), (1.0, 1.0), r"1 entries but data.weights has 2"),
    ((dict(name="a", spec=generate.BRIDGE, weight=0.0),), (), r"weights must be positive"),
    ((3,), (), r"neither a registry name nor a dict"),
])
def test_bad_dataset_entries(tmp_path, datasets, weights, match):
  config = small_config(str(tmp_path), datasets=datasets, weights=weights)
  with pytest.raises(ValueError, match=match):
    pipeline.DataPipeline(config, shard_options=grain.sharding.ShardOptions(0, 1))


def test_entry_weights_drive_the_mixture(oxe_data_dir):
  entries = (dict(name=generate.BRIDGE, weight=3.0), dict(name=generate.FRACTAL, weight=1.0))
  config = small_config(oxe_data_dir, datasets=entries, weights=())
  pipe = pipeline.DataPipeline(config, shard_options=grain.sharding.ShardOptions(0, 1))
  ids = np.array([int(pipe.samples[i]["dataset_id"]) for i in range(400)])
  assert abs((ids == 0).mean() - 0.75) < 0.02


def test_stale_stats_are_an_error(tmp_path):
  data_dir = _faulty(tmp_path, generate.BRIDGE, {})
  pipe = _open(data_dir, generate.BRIDGE)
  path = normalization.stats_path(pipe.entries[0].source.path, "train")
  stats = normalization.DatasetStatistics.load(path)
  stats.num_records = 99
  stats.save(path)
  with pytest.raises(rlds.DataError, match="computed for another version"):
    _open(data_dir, generate.BRIDGE)


def test_tfrecord_data_points_to_the_converter(tmp_path):
  data_dir = _faulty(tmp_path, generate.BRIDGE, {})
  info = rlds.resolve_dataset_dir(data_dir, generate.BRIDGE) + "/dataset_info.json"
  with open(info) as f:
    text = f.read()
  with open(info, "w") as f:
    f.write(text.replace('"fileFormat": "array_record"', '"fileFormat": "tfrecord"'))
  with pytest.raises(rlds.DataError, match="stored as 'tfrecord'.*convert_tfrecord.py"):
    _open(data_dir, generate.BRIDGE)


def test_compute_norm_stats_script(oxe_data_dir, tmp_path):
  """The script writes the same statistics the library computes (JSON, float32 values)."""
  out = processes.run(
      [sys.executable, "scripts/compute_norm_stats.py", f"--data_dir={oxe_data_dir}",
       f"--stats_dir={tmp_path}"], tmp_path / "log", cwd=pathlib.Path(__file__).parents[1])
  assert out.returncode == 0, out.stderr[-3000:]
  assert "fractal20220817_data" in out.stdout
  ref = _reference(oxe_data_dir)
  for name in DATASETS:
    stats = normalization.DatasetStatistics.load(
        normalization.stats_path("", "train", str(tmp_path), name))
    np.testing.assert_allclose(stats.action.q01, ref[name]["action_q"][0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(stats.state.q99, ref[name]["state_q"][1], rtol=0, atol=1e-6)


def test_memory_mapped_steps_equal_per_episode_decoding(oxe_data_dir):
  """Samples from the memory-mapped standardised steps equal those re-decoded per episode."""
  config = small_config(oxe_data_dir, num_epochs=1)
  shard = grain.sharding.ShardOptions(0, 1)
  cached = pipeline.DataPipeline(config, train=False, shard_options=shard)
  assert all(isinstance(e.stats.standardized, np.memmap) for e in cached.entries)
  decoded = pipeline.DataPipeline(config, train=False, shard_options=shard)
  for e in decoded.entries:
    e.stats.standardized = None
  for i in range(0, len(cached.samples), 7):
    _batches_equal(cached.samples[i], decoded.samples[i])


def test_a_saved_position_restores_after_the_data_moved(oxe_data_dir, tmp_path):
  """The fingerprint leaves the entries' absolute `dir` out (the step counts stay in): a run
  whose data moved resumes at the same batch; a position saved before (with the `dir` hashed)
  is still accepted where the data has not moved."""
  shard = grain.sharding.ShardOptions(0, 1)
  source = rlds.resolve_dataset_dir(oxe_data_dir, generate.BRIDGE)
  pipes = []
  for where in ("old", "new"):
    shutil.copytree(source, tmp_path / where / "1.0.0")
    entry = dict(name="my_widowx", spec=generate.BRIDGE, dir=str(tmp_path / where / "1.0.0"))
    pipes.append(pipeline.DataPipeline(
        small_config(None, datasets=(entry,), weights=(), stats_dir=str(tmp_path / where)),
        shard_options=shard))
  old, new = pipes
  it = old.iterator()
  next(it)
  state = it.get_state()
  expected = next(it)
  it.close()
  restored = new.iterator()
  restored.set_state(state)
  _batches_equal(next(restored), expected)
  restored.close()
  legacy = dict(state, fingerprint=old.fingerprint(with_dirs=True))
  assert legacy["fingerprint"] != state["fingerprint"]
  restored = old.iterator()
  restored.set_state(legacy)
  _batches_equal(next(restored), expected)
  restored.close()


def test_compute_norm_stats_for_an_entry_with_fewer_cameras(tmp_path):
  """--config: a data.datasets entry (name/spec/dir) whose data lacks cameras of its schema;
  the statistics equal the pipeline's, and no camera is needed."""
  data_dir = _faulty(tmp_path / "data", generate.BRIDGE, {"drop_key": "observation/image_0"})
  directory = rlds.resolve_dataset_dir(data_dir, generate.BRIDGE)
  config = tmp_path / "config.py"
  config.write_text(
      "from twinbrain_jax.data import config as data_config\n"
      "import ml_collections\n"
      "def get_config():\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.data = data_config.default_data_config()\n"
      f"  c.data.datasets = (dict(name='held_out', spec='bridge_dataset', dir={directory!r}),)\n"
      "  c.data.weights = ()\n"
      "  return c\n")
  out = processes.run(
      [sys.executable, "scripts/compute_norm_stats.py", f"--config={config}",
       f"--stats_dir={tmp_path / 'stats'}"], tmp_path / "log",
      cwd=pathlib.Path(__file__).parents[1])
  assert out.returncode == 0, out.stderr[-3000:]
  assert "held_out" in out.stdout
  stats = normalization.DatasetStatistics.load(
      normalization.stats_path("", "train", str(tmp_path / "stats"), "held_out"))
  spec = dataclasses.replace(oxe_registry.get_spec(generate.BRIDGE), name="held_out")
  want = normalization.compute_dataset_statistics(rlds.RldsDataset(directory, spec,
                                                                   num_cameras=0))
  np.testing.assert_array_equal(stats.action.q99, want.action.q99)
  np.testing.assert_array_equal(stats.state.mean, want.state.mean)
  assert stats.episode_lengths == want.episode_lengths


def test_train_with_a_missing_data_dir_is_one_line(tmp_path):
  config = fixtures_training.tiny_config()
  demo_data.write_tokenizer(str(tmp_path / "tokenizer"), config.model, demo_data.CORPUS)
  done = processes.run(
      [sys.executable, "scripts/train.py", "--config=configs/twinbrain.py:tiny",
       f"--workdir={tmp_path / 'run'}", f"--config.data.data_dir={tmp_path / 'nowhere'}",
       f"--config.init.tokenizer={tmp_path / 'tokenizer'}"],
      tmp_path / "log", cwd=pathlib.Path(__file__).parents[1])
  assert done.returncode != 0
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("error: Dataset directory") and "does not exist" in last, last
