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


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Masked scaled dot-product attention with grouped-query heads.

  Query head `h` reads key/value head `h // (Hq // Hkv)` (HF's `repeat_kv` order). Logits and
  softmax are computed in float32. A query row whose mask is all False returns zeros.

  Args:
    q: [B, Lq, Hq, D] queries (RoPE already applied).
    k: [B, Lk, Hkv, D] keys (RoPE already applied).
    v: [B, Lk, Hkv, D] values.
    mask: [B, Lq, Lk] bool, True where query i may attend to key j.

  Returns:
    [B, Lq, Hq, D] in the dtype of `v`.
  """
  batch, q_len, num_q_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  if num_q_heads % num_kv_heads:
    raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} kv heads.")
  groups = num_q_heads // num_kv_heads
  q = q.reshape(batch, q_len, num_kv_heads, groups, head_dim)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", q.astype(jnp.float32), k.astype(jnp.float32))
  logits = logits * (head_dim ** -0.5)
  mask = mask[:, None, None, :, :]  # [B, 1, 1, Lq, Lk]
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  # Fully masked rows (left padding) would be uniform over masked keys; make them zero.
  probs = jnp.where(mask.any(axis=-1, keepdims=True), probs, 0.0)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v)
  return out.reshape(batch, q_len, num_q_heads, head_dim)
