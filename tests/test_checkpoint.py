"""Checkpoints: restore onto another mesh, incompatible configs, damaged steps, crashes during a
save or a deletion, export."""

import logging
import os
import shutil
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

import processes
from fixtures_training import REPO, Trainer, synthetic_batch, tiny_config, to_numpy
from twinbrain_jax import sharding
from twinbrain_jax.models.twinbrain import TwinBrainVLA, sample_actions
from twinbrain_jax.training import checkpoint as checkpoint_lib
from twinbrain_jax.training import export
from twinbrain_jax.training import state as state_lib
from twinbrain_jax.training.demo_data import CORPUS

_ACTION_STATS = dict(mean=[0.0] * 7, std=[1.0] * 7, min=[-2.0] * 7, max=[2.0] * 7,
                     q01=[-1.0] * 7, q99=[3.0] * 7, count=10)
NORM_STATS = {"bridge_dataset": {"action": _ACTION_STATS}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A state after one step on mesh (8, 1, 1), saved at step 1: (config, state, manager dir)."""
  config = tiny_config((8, 1, 1))
  batch, grid = synthetic_batch(config)
  trainer = Trainer(config, grid)
  state, _ = trainer.step(trainer.init(), batch)
  directory = str(tmp_path_factory.mktemp("ckpt"))
  manager = checkpoint_lib.make_manager(directory, config.checkpoint)
  checkpoint_lib.save(manager, 1, state, data_iterator=None, norm_stats=NORM_STATS,
                      config=checkpoint_lib.config_to_json(config))
  manager.wait_until_finished()
  manager.close()
  return config, state, directory


def _abstract(config):
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_axis_rules(config.logical_axis_rules, mesh)
  model = TwinBrainVLA(state_lib.model_config(config))
  from twinbrain_jax.training import optimizer
  return mesh, state_lib.abstract_state(model, optimizer.make_optimizer(config.train), mesh,
                                        rules)[0]


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 4, 2)])
def test_checkpoint_from_mesh_a_restores_on_mesh_b(saved, mesh_shape):
  config, state, directory = saved
  config_b = tiny_config(mesh_shape)
  mesh_b, abstract = _abstract(config_b)
  manager = checkpoint_lib.make_manager(directory, config_b.checkpoint)
  step, restored, norm_stats = checkpoint_lib.restore(
      manager, abstract, data_iterator=None, config=checkpoint_lib.config_to_json(config_b))
  manager.close()
  assert step == 1 and norm_stats == NORM_STATS
  for got, want, target in zip(jax.tree.leaves(restored), jax.tree.leaves(state),
                               jax.tree.leaves(abstract)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding == target.sharding and got.dtype == target.dtype
  # The restored layout really is mesh B's: an fsdp x tensor-sharded kernel.
  kernel = restored.params["right"]["model"]["layers"]["mlp"]["up_proj"]["kernel"]
  assert kernel.sharding.mesh.shape == mesh_b.shape
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert restored.frozen["left"]["model"]["norm"]["scale"].dtype == np.dtype("bfloat16")


def test_checkpoint_of_another_model_is_a_clear_error(saved):
  _, _, directory = saved
  other = tiny_config((8, 1, 1))
  other.model.num_action_queries = 4
  _, abstract = _abstract(other)
  manager = checkpoint_lib.make_manager(directory, other.checkpoint)
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError,
                     match=r"checkpoint .*/1 was written for another model: "
                           r"config\.model\.num_action_queries is 8 there but 4 now\. Resume "
                           r"with the config it was trained with") as raised:
    checkpoint_lib.restore(manager, abstract, data_iterator=None,
                           config=checkpoint_lib.config_to_json(other))
  manager.close()
  assert not isinstance(raised.value, checkpoint_lib.DamagedCheckpointError)


def _two_steps(saved_dir, tmp_path):
  """A copy of the saved run with a second step (a copy of step 1) to damage: its dir."""
  directory = tmp_path / "ckpt"
  shutil.copytree(saved_dir, directory)
  shutil.copytree(directory / "1", directory / "2")
  assert [s.step for s in checkpoint_lib.list_steps(directory) if s.whole] == [1, 2]
  return directory


def _restore(config, directory, step=None):
  """`checkpoint.restore` of `directory` onto `config`'s mesh: (step, state)."""
  _, abstract = _abstract(config)
  manager = checkpoint_lib.make_manager(str(directory), config.checkpoint)
  try:
    step, state, _ = checkpoint_lib.restore(manager, abstract, data_iterator=None, step=step,
                                            config=checkpoint_lib.config_to_json(config))
  finally:
    manager.close()
  return step, state


def _remove(path):
  shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.parametrize("item", ["state", "config", "state/_METADATA", "_CHECKPOINT_METADATA"])
def test_a_step_with_a_missing_item_is_damaged_and_resume_takes_the_previous_one(
    saved, tmp_path, caplog, item):
  config, state, saved_dir = saved
  directory = _two_steps(saved_dir, tmp_path)
  _remove(directory / "2" / item)
  missing = item + "/" if (directory / "1" / item).is_dir() else item
  statuses = checkpoint_lib.list_steps(directory)
  assert [(s.step, s.whole) for s in statuses] == [(1, True), (2, False)]
  assert missing in statuses[1].missing
  # Asked for, the damaged step says what it lacks and which whole step to use instead.
  with pytest.raises(checkpoint_lib.DamagedCheckpointError,
                     match=rf"step 2 in .* is damaged or incomplete: .*{missing} .*missing.* The "
                           r"latest whole step before it is 1: export it with scripts/export\.py "
                           r"--step=1; re-running the training resumes from step 1 \(moving "
                           r"step 2 to damaged/\)"):
    _restore(config, directory, step=2)
  # Resuming skips it with a warning and takes step 1.
  with caplog.at_level(logging.WARNING):
    step, restored = _restore(config, directory)
  assert step == 1
  assert any("Skipping checkpoint step 2" in r.getMessage() and missing in r.getMessage()
             for r in caplog.records), caplog.text
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_unreadable_array_data_is_damage_not_a_config_mismatch(saved, tmp_path, caplog):
  config, _, saved_dir = saved
  directory = _two_steps(saved_dir, tmp_path)
  # The largest shard file: array data the step's structure does not show missing.
  data_files = sorted((directory / "2" / "state").glob("ocdbt.process_*/d/*"),
                      key=lambda p: p.stat().st_size)
  data_files[-1].unlink()
  with pytest.raises(checkpoint_lib.DamagedCheckpointError,
                     match=r"step 2 in .* is damaged or incomplete: state/ could not be read .*"
                           r"latest whole step before it is 1"):
    _restore(config, directory, step=2)
  with caplog.at_level(logging.WARNING):
    step, _ = _restore(config, directory)
  assert step == 1 and "Skipping checkpoint step 2" in caplog.text


_CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np
    import ml_collections
    from twinbrain_jax.training import checkpoint as checkpoint_lib
    options = ml_collections.ConfigDict(dict(keep_last=5, keep_every=None, async_save=True))
    manager = checkpoint_lib.make_manager(sys.argv[1], options)
    small = {"w": np.full((4, 4), 1.0, np.float32)}
    checkpoint_lib.save(manager, 1, small, data_iterator=None, norm_stats={}, config={})
    manager.wait_until_finished()
    big = {"w": np.random.default_rng(0).normal(size=(64, 1024, 1024)).astype(np.float32)}
    checkpoint_lib.save(manager, 2, big, data_iterator=None, norm_stats={}, config={})
    print("crashing", flush=True)
    os._exit(3)  # Dies while the async save of step 2 is being written.
""")


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_intact(tmp_path):
  directory = str(tmp_path / "ckpt")
  done = processes.run([sys.executable, "-c", _CRASH_SCRIPT, directory], tmp_path / "log",
                       cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == 3 and "crashing" in done.stdout, done.stderr[-2000:]
  options = tiny_config().checkpoint
  manager = checkpoint_lib.make_manager(directory, options)
  assert manager.all_steps() == [1] and manager.latest_step() == 1
  import orbax.checkpoint as ocp
  restored = manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  np.testing.assert_array_equal(np.asarray(restored["state"]["w"]), np.ones((4, 4)))
  manager.close()
  # The partial step-2 write is a temporary directory, never a step.
  assert not (tmp_path / "ckpt" / "2").exists()


def test_exported_bundle_samples_the_same_actions(saved, tmp_path):
  config, state, _ = saved
  tokenizer_dir = tmp_path / "tokenizer"
  from twinbrain_jax.models.tokenizer import write_synthetic_tokenizer
  model_config = state_lib.model_config(config)
  write_synthetic_tokenizer(tokenizer_dir, model_config.backbone, CORPUS,
                            (model_config.action_token_id, model_config.propri_token_id))
  out = export.export_bundle(state.all_params(), checkpoint_lib.config_to_json(config),
                             NORM_STATS, tokenizer_dir, tmp_path / "bundle", dtype="float32")
  bundle = export.load_bundle(out)
  obs, grid = synthetic_batch(config, batch_size=2, seed=5)
  obs = {k: v for k, v in obs.items() if k not in ("actions", "action_mask")}
  rng = jax.random.key(7)
  model = TwinBrainVLA(model_config)
  params = jax.device_get(state.all_params())
  sample = jax.jit(lambda p, o, r, m=None: sample_actions(m, p, o, grid, r, num_steps=4),
                   static_argnums=3)
  want = sample(params, obs, rng, model)
  got = sample(bundle.params, obs, rng, bundle.model)
  # Same params, same noise, same device: identical up to float32 op-order noise.
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
  assert bundle.tokenizer.vocab_size > 0 and bundle.norm_stats == NORM_STATS
  raw = export.unnormalize_actions(bundle, np.asarray(got), "bridge_dataset")
  # q01..q99 = -1..3: movement dims map y -> 2y + 1; the gripper thresholds at 0.5.
  clipped = np.clip(np.asarray(got), -1, 1)
  np.testing.assert_allclose(raw[..., :6], 2 * clipped[..., :6] + 1, atol=1e-6)
  np.testing.assert_array_equal(raw[..., 6], (np.asarray(got)[..., 6] > 0.5).astype(np.float32))
  # A bf16 bundle stores every parameter in bf16 and still samples close to fp32.
  out16 = export.export_bundle(state.all_params(), checkpoint_lib.config_to_json(config),
                               NORM_STATS, tokenizer_dir, tmp_path / "bundle16")
  bundle16 = export.load_bundle(out16, compute_dtype="float32")
  assert {x.dtype for x in jax.tree.leaves(bundle16.params)} == {np.dtype("bfloat16")}
  with pytest.raises(FileExistsError):
    export.export_bundle(state.all_params(), {}, {}, tokenizer_dir, out)


def test_retention_renames_a_step_away_before_deleting_it(tmp_path, monkeypatch):
  directory = tmp_path / "ckpt"
  options = ml_collections.ConfigDict(dict(keep_last=2, keep_every=None, async_save=False))
  manager = checkpoint_lib.make_manager(str(directory), options)

  def save(step):
    checkpoint_lib.save(manager, step, {"w": np.full((4, 4), step, np.float32)},
                        data_iterator=None, norm_stats={}, config={})
    manager.wait_until_finished()

  for step in (1, 2, 3):
    save(step)
  # Retention dropped step 1 by renaming it into todelete/, which the next save emptied.
  assert sorted(os.listdir(directory)) == ["2", "3", "todelete"]
  assert os.listdir(directory / "todelete") == []
  # A run killed before removing what it renamed: step 2 left whole under todelete/ ...
  monkeypatch.setattr(checkpoint_lib, "purge_deleted", lambda directory: None)
  save(4)
  manager.close()
  dropped = directory / "todelete" / "2"
  assert checkpoint_lib.missing_parts(dropped) == ()
  # ... and killed half-way through removing it: never a step again.
  for path in sorted(p for p in dropped.rglob("*") if p.is_file())[::2]:
    path.unlink()
  assert [(s.step, s.whole) for s in checkpoint_lib.list_steps(directory)] == [(3, True),
                                                                               (4, True)]
  assert checkpoint_lib.latest_whole_step(directory) == 4
  monkeypatch.undo()
  checkpoint_lib.purge_deleted(directory)  # What the next run does at start-up.
  assert sorted(os.listdir(directory)) == ["3", "4", "todelete"]
  assert os.listdir(directory / "todelete") == []


def test_export_and_the_scripts_never_pick_a_partly_deleted_step(saved, tmp_path, caplog):
  config, state, saved_dir = saved
  directory = _two_steps(saved_dir, tmp_path)
  # What an in-place delete killed half-way leaves: state's files gone, its folders still there.
  for path in (directory / "2" / "state").rglob("*"):
    if path.is_file():
      path.unlink()
  assert (directory / "2" / "state" / "d").is_dir()
  status = checkpoint_lib.list_steps(directory)[-1]
  assert status.step == 2 and "state/_METADATA" in status.missing
  with caplog.at_level(logging.WARNING):
    params, _, norm_stats = export.restore_checkpoint(directory)
  assert "Skipping checkpoint step 2" in caplog.text and norm_stats == NORM_STATS
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(state.all_params())):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  bundle = tmp_path / "bundle"
  with pytest.raises(checkpoint_lib.DamagedCheckpointError, match=r"--step=1"):
    export.export_checkpoint(directory, bundle, step=2)
  assert not bundle.exists()

  env = dict(os.environ, JAX_PLATFORMS="cpu")
  listed = processes.run([sys.executable, "scripts/checkpoints.py",
                          f"--checkpoint_dir={directory}"], tmp_path / "list", cwd=REPO, env=env)
  assert listed.returncode == 0, listed.stderr[-2000:]
  rows = [line.split(None, 2) for line in listed.stdout.splitlines()[1:-1]]
  assert rows[0] == ["1", "whole"] and rows[1][:2] == ["2", "damaged"]
  assert "state/_METADATA" in rows[1][2]
  assert listed.stdout.splitlines()[-1] == "latest whole step: 1"
  done = processes.run([sys.executable, "scripts/export.py", f"--checkpoint_dir={directory}",
                        f"--out={bundle}", "--step=2"], tmp_path / "export", cwd=REPO, env=env)
  assert done.returncode == 1 and "wrote" not in done.stdout and not bundle.exists()
  assert "error: Checkpoint step 2" in done.stderr and "--step=1" in done.stderr
  assert "Traceback" not in done.stderr
