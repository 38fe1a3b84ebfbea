"""AsyMoT: the asymmetric mixture-of-transformers joining the frozen left and trainable right brain.

At every layer i the right brain's queries attend to
`concat(stop_gradient(K_left_i), K_right_i)` (and the same for V); the left brain attends to
itself only. Each stream keeps its own norms, projections, MLP and RoPE positions, so a layer is
the two backbones' `DecoderLayer.qkv` halves, one joint attention, and their `out` halves.

Mask modes (what a right query may see of the left stream; each stream is causal over its own
valid tokens):
  - `all_left`     every valid left token (the clean semantics, default);
  - `index_causal` left tokens j <= i for right query i (the public code's index alignment);
  - `full_joint`   ablation: every valid token of the other stream, in both directions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from twinbrain_jax.models.layers import (REMAT_POLICIES, add_layer_addition, check_remat_policy,
                                         dequantize_kernels)
from twinbrain_jax.models.qwen25vl import (DecoderLayer, causal_padding_mask,
                                           dot_product_attention)

MASK_MODES = ("all_left", "index_causal", "full_joint")


@struct.dataclass
class JointMasks:
  """Attention masks of one AsyMoT forward.

  Attributes:
    left: [B, Ll, Ll] left queries over left keys, or [B, Ll, Ll + Lr] over (left, right) keys
      in `full_joint` mode.
    right: [B, Lr, Ll + Lr] right queries over (left, right) keys.
  """
  left: jax.Array
  right: jax.Array


def joint_masks(left_valid: jax.Array, right_valid: jax.Array, mode: str = "all_left"
                ) -> JointMasks:
  """Builds the masks of both streams.

  Args:
    left_valid: [B, Ll] 1/True for left tokens, 0 for padding.
    right_valid: [B, Lr] 1/True for right tokens, 0 for padding.
    mode: one of `MASK_MODES`.
  """
  if mode not in MASK_MODES:
    raise ValueError(f"Unknown AsyMoT mask mode {mode!r}; choose one of {MASK_MODES}.")
  left_valid, right_valid = left_valid.astype(bool), right_valid.astype(bool)
  left_len, right_len = left_valid.shape[1], right_valid.shape[1]
  left_self = causal_padding_mask(left_valid)  # [B, Ll, Ll]
  right_self = causal_padding_mask(right_valid)  # [B, Lr, Lr]
  # Padding queries see nothing; their outputs are zeros and never read.
  right_to_left = right_valid[:, :, None] & left_valid[:, None, :]  # [B, Lr, Ll]
  if mode == "index_causal":
    right_to_left &= jnp.tril(jnp.ones((right_len, left_len), bool))[None]
  left = left_self
  if mode == "full_joint":
    left_to_right = left_valid[:, :, None] & right_valid[:, None, :]  # [B, Ll, Lr]
    left = jnp.concatenate([left_self, left_to_right], axis=-1)
  return JointMasks(left=left, right=jnp.concatenate([right_to_left, right_self], axis=-1))


def joint_attention(q: jax.Array, k_other: jax.Array, v_other: jax.Array, k_own: jax.Array,
                    v_own: jax.Array, mask: jax.Array) -> jax.Array:
  """Queries attend to the other stream's stop-gradient K/V followed by their own.

  Args:
    q: [B, Lq, Hq, D] queries of this stream.
    k_other, v_other: [B, Lo, Hkv, D] keys/values of the other stream (no gradient flows back).
    k_own, v_own: [B, Lq, Hkv, D] keys/values of this stream.
    mask: [B, Lq, Lo + Lq] over the concatenated keys.

  Returns:
    [B, Lq, Hq, D].
  """
  k = jnp.concatenate([jax.lax.stop_gradient(k_other).astype(k_own.dtype), k_own], axis=1)
  v = jnp.concatenate([jax.lax.stop_gradient(v_other).astype(v_own.dtype), v_own], axis=1)
  return dot_product_attention(q, k, v, mask)


def asymot_layer(left: DecoderLayer, right: DecoderLayer, hidden_left: jax.Array,
                 hidden_right: jax.Array, rope_left: tuple[jax.Array, jax.Array],
                 rope_right: tuple[jax.Array, jax.Array], masks: JointMasks
                 ) -> tuple[jax.Array, jax.Array]:
  """One AsyMoT layer.

  Args:
    left, right: the i-th decoder layers of the two brains (bound modules).
    hidden_left: [B, Ll, E]; hidden_right: [B, Lr, E].
    rope_left, rope_right: (cos, sin) [B, L, D] of each stream's own M-RoPE positions.
    masks: from `joint_masks`.

  Returns:
    The two residual streams leaving the layer.
  """
  q_left, k_left, v_left = left.qkv(hidden_left, *rope_left)
  q_right, k_right, v_right = right.qkv(hidden_right, *rope_right)
  if masks.left.shape[-1] == k_left.shape[1]:
    attn_left = dot_product_attention(q_left, k_left, v_left, masks.left)
  else:  # full_joint: the left stream also reads the right one.
    attn_left = joint_attention(q_left, k_right, v_right, k_left, v_left,
                                _own_first_to_other_first(masks.left, k_left.shape[1]))
  attn_right = joint_attention(q_right, k_left, v_left, k_right, v_right, masks.right)
  return left.out(hidden_left, attn_left), right.out(hidden_right, attn_right)


def _own_first_to_other_first(mask: jax.Array, own_len: int) -> jax.Array:
  """Reorders a [.., own + other] mask to [.., other + own], the key order of `joint_attention`."""
  return jnp.concatenate([mask[..., own_len:], mask[..., :own_len]], axis=-1)


def asymot_forward(left_layers: Sequence[DecoderLayer], right_layers: Sequence[DecoderLayer],
                   hidden_left: jax.Array, hidden_right: jax.Array,
                   rope_left: tuple[jax.Array, jax.Array], rope_right: tuple[jax.Array, jax.Array],
                   masks: JointMasks, additions_left: jax.Array | None = None,
                   additions_right: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Runs all layers of both brains jointly; returns the streams before the final norms.

  `additions_left` [K, B, Ll, E] / `additions_right` [K, B, Lr, E] (Qwen3-VL's DeepStack maps
  of each brain's own vision tower, or None) are added to that brain's stream after layers
  0 .. K-1, as its `TextModel` does when run alone.
  """
  if len(left_layers) != len(right_layers):
    raise ValueError(f"AsyMoT needs brains of equal depth: left has {len(left_layers)} layers, "
                     f"right has {len(right_layers)}.")
  for i, (left, right) in enumerate(zip(left_layers, right_layers)):
    hidden_left, hidden_right = asymot_layer(left, right, hidden_left, hidden_right, rope_left,
                                             rope_right, masks)
    hidden_left = add_layer_addition(hidden_left, additions_left, i)
    hidden_right = add_layer_addition(hidden_right, additions_right, i)
  return hidden_left, hidden_right


