"""Building blocks shared by the backbone and the action expert.

`EinsumDense` keeps the named axes of its kernel (e.g. q `[embed, heads, kv]`), so every
parameter carries logical axis names; `nn.DenseGeneral` would create a flattened 2-D kernel,
which a rank-3 logical constraint rejects under a mesh.
"""

from __future__ import annotations

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


class EinsumDense(nn.Module):
  """A projection `einsum(equation, x, kernel) + bias` whose kernel keeps its named axes.

  The bias spans the kernel's output axes (those after the first `contracted` ones).
  """
  equation: str
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  contracted: int = 1
  use_bias: bool = True
  kernel_init: Any = nn.initializers.normal(stddev=INIT_STD)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

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
    return y


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
