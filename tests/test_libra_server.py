"""Libra-VLA through the project's checkpoint, export, Policy and websocket server paths, driven by
the real openpi-client: the interleaved schedule in-process, the async runtime over the wire."""

import contextlib
import re
import sys

import jax
import numpy as np
import pytest
from openpi_client.websocket_client_policy import WebsocketClientPolicy

import processes
from fixtures_data import oxe_data_dir  # noqa: F401  (pytest fixture)
from fixtures_serving import REPO, observation
from test_libra import libra_configs
from twinbrain_jax import sharding
from twinbrain_jax.data.pipeline import DataPipeline
from twinbrain_jax.models import families, libra
from twinbrain_jax.models.tokenizer import write_synthetic_tokenizer
from twinbrain_jax.serving.libra import LibraPolicy
from twinbrain_jax.serving.policy import ObservationError, Policy
from twinbrain_jax.training import checkpoint as checkpoint_lib
from twinbrain_jax.training import export, optimizer
from twinbrain_jax.training import state as state_lib
from twinbrain_jax.training.demo_data import CORPUS

pytestmark = pytest.mark.filterwarnings(
    "ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")
HANG_S = 300  # Only catches a hang: a loaded 2-core machine compiles slowly.


@pytest.fixture(scope="module")
def libra_bundle(tmp_path_factory, oxe_data_dir):
  """The tiny Libra preset's initial train state, saved as a training checkpoint and exported as
  a float32 bundle (norm stats from the generated bridge/fractal data)."""
  root = tmp_path_factory.mktemp("libra_policy")
  config = libra_configs.get_config("tiny")
  config.data.data_dir = oxe_data_dir
  model_config = state_lib.model_config(config)
  write_synthetic_tokenizer(root / "tokenizer", model_config.backbone, CORPUS)
  config.init.tokenizer = str(root / "tokenizer")
  pipeline = DataPipeline(config.data, train=False)
  norm_stats = {name: stats.to_json() for name, stats in pipeline.norm_stats.items()}
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_axis_rules(config.logical_axis_rules, mesh)
  tx = optimizer.make_optimizer(config.train, families.TRAINABLE_GROUPS["libra"])
  state = state_lib.create_train_state(families.build_model(model_config), tx, mesh, rules,
                                       config.seed)
  manager = checkpoint_lib.make_manager(str(root / "checkpoints"), config.checkpoint)
  checkpoint_lib.save(manager, 0, state, data_iterator=None, norm_stats=norm_stats,
                      config=checkpoint_lib.config_to_json(config))
  manager.wait_until_finished()
  manager.close()
  return export.export_checkpoint(root / "checkpoints", root / "bundle", dtype="float32")


@pytest.fixture(scope="module")
def policy(libra_bundle):
  policy = Policy.load(libra_bundle, mode="interleaved")
  yield policy
  policy.close()


def test_interleaved_policy_plans_once_per_m_chunks(policy):
  assert isinstance(policy, LibraPolicy) and policy.metadata()["variant"] == "libra-interleaved"
  config = policy.bundle.model.config
  obs = [observation(seed=s) for s in range(config.num_segments + 1)]
  results = [policy.infer(o) for o in obs]
  assert [r["policy_timing"]["planned"] for r in results] == [1.0, 0.0, 1.0]
  assert all(r["actions"].shape == (config.segment_length, 7) for r in results)
  # Chunk 1 is segment 1 of the plan made from observation 0, refined on observation 1.
  batch0, batch1 = (policy.model_batch([policy.check(o)]) for o in obs[:2])
  bins = np.asarray(libra.plan(policy.bundle.model, policy.bundle.params, batch0,
                               policy.inputs.image_grid_thw(1)))
  noise = jax.random.normal(jax.random.key(policy.seed), libra.segment_shape(config, 1))
  refined = libra.refine(policy.bundle.model, policy.bundle.params, batch1, bins[:, 1], noise,
                         policy.num_steps)
  want = policy.postprocess(np.asarray(refined), [policy.check(obs[1])])[0]
  np.testing.assert_allclose(results[1]["actions"], want, rtol=0, atol=1e-5)
  # A new episode empties the buffer.
  assert policy.infer(dict(obs[0], new_episode=True))["policy_timing"]["planned"] == 1.0
  with pytest.raises(ObservationError, match="one intent buffer"):
    policy.infer_batch([obs[0], obs[1]])


@contextlib.contextmanager
def _serving(log_dir, *flags):
  args = [sys.executable, "scripts/serve.py", "--host=127.0.0.1", "--port=0", *flags]
  with processes.started(args, log_dir, cwd=REPO) as child:
    child.wait_for(lambda: "serving on ws://" in child.stdout, "the server listening", HANG_S)
    yield int(re.search(r"serving on ws://127\.0\.0\.1:(\d+)", child.stdout).group(1))


def test_async_server_round_trip_with_openpi_client(libra_bundle, policy, tmp_path):
  obs = [observation(seed=s) for s in range(4)]
  policy.reset()
  first_interleaved = policy.infer(obs[0])["actions"]
  with _serving(tmp_path, f"--bundle={libra_bundle}", "--libra_mode=async") as port:
    client = WebsocketClientPolicy(host="127.0.0.1", port=port)
    try:
      metadata = client.get_server_metadata()
      replies = [client.infer(o) for o in obs]
    finally:
      client._ws.close()
  assert metadata["variant"] == "libra-async" and metadata["libra"]["num_segments"] == 2
  assert metadata["action_horizon"] == 5
  # The first chunk is planned synchronously: the same as the interleaved policy's.
  np.testing.assert_allclose(replies[0]["actions"], first_interleaved, rtol=0, atol=1e-5)
  assert replies[0]["server_timing"]["planned"] == 1.0
  assert all(r["server_timing"]["planned"] == 0.0 for r in replies[1:])
  assert all(r["actions"].shape == (5, 7) and np.isfinite(r["actions"]).all() for r in replies)