def asymot_scan(left: DecoderLayer, right: DecoderLayer, left_params: Any, right_params: Any,
                hidden_left: jax.Array, hidden_right: jax.Array,
                rope_left: tuple[jax.Array, jax.Array], rope_right: tuple[jax.Array, jax.Array],
                masks: JointMasks, remat_policy: str = "none",
                additions_left: jax.Array | None = None, additions_right: jax.Array | None = None,
                dropout_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """All layers of both brains as one `lax.scan`: step i reads layer i of both stacks.

  Args:
    left, right: unbound `DecoderLayer`s of each brain's sizes and dtypes.
    left_params, right_params: each brain's decoder params stacked on a leading `layers` axis
      (the left one may be stored in another dtype, e.g. bf16, or hold int8 kernels with their
      `kernel_scale`s: step i dequantizes layer i only, so the whole stack never exists in
      floating point).
    hidden_left, hidden_right, rope_left, rope_right, masks: as `asymot_forward`.
    remat_policy: recompute each joint layer in the backward pass (`jax.checkpoint`), keeping
      what the named policy allows (`layers.REMAT_POLICIES`).
    additions_left, additions_right: as `asymot_forward`; broadcast to every step, step i adds
      map i of each brain's own stream while i < K (the scanned layer index picks it).
    dropout_rng: the right layers' `dropout` rng (layer i draws from `fold_in(rng, i)`), or None
      for no dropout.

  Returns:
    The streams before the final norms.
  """
  depth = {jax.tree.leaves(p)[0].shape[0] for p in (left_params, right_params)}
  if len(depth) != 1:
    raise ValueError(f"AsyMoT needs brains of equal depth; the stacks have {sorted(depth)} layers.")
  (num_layers,) = depth

  def step(carry, xs):
    left_params_i, right_params_i, index = xs
    left_params_i = dequantize_kernels(left_params_i, left.param_dtype)  # int8 kernels, if any
    left_i = left.bind({"params": left_params_i})
    rngs = None if dropout_rng is None else {"dropout": jax.random.fold_in(dropout_rng, index)}
    right_i = right.bind({"params": right_params_i}, rngs=rngs)
    hidden_left, hidden_right = asymot_layer(left_i, right_i, *carry, rope_left, rope_right, masks)
    return (add_layer_addition(hidden_left, additions_left, index),
            add_layer_addition(hidden_right, additions_right, index)), None

  check_remat_policy(remat_policy)
  if remat_policy != "none":
    step = jax.checkpoint(step, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
  carry, _ = jax.lax.scan(step, (hidden_left, hidden_right),
                          (left_params, right_params, jnp.arange(num_layers)))
  return carry
