"""A tiny policy in both served forms, built once per test session by the project's own paths:
a training checkpoint (the tiny preset's initial train state, norm stats computed by the data
pipeline on the generated bridge/fractal datasets, a synthetic tokenizer) and the float32
inference bundle `export.export_checkpoint` writes from it.

    from fixtures_data import oxe_data_dir  # noqa: F401  (pytest fixtures)
    from fixtures_serving import tiny_policy_dirs  # noqa: F401
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import ml_collections
import numpy as np
import pytest

from twinbrain_jax import sharding
from twinbrain_jax.data import oxe_registry
from twinbrain_jax.data.normalization import ArrayStats
from twinbrain_jax.data.pipeline import DataPipeline
from twinbrain_jax.models.tokenizer import write_synthetic_tokenizer
from twinbrain_jax.models.twinbrain import TwinBrainVLA
from twinbrain_jax.training import checkpoint as checkpoint_lib
from twinbrain_jax.training import export, optimizer
from twinbrain_jax.training import state as state_lib
from twinbrain_jax.training.demo_data import CORPUS

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import twinbrain as twinbrain_configs  # noqa: E402  (configs/ is not a package)


@dataclasses.dataclass(frozen=True)
class PolicyDirs:
  """Where the tiny policy lives, and the config it was trained with."""
  checkpoint_dir: pathlib.Path
  bundle_dir: pathlib.Path
  config: ml_collections.ConfigDict


@pytest.fixture(scope="session")
def tiny_policy_dirs(tmp_path_factory, oxe_data_dir) -> PolicyDirs:
  return make_policy_dirs(tmp_path_factory.mktemp("tiny_policy"), oxe_data_dir, "tiny")


def make_policy_dirs(root: pathlib.Path, oxe_data_dir: str, preset: str) -> PolicyDirs:
  """The checkpoint and bundle of `configs/twinbrain.py:<preset>`'s initial train state."""
  config = twinbrain_configs.get_config(preset)
  config.data.data_dir = oxe_data_dir
  return write_policy_dirs(root, config)


def write_policy_dirs(root: pathlib.Path, config: ml_collections.ConfigDict,
                      norm_stats: dict | None = None) -> PolicyDirs:
  """The checkpoint and bundle of `config`'s initial train state; the norm stats are computed by
  the data pipeline on `config.data` unless given."""
  model_config = state_lib.model_config(config)
  write_synthetic_tokenizer(root / "tokenizer", model_config.backbone, CORPUS,
                            (model_config.action_token_id, model_config.propri_token_id))
  config.init.tokenizer = str(root / "tokenizer")
  if norm_stats is None:
    pipeline = DataPipeline(config.data, train=False)  # Computes the norm stats, as training does.
    norm_stats = {name: stats.to_json() for name, stats in pipeline.norm_stats.items()}

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_axis_rules(config.logical_axis_rules, mesh)
  model = TwinBrainVLA(model_config)
  state = state_lib.create_train_state(model, optimizer.make_optimizer(config.train), mesh,
                                       rules, config.seed)
  manager = checkpoint_lib.make_manager(str(root / "checkpoints"), config.checkpoint)
  checkpoint_lib.save(manager, 0, state, data_iterator=None, norm_stats=norm_stats,
                      config=checkpoint_lib.config_to_json(config))
  manager.wait_until_finished()
  manager.close()
  bundle = export.export_checkpoint(root / "checkpoints", root / "bundle", dtype="float32")
  return PolicyDirs(checkpoint_dir=root / "checkpoints", bundle_dir=bundle, config=config)


# A 14-dim bimanual embodiment (openpi's ALOHA layout: state and actions of 14 joints), added to
# the dataset registry as a user adds theirs; `tests/serve_test_embodiment.py` serves with it.
ALOHA_TEST_SPEC = oxe_registry.DatasetSpec(
    name="aloha_test", image_keys=("cam_high",), image_shape=(224, 224),
    language_key="language_instruction",
    lowdim_keys={"action": (14,), "observation/state": (14,)},
    standardize=oxe_registry.standardize_metaworld, action_dim=14, state_dim=14,
    action_normalize_mask=(True,) * 14, action_binarize_mask=(False,) * 14,
    state_normalize_mask=(True,) * 14)


def register_test_embodiment() -> None:
  oxe_registry.OXE_DATASETS.setdefault(ALOHA_TEST_SPEC.name, ALOHA_TEST_SPEC)


@pytest.fixture(scope="session")
def aloha_policy_dirs(tmp_path_factory) -> PolicyDirs:
  """The `tiny` preset's initial train state with 14-dim states and actions (`aloha_test`),
  with random statistics."""
  register_test_embodiment()
  config = twinbrain_configs.get_config("tiny")
  config.data.update(datasets=(ALOHA_TEST_SPEC.name,), weights=(1.0,), state_dim=14,
                     action_dim=14)
  config.model.state_dim = 14
  config.model.action_expert.update(action_dim=14, state_dim=14)
  rng = np.random.default_rng(0)
  stats = lambda: ArrayStats.compute(rng.normal(size=(500, 14)) * 0.3).to_json()
  norm_stats = {ALOHA_TEST_SPEC.name: dict(action=stats(), state=stats())}
  return write_policy_dirs(tmp_path_factory.mktemp("aloha_policy"), config, norm_stats)


def observation(seed: int, dataset: str = "bridge_dataset", image_shape=(96, 128),
                instruction: str = "put the carrot on the plate") -> dict:
  """A valid raw observation with a random image of `image_shape` and a random state."""
  rng = np.random.default_rng(seed)
  state_dim = {"bridge_dataset": 7, "fractal20220817_data": 8}[dataset]
  return dict(image=rng.integers(0, 256, (*image_shape, 3), dtype=np.uint8),
              state=rng.normal(size=state_dim).astype(np.float32), instruction=instruction,
              dataset=dataset)


def bad_observation(**changes) -> dict:
  """`observation(seed=0)` with keys replaced (None deletes the key)."""
  obs = observation(seed=0)
  for key, value in changes.items():
    if value is None:
      del obs[key]
    else:
      obs[key] = value
  return obs


def openpi_example(name: str, seed: int = 0) -> dict:
  """An observation laid out as openpi's example clients build it (examples/simple_client,
  examples/libero, examples/droid, examples/aloha_real): same keys, shapes and dtypes."""
  rng = np.random.default_rng(seed)
  image = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)
  if name == "libero":
    return {"observation/state": rng.random(8), "observation/image": image(224, 224, 3),
            "observation/wrist_image": image(224, 224, 3), "prompt": "do something"}
  if name == "droid":
    return {"observation/exterior_image_1_left": image(224, 224, 3),
            "observation/wrist_image_left": image(224, 224, 3),
            "observation/joint_position": rng.random(7),
            "observation/gripper_position": rng.random(1), "prompt": "do something"}
  if name == "aloha":
    return {"state": rng.random(14),
            "images": {cam: image(3, 224, 224)
                       for cam in ("cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist")},
            "prompt": "do something"}
  raise ValueError(name)
