"""Building blocks shared by the backbone and the action expert.

`EinsumDense` keeps the named axes of its kernel (e.g. q `[embed, heads, kv]`), so every
parameter carries logical axis names; `nn.DenseGeneral` would create a flattened 2-D kernel,
which a rank-3 logical constraint rejects under a mesh. Given a `LoraConfig` it adds a
low-rank adapter (`LowRankAdapter`, params `<projection>/lora/{a, b}`) whose factors carry the
kernel's input and output axis names, so the same sharding rules split them.

Also here: splitting, merging and folding adapters (`split_adapters`, `merge_trees`,
`merge_adapters`) and int8 weight-only kernels with per-output-channel scales
(`quantize_kernels`, `dequantize_kernels`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

INIT_STD = 0.02  # HF `initializer_range`.


def dense(features: int, axes: tuple[str | None, str | None], *, use_bias: bool = True,
          kernel_init: Any = nn.initializers.normal(stddev=INIT_STD), dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Dense:
  """`nn.Dense` whose kernel `[in, out]` and bias `[out]` carry the logical axis names `axes`."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


# ---------------------------------------------------------------------------------------------
# Low-rank adapters (LoRA).

ADAPTER = "lora"  # The adapter's module name inside a projection: `<projection>/lora/{a, b}`.


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters on the projections whose names match `targets`.

  A targeted projection `y = x W` becomes `y = x W + (alpha / rank) * dropout(x) A B`, with A
  `[in, rank]` initialised like a PyTorch linear layer (uniform, bound 1/sqrt(in)) and B
  `[rank, out]` zero, so an untrained adapter changes nothing.

  Attributes:
    rank: r; 0 turns adapters off.
    alpha: the adapter's output is scaled by alpha / rank.
    targets: fnmatch patterns over projection names: the short name (`q_proj`) or the name
      with its parent (`self_attn/q_proj`, `mlp/down_proj`).
    dropout: dropout on the adapter's input while training (a `dropout` rng is given).
    base_param_dtype: storage dtype of the frozen weights under the adapters.
  """
  rank: int = 0
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                              "down_proj")
  dropout: float = 0.0
  base_param_dtype: str = "bfloat16"

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(str(t) for t in self.targets))
    if self.rank < 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
      raise ValueError(f"model.lora: rank={self.rank} must be >= 0, alpha={self.alpha} > 0 and "
                       f"dropout={self.dropout} in [0, 1).")

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def targets_name(self, name: str) -> bool:
    """Whether the projection `name` (`parent/short`) gets an adapter."""
    short = name.rsplit("/", 1)[-1]
    return self.enabled and any(fnmatch.fnmatchcase(n, t) for t in self.targets
                                for n in (name, short))

  def check(self, projections: Mapping[str, tuple[int, int]], owner: str = "model.lora") -> None:
    """Raises naming the bad field: a target matching none of `projections` (name -> its
    matrix's (inputs, outputs)), or a rank above a targeted matrix's smaller side."""
    if not self.enabled:
      return
    for target in self.targets:
      if not any(LoraConfig(rank=1, targets=(target,)).targets_name(n) for n in projections):
        raise ValueError(f"{owner}.targets: {target!r} matches no projection; the projections "
                         f"are {sorted(projections)} (fnmatch patterns, e.g. '*_proj').")
    for name, (inputs, outputs) in projections.items():
      if self.targets_name(name) and self.rank > min(inputs, outputs):
        raise ValueError(f"{owner}.rank={self.rank} is larger than the smaller side of {name} "
                         f"({inputs} x {outputs}); use a rank <= {min(inputs, outputs)} or leave "
                         f"{name} out of {owner}.targets.")


def adapter_config(lora: LoraConfig | None, name: str) -> LoraConfig | None:
  """`lora` if it targets the projection `name` (`parent/short`), else None."""
  return lora if lora is not None and lora.targets_name(name) else None


def low_rank_equations(equation: str, contracted: int) -> tuple[str, str]:
  """The two einsums of an adapter on the projection `equation` (e.g. "ble,ehd->blhd"):
  input -> rank ("ble,er->blr") and rank -> output ("blr,rhd->blhd")."""
  inputs, out = equation.split("->")
  x_sub, kernel_sub = inputs.split(",")
  rank = next(c for c in "rzyxwvutsqponmkjigfca" if c not in equation)
  kept = "".join(c for c in x_sub if c not in kernel_sub[:contracted])
  return (f"{x_sub},{kernel_sub[:contracted]}{rank}->{kept}{rank}",
          f"{kept}{rank},{rank}{kernel_sub[contracted:]}->{out}")


class LowRankAdapter(nn.Module):
  """`(alpha / r) * dropout(x) A B` for a projection `einsum(equation, x, kernel)`.

  A `[*in, r]` carries the kernel's input axis names and B `[r, *out]` its output axis names
  (the rank axis is replicated), so the projection's sharding rules split the factors.
  """
  equation: str
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  contracted: int
  config: LoraConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, rank = self.contracted, self.config.rank
    # PyTorch's linear init (kaiming_uniform, a=sqrt(5)): uniform with bound 1/sqrt(fan_in).
    a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform",
                                              in_axis=tuple(range(c)), out_axis=-1)
    a = self.param("a", nn.with_logical_partitioning(a_init, (*self.kernel_axes[:c], None)),
                   (*self.kernel_shape[:c], rank), self.param_dtype)
    b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                     (None, *self.kernel_axes[c:])),
                   (rank, *self.kernel_shape[c:]), self.param_dtype)
    if self.config.dropout and self.has_rng("dropout"):
      x = nn.Dropout(self.config.dropout, deterministic=False)(x)
    down, up = low_rank_equations(self.equation, c)
    hidden = jnp.einsum(down, x.astype(self.dtype), a.astype(self.dtype))
    return jnp.einsum(up, hidden, b.astype(self.dtype)) * jnp.asarray(self.config.scale,
                                                                      self.dtype)


class EinsumDense(nn.Module):
  """A projection `einsum(equation, x, kernel) + bias` whose kernel keeps its named axes.

  The bias spans the kernel's output axes (those after the first `contracted` ones). With
  `lora` (a `LoraConfig` with rank > 0) a `LowRankAdapter` named `lora` adds its output.
  """
  equation: str
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  contracted: int = 1
  use_bias: bool = True
  kernel_init: Any = nn.initializers.normal(stddev=INIT_STD)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                        self.kernel_shape, self.param_dtype)
    y = jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param(
          "bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                               self.kernel_axes[self.contracted:]),
          self.kernel_shape[self.contracted:], self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.lora is not None and self.lora.enabled:
      y = y + LowRankAdapter(self.equation, self.kernel_shape, self.kernel_axes, self.contracted,
                             self.lora, self.dtype, self.param_dtype, name=ADAPTER)(x)
    return y


def split_adapters(tree: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """`tree` -> (the tree without adapters, the adapters alone in the same nesting)."""
  base, adapters = {}, {}
  for key, value in tree.items():
    if key == ADAPTER:
      adapters[key] = value
    elif isinstance(value, Mapping):
      base[key], sub = split_adapters(value)
      if sub:
        adapters[key] = sub
    else:
      base[key] = value
  return base, adapters


def merge_trees(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
  """The nested dicts `base` and `extra` as one (the inverse of `split_adapters`)."""
  out = dict(base)
  for key, value in extra.items():
    if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
      out[key] = merge_trees(out[key], value)
    else:
      out[key] = value
  return out


def merge_adapters(tree: Mapping[str, Any], scale: float, dtype: Dtype | None = None
                   ) -> dict[str, Any]:
  """Folds every adapter into its kernel: `kernel + scale * A B`, computed in float32 and
  stored in `dtype` (default the kernel's); the result has no adapters. Works on stacked
  (`[layers, ...]`) params."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping) and ADAPTER in value and "kernel" in value:
      kernel, a, b = value["kernel"], value[ADAPTER]["a"], value[ADAPTER]["b"]
      prefix = a.ndim + b.ndim - 2 - kernel.ndim  # leading stacked axes (layers)
      rank = a.shape[-1]
      delta = jnp.matmul(jnp.reshape(a, (*a.shape[:prefix], -1, rank)).astype(jnp.float32),
                         jnp.reshape(b, (*b.shape[:prefix], rank, -1)).astype(jnp.float32))
      merged = kernel.astype(jnp.float32) + scale * delta.reshape(kernel.shape)
      out[key] = {k: v for k, v in value.items() if k != ADAPTER}
      out[key]["kernel"] = merged.astype(dtype or kernel.dtype)
    elif isinstance(value, Mapping):
      out[key] = merge_adapters(value, scale, dtype)
    else:
      out[key] = value
  return out


# ---------------------------------------------------------------------------------------------
# Int8 weight-only kernels.

KERNEL_SCALE = "kernel_scale"


def _boxed(leaf: Any) -> tuple[Any, tuple | None]:
  if isinstance(leaf, nn.Partitioned):
    return leaf.value, leaf.names
  return leaf, None


def quantize_kernel(kernel: jax.Array, contracted_axes: tuple[int, ...]
                    ) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 with one float32 scale per output channel (every index of the axes not in
  `contracted_axes`): `kernel ~= q * scale`, |error| <= scale / 2 per weight.

  Returns:
    (q int8 of the kernel's shape, scale float32 with the contracted axes kept as size 1).
  """
  absmax = jnp.max(jnp.abs(kernel.astype(jnp.float32)), axis=contracted_axes, keepdims=True)
  scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
  q = jnp.clip(jnp.round(kernel.astype(jnp.float32) / scale), -127, 127).astype(jnp.int8)
  return q, scale


def quantize_kernels(tree: Mapping[str, Any], contracted: Mapping[str, int],
                     prefix: int = 1) -> dict[str, Any]:
  """Int8 weight-only copy of `tree`: the kernel of every projection named in `contracted`
  (projection name -> its number of input axes) becomes int8 plus a float32 `kernel_scale`;
  everything else is unchanged. `prefix` counts the kernels' leading stacked axes (`layers`).

  Leaves may be logically boxed (`nn.Partitioned`): the scale keeps the kernel's axis names,
  None on the contracted (size-1) axes.
  """
  out = {}
  for key, value in tree.items():
    if key in contracted and isinstance(value, Mapping) and "kernel" in value:
      kernel, names = _boxed(value["kernel"])
      axes = tuple(range(prefix, prefix + contracted[key]))
      q, scale = quantize_kernel(kernel, axes)
      out[key] = dict(value)
      if names is None:
        out[key].update(kernel=q, **{KERNEL_SCALE: scale})
      else:
        scale_names = tuple(None if i in axes else n for i, n in enumerate(names))
        out[key].update(kernel=value["kernel"].replace(value=q),
                        **{KERNEL_SCALE: value["kernel"].replace(value=scale, names=scale_names)})
    elif isinstance(value, Mapping):
      out[key] = quantize_kernels(value, contracted, prefix)
    else:
      out[key] = value
  return out


def dequantize_kernels(tree: Mapping[str, Any], dtype: Dtype) -> dict[str, Any]:
  """The inverse of `quantize_kernels`: every int8 kernel times its scale, in `dtype`."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping) and KERNEL_SCALE in value:
      out[key] = {k: v for k, v in value.items() if k != KERNEL_SCALE}
      out[key]["kernel"] = (value["kernel"].astype(jnp.float32)
                            * value[KERNEL_SCALE]).astype(dtype)
    elif isinstance(value, Mapping):
      out[key] = dequantize_kernels(value, dtype)
    else:
      out[key] = value
  return out


class RMSNorm(nn.Module):
  """RMSNorm computed in float32 (as HF does), cast back, then scaled in the compute dtype."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return normed.astype(self.dtype) * scale.astype(self.dtype)


def layer_norm(eps: float = 1e-6, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.LayerNorm:
  """`nn.LayerNorm` (scale and bias, two-pass variance as torch computes it) whose params carry
  the logical axis `norm`."""
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          implementation: str | None = None) -> jax.Array:
  """Masked scaled dot-product attention with grouped-query heads (`jax.nn.dot_product_attention`).

  Query head `h` reads key/value head `h // (Hq // Hkv)` (HF's `repeat_kv` order); K/V are never
  repeated (the XLA implementation groups the query heads instead). Logits and softmax are
  computed in float32 (bf16 inputs use bf16 x bf16 -> f32 matmuls). A query row whose mask is
  all False returns zeros.

  Args:
    q: [B, Lq, Hq, D] queries (RoPE already applied).
    k: [B, Lk, Hkv, D] keys (RoPE already applied).
    v: [B, Lk, Hkv, D] values.
    mask: [B, Lq, Lk] bool, True where query i may attend to key j.
    implementation: `jax.nn.dot_product_attention`'s: None (XLA in this jax), "xla", or "cudnn"
      (cuDNN flash attention on NVIDIA GPUs, bf16/fp16 only).

  Returns:
    [B, Lq, Hq, D] in the dtype of `v`.
  """
  num_q_heads, num_kv_heads = q.shape[2], k.shape[2]
  if num_q_heads % num_kv_heads:
    raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} kv heads.")
  dtype = v.dtype
  q, k = q.astype(dtype), k.astype(dtype)
  out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :],
                                     implementation=implementation)
  # Fully masked rows (left padding) would be uniform over the masked keys; make them zero.
  return out * mask.any(axis=-1)[:, :, None, None].astype(dtype)


# ---------------------------------------------------------------------------------------------
# Scanned layer stacks.
#
# A stack of identical layers is one `nn.scan` over a layer module whose parameters carry a
# leading `layers` axis: the step traces (and compiles) one layer instead of every layer. The
# unrolled layout names the layers `{prefix}{i}`; these two functions convert between them.

LAYERS_AXIS = "layers"


# Gradient checkpointing of each layer / block: what the backward pass may keep.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


def check_remat_policy(policy: str, owner: str = "remat_policy") -> None:
  """Raises a clear error naming `owner` (the config field) unless `policy` is a known name."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f"{owner}={policy!r} is not a remat policy; choose one of "
                     f"{sorted(REMAT_POLICIES)}.")


def remat(layer_cls: type[nn.Module], policy: str, **kwargs: Any) -> type[nn.Module]:
  """`layer_cls` recomputed in the backward pass, keeping what the named `policy` allows
  (`REMAT_POLICIES`); unchanged for `"none"`. `kwargs` go to `nn.remat`."""
  check_remat_policy(policy)
  if policy == "none":
    return layer_cls
  return nn.remat(layer_cls, policy=REMAT_POLICIES[policy], **kwargs)


def scan_layers(layer_cls: type[nn.Module], length: int, in_axes: Any,
                remat_policy: str = "none", static_argnums: tuple[int, ...] = ()
                ) -> type[nn.Module]:
  """`layer_cls` scanned `length` times, its params stacked on a leading `layers` axis.

  `layer_cls.__call__(carry, *args)` must return `(carry, per-layer output)`; `in_axes` says
  per argument after the carry whether it is scanned (0) or shared (`nn.broadcast`). Each layer
  is recomputed in the backward pass as the named `remat_policy` says (`REMAT_POLICIES`).
  """
  # No CSE barrier inside a scan: the loop already keeps the recomputation apart.
  layer_cls = remat(layer_cls, remat_policy, prevent_cse=False, static_argnums=static_argnums)
  return nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True,
                                                                     "dropout": True},
                 in_axes=in_axes, length=length,
                 metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})


