"""The mesh, the logical-axis rules, and the bad-input errors of the foundation."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fixtures_training import tiny_config
from twinbrain_jax import sharding
from twinbrain_jax.models.twinbrain import TwinBrainVLA
from twinbrain_jax.training import memory, optimizer as optimizer_lib, state as state_lib
from twinbrain_jax.training import step as step_lib

RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
)
VOCAB, EMBED, MLP, BATCH, LENGTH = 32, 16, 64, 8, 4


class TinyLM(nn.Module):
  """Embedding → RMSNorm → MLP → logits, every parameter logically annotated."""

  @nn.compact
  def __call__(self, tokens):  # tokens: [B, L] int
    embed = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
        (VOCAB, EMBED))
    x = jnp.take(embed, tokens, axis=0)  # [B, L, E]
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = nn.RMSNorm(scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)))(x)
    h = nn.Dense(MLP, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("embed", "mlp")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x)
    h = nn.with_logical_constraint(nn.gelu(h), ("batch", "length", "mlp"))
    x = x + nn.Dense(EMBED, use_bias=False, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("mlp", "embed")))(h)
    return jnp.einsum("ble,ve->blv", x, embed)  # [B, L, V]


EXPECTED_SPECS = {
    "embedding": P("tensor", "fsdp"),
    "RMSNorm_0/scale": P(None),
    "Dense_0/kernel": P("fsdp", "tensor"),
    "Dense_0/bias": P("tensor"),
    "Dense_1/kernel": P("tensor", "fsdp"),
}


def _flat(tree):
  return {"/".join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _sharded_init_and_apply(mesh_shape):
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)))
  rules = sharding.logical_axis_rules(RULES, mesh)
  model = TinyLM()
  tokens = jnp.arange(BATCH * LENGTH).reshape(BATCH, LENGTH) % VOCAB
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
    shardings = sharding.logical_shardings(abstract, mesh, rules)
    params = jax.jit(lambda r, t: nn.unbox(model.init(r, t)), out_shardings=shardings)(
        jax.random.key(0), tokens)
    tokens = jax.device_put(tokens, sharding.batch_sharding(mesh, 2))
    logits = jax.jit(model.apply)(params, tokens)
  return mesh, params, logits


def test_eight_fake_devices():
  assert jax.device_count() == 8, "tests need XLA_FLAGS=--xla_force_host_platform_device_count=8"


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (1, 4, 2)])
def test_rules_shard_params_and_activations(mesh_shape):
  mesh, params, logits = _sharded_init_and_apply(mesh_shape)
  assert dict(mesh.shape) == dict(zip(sharding.MESH_AXES, mesh_shape))
  sizes = dict(mesh.shape)
  flat = _flat(params["params"])
  assert set(flat) == set(EXPECTED_SPECS)
  for name, array in flat.items():
    spec = EXPECTED_SPECS[name]
    assert array.sharding.spec == spec, name
    assert array.sharding.mesh.shape == mesh.shape
    # The shard each device holds really is the global shape split by the named mesh axes.
    expected_shard = tuple(
        dim // (sizes[axis] if axis else 1) for dim, axis in zip(array.shape, tuple(spec) + (None,) * 2))
    assert array.addressable_shards[0].data.shape == expected_shard, name
    assert len(array.devices()) == 8
  # The batch of the output is split over data × fsdp.
  assert logits.sharding.shard_shape(logits.shape)[0] == BATCH // (sizes["data"] * sizes["fsdp"])


def test_sharded_numerics_equal_unsharded():
  reference = None
  for mesh_shape in [(8, 1, 1), (2, 4, 1), (1, 4, 2)]:
    _, params, logits = _sharded_init_and_apply(mesh_shape)
    logits = np.asarray(logits)
    if reference is None:
      unsharded_params = jax.tree.map(np.asarray, params)
      tokens = jnp.arange(BATCH * LENGTH).reshape(BATCH, LENGTH) % VOCAB
      reference = np.asarray(TinyLM().apply(unsharded_params, tokens))
    # Reductions over sharded axes may reorder float sums.
    np.testing.assert_allclose(logits, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mesh_config, message", [
    (dict(data=3, fsdp=1, tensor=1), "multiplies to 3 devices but 8 are available"),
    (dict(data=-1, fsdp=3, tensor=1), "does not divide the 8 devices"),
    (dict(data=-1, fsdp=-1, tensor=1), "more than one axis set to -1"),
    (dict(data=-1, fsdp=1, tensor=1, expert=2), "Unknown mesh axis 'expert'"),
    (dict(data=-1, fsdp=1), "missing axis 'tensor'"),
    (dict(data=0, fsdp=1, tensor=8), "config.mesh.data=0 is not a valid size"),
])
def test_bad_mesh_is_a_clear_error(mesh_config, message):
  with pytest.raises(sharding.MeshConfigError, match=message):
    sharding.make_mesh(mesh_config)


def test_minus_one_takes_remaining_devices():
  assert sharding.resolve_mesh_shape(dict(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
  assert sharding.resolve_mesh_shape(dict(data=-1, fsdp=1, tensor=1), 16) == (16, 1, 1)


def test_rule_with_unknown_mesh_axis_is_a_clear_error():
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  with pytest.raises(sharding.MeshConfigError, match="'mlp' to unknown mesh axis 'model'"):
    sharding.logical_axis_rules((("embed", "fsdp"), ("mlp", "model")), mesh)


def test_logical_name_without_rule_is_a_clear_error():
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  rules = sharding.logical_axis_rules((("vocab", "tensor"), ("embed", "fsdp")), mesh)
  abstract = jax.eval_shape(TinyLM().init, jax.random.key(0), jnp.zeros((2, 2), jnp.int32))
  with pytest.raises(sharding.MeshConfigError, match=r"Dense_0.*logical axis 'mlp'"):
    sharding.logical_shardings(abstract, mesh, rules)


def test_distributed_start_up_decision(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
              "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  assert not sharding.maybe_initialize_distributed({})
  assert calls == []
  with pytest.raises(sharding.MeshConfigError, match="num_processes and process_id"):
    sharding.maybe_initialize_distributed(dict(coordinator_address="10.0.0.1:1234"))
  assert sharding.maybe_initialize_distributed(
      dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1))
  assert calls[-1] == dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert sharding.maybe_initialize_distributed({})
  assert calls[-1] == {}  # JAX reads the SLURM environment itself.


def _float_all_gathers(config, batch_size):
  """Result shapes of the floating-point all-gathers in the compiled train step."""
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_axis_rules(config.logical_axis_rules, mesh)
  model = TwinBrainVLA(state_lib.model_config(config))
  tx = optimizer_lib.make_optimizer(config.train)
  abstract, shardings = state_lib.abstract_state(model, tx, mesh, rules, config.seed)
  batch, grid = memory.abstract_batch(config, batch_size, mesh)
  step = step_lib.jit_train_step(
      step_lib.make_train_step(model, tx, grid, config.flow.num_repeats), shardings,
      {k: v.sharding for k, v in batch.items()}, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    hlo = step.lower(abstract, batch).compile(memory.PLAN_ONLY_CPU_COMPILER_OPTIONS).as_text()
  return sorted(re.findall(r"= ((?:f32|bf16)\[[\d,]*\])\S* all-gather\(", hlo))


def test_fsdp_step_gathers_weights_not_the_batch():
  """Under FSDP every device gathers weights, never another device's samples: the float
  all-gathers of the TwinBrain step (vision tower, image features, R noise draws, expert) have
  the same shapes at global batch 8 and 16. (Integer token ids may be gathered: the embedding
  lookup. XLA may gather a weight whole or sliced, once or twice, so shapes are compared as
  sets.)"""
  config = tiny_config(mesh_shape=(1, 8, 1))
  at_8, at_16 = set(_float_all_gathers(config, 8)), set(_float_all_gathers(config, 16))
  assert at_8, "no all-gather parsed: FSDP weights must be gathered"
  assert at_16 == at_8, f"batch-sized all-gathers: {sorted(at_16 ^ at_8)}"
