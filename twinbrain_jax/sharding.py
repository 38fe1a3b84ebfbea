"""The device mesh and logical-axis sharding, built from config in one place.

Models name the axes of every parameter and large activation with *logical* names
(`batch`, `length`, `embed`, `mlp`, `heads`, `kv_heads`, `kv`, `vocab`, ...). One table of
rules in the config maps those names to the mesh axes `data`, `fsdp` and `tensor`; changing
the parallelism of a run means editing that table or the mesh sizes, never the model.

    mesh = make_mesh(config.mesh)
    rules = logical_axis_rules(config.logical_axis_rules, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(model.init, rng, *inputs)
        shardings = logical_shardings(abstract, mesh, rules)
        params = jax.jit(model.init, out_shardings=shardings)(rng, *inputs)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from twinbrain_jax.config_lib import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Mesh axes that split the batch: every data-parallel replica and every FSDP shard sees
# different examples.
BATCH_MESH_AXES = ("data", "fsdp")

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


class MeshConfigError(ConfigError):
  """A mesh or logical-rule configuration that cannot be built."""


def resolve_mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves the sizes of `MESH_AXES`; one size may be -1 (all remaining devices).

  Args:
    mesh_config: mapping with exactly the keys `data`, `fsdp`, `tensor`.
    num_devices: the number of devices the mesh must cover exactly.

  Returns:
    The sizes in `MESH_AXES` order, multiplying to `num_devices`.
  """
  names = set(mesh_config.keys())
  unknown = sorted(names - set(MESH_AXES))
  if unknown:
    raise MeshConfigError(
        f"Unknown mesh axis {unknown[0]!r} in config.mesh; the mesh axes are {MESH_AXES}. "
        f"Remove it or rename it to one of those.")
  missing = [a for a in MESH_AXES if a not in names]
  if missing:
    raise MeshConfigError(
        f"config.mesh is missing axis {missing[0]!r}; give a size for each of {MESH_AXES} "
        "(1 to leave an axis unused, -1 for all remaining devices).")
  sizes = []
  for axis in MESH_AXES:
    size = mesh_config[axis]
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1 and size != -1):
      raise MeshConfigError(
          f"config.mesh.{axis}={size!r} is not a valid size: use a positive integer or -1.")
    sizes.append(int(size))
  if sizes.count(-1) > 1:
    raise MeshConfigError(
        f"config.mesh has more than one axis set to -1 ({dict(zip(MESH_AXES, sizes))}); "
        "at most one axis may take all remaining devices.")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise MeshConfigError(
          f"config.mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes multiply to {fixed}, which "
          f"does not divide the {num_devices} devices. Choose sizes whose product divides "
          f"{num_devices}.")
    sizes[sizes.index(-1)] = num_devices // fixed
  elif fixed != num_devices:
    raise MeshConfigError(
        f"config.mesh {dict(zip(MESH_AXES, sizes))} multiplies to {fixed} devices but "
        f"{num_devices} are available. Make the sizes multiply to {num_devices}, or set one "
        "axis to -1 to take all remaining devices.")
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the `(data, fsdp, tensor)` mesh over all devices of all processes.

  Axes are `Auto` so that linen's logical constraints apply inside `jax.jit`.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_config, len(devices))
  try:
    # Topology-aware placement: on TPU pods and multi-host GPU it keeps the inner axes
    # (tensor, then fsdp) on the fastest links.
    device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (AssertionError, NotImplementedError, ValueError):
    device_array = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(device_array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_axis_rules(rules: Sequence[Sequence[Any]], mesh: Mesh | None = None) -> LogicalRules:
  """Validates the config's rule table and returns it in the form flax expects.

  Each rule is `(logical_name, mesh_axes)` where `mesh_axes` is a mesh axis name, a tuple of
  them, or None (replicated). Rules are ordered: for a given array, the first rule whose mesh
  axes are still free wins, so a logical name may be listed twice as a fallback.
  """
  valid = tuple(mesh.axis_names) if mesh is not None else MESH_AXES
  out = []
  for i, rule in enumerate(rules):
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise MeshConfigError(
          f"config.logical_axis_rules[{i}]={tuple(rule)!r} is not a (logical_name, mesh_axes) pair.")
    name, target = rule
    if isinstance(target, list):
      target = tuple(target)
    axes = () if target is None else (target,) if isinstance(target, str) else target
    for axis in axes:
      if axis not in valid:
        raise MeshConfigError(
            f"config.logical_axis_rules maps {name!r} to unknown mesh axis {axis!r}; "
            f"the mesh axes are {valid}.")
    out.append((name, target))
  return tuple(out)


def logical_names_in(tree: Any) -> set[str]:
  """All logical axis names used by the `nn.LogicallyPartitioned` leaves of `tree`."""
  names: set[str] = set()
  for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
    if isinstance(leaf, nn.LogicallyPartitioned):
      names.update(n for n in leaf.names if isinstance(n, str))
  return names


def check_logical_names(tree: Any, rules: LogicalRules) -> None:
  """Raises when a parameter uses a logical axis name that no rule mentions (likely a typo)."""
  known = {name for name, _ in rules}
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  for path, leaf in flat:
    if not isinstance(leaf, nn.LogicallyPartitioned):
      continue
    for name in leaf.names:
      if isinstance(name, str) and name not in known:
        raise MeshConfigError(
            f"Parameter {jax.tree_util.keystr(path)} uses logical axis {name!r}, which has no "
            f"rule in config.logical_axis_rules (known: {sorted(known)}). Add a rule for it "
            "(None to replicate) or fix the name in the model.")


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: LogicalRules) -> Any:
  """Maps a logically-annotated (abstract) pytree to a pytree of `NamedSharding`s.

  Leaves without annotations are replicated. The result has the structure of
  `nn.unbox(abstract_tree)`.
  """
  check_logical_names(abstract_tree, rules)
  is_boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)

  def leaf_sharding(leaf):
    spec = nn.logical_to_mesh_axes(leaf.names, rules) if is_boxed(leaf) else PartitionSpec()
    return NamedSharding(mesh, spec)

  # Leaf by leaf, so the result has exactly the structure of `nn.unbox(abstract_tree)`.
  return jax.tree.map(leaf_sharding, abstract_tree, is_leaf=is_boxed)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of a batch-major array: the leading axis over `data` and `fsdp`."""
  return NamedSharding(mesh, PartitionSpec(BATCH_MESH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways the batch is split (product of the `data` and `fsdp` axis sizes)."""
  return math.prod(mesh.shape[a] for a in BATCH_MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _env_requests_multiprocess() -> bool:
  """True when the environment describes a multi-process job that JAX can auto-detect."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
    return True
  # Cloud TPU pod slices list every worker host.
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  if hosts and len(hosts.split(",")) > 1:
    return True
  return bool(env.get("OMPI_COMM_WORLD_SIZE") and int(env["OMPI_COMM_WORLD_SIZE"]) > 1)


def maybe_initialize_distributed(distributed_config: Mapping[str, Any] | None) -> bool:
  """Starts `jax.distributed` when the config or the environment asks for several processes.

  Must run before anything touches a JAX backend. Explicit coordinator flags in
  `config.distributed` win; otherwise TPU pods, SLURM and Open MPI jobs are auto-detected.

  Returns:
    Whether `jax.distributed.initialize` was called.
  """
  cfg = dict(distributed_config or {})
  address = cfg.get("coordinator_address")
  if address:
    num_processes, process_id = cfg.get("num_processes"), cfg.get("process_id")
    if num_processes is None or process_id is None:
      raise MeshConfigError(
          "config.distributed.coordinator_address is set, so num_processes and process_id must "
          "be set too (or leave all three unset to auto-detect from the environment).")
    jax.distributed.initialize(
        coordinator_address=address, num_processes=int(num_processes), process_id=int(process_id))
  elif cfg.get("auto") or _env_requests_multiprocess():
    jax.distributed.initialize()
  else:
    return False
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True