def stack_layer_params(tree: Any, prefix: str, name: str) -> Any:
  """Unrolled params `{..., f"{prefix}{i}": layer_i}` -> `{..., name: stacked}` (one level).

  The layers must be numbered 0..n-1 with equal structures; leaves stack on a new axis 0.
  """
  tree = dict(tree)
  count = 0
  while f"{prefix}{count}" in tree:
    count += 1
  if not count:
    raise KeyError(f"stack_layer_params: no {prefix}0 among {sorted(tree)}.")
  layers = [tree.pop(f"{prefix}{i}") for i in range(count)]
  tree[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return tree


def unstack_layer_params(tree: Any, name: str, prefix: str) -> Any:
  """The inverse of `stack_layer_params`: `{name: stacked}` -> `{f"{prefix}{i}": layer_i}`."""
  tree = dict(tree)
  stacked = tree.pop(name)
  count = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(count):
    tree[f"{prefix}{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return tree


def add_layer_addition(hidden: jax.Array, additions: jax.Array | None,
                       layer_index: int | jax.Array) -> jax.Array:
  """`hidden + additions[i]` after layer `i < K`, `hidden` after the others.

  The per-layer additions are Qwen3-VL's DeepStack maps. `layer_index` is a Python int
  (unrolled layers) or a traced `[]` int (scanned layers: the maps stay one broadcast operand and
  the step picks map `min(i, K - 1)`, masked out from layer K on).

  Args:
    hidden: [B, L, E] the residual stream leaving layer `i`.
    additions: [K, B, L, E] (zero away from the positions they feed), or None.
    layer_index: the layer's index `i`.
  """
  if additions is None or additions.shape[0] == 0:
    return hidden
  count = additions.shape[0]
  if isinstance(layer_index, int):
    return hidden + additions[layer_index].astype(hidden.dtype) if layer_index < count else hidden
  picked = jax.lax.dynamic_index_in_dim(additions, jnp.minimum(layer_index, count - 1),
                                        keepdims=False)
  return hidden + jnp.where(layer_index < count, picked, 0).astype(hidden.dtype)
