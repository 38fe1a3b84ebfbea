"""Qwen3-VL vision tower (ViT with learned + rotary positions, a 2x2 merger, DeepStack) in linen.

Reads top to bottom as the architecture: patch embedding (the Conv3d, with bias, as a Dense over
each flattened `(C, T, p, p)` patch) plus a learned position table of `num_position_embeddings`
(a square grid) bilinearly resampled to each image's patch grid (`position_interpolation`, HF's
`align_corners=True` taps and weights), 2-D rotary embedding over (row, column) patch positions
(shared with Qwen2.5-VL), blocks of LayerNorm -> attention over the whole frame -> LayerNorm ->
GELU MLP (no windows, no gating), then the merger (LayerNorm, concatenate each `merge x merge`
group, Linear, GELU, Linear). DeepStack: the outputs of the blocks in
`deepstack_visual_indexes` each go through their own merger, whose LayerNorm acts after the
concatenation; the decoder adds them to its hidden states at the image tokens
(`qwen3vl.TextModel`). `vision_params_from_hf` at the end fills the tower from a Hugging Face
checkpoint.

Packing, patch order, attention segments and the attention module (qkv with bias, 2-D RoPE,
output projection) are those of `qwen25vl_vision`, with one segment per frame (no windows). Parameter names mirror HF's
(`patch_embed`, `pos_embed`, `blocks/{norm1, attn/{qkv, proj}, norm2, mlp/{linear_fc1,
linear_fc2}}`, `merger`, `deepstack_merger_list_{k}`) with the same logical axes as the
Qwen2.5-VL tower; the position table is `[None, embed]`. With `scan_layers` (the default) the
blocks are one `nn.scan` whose params are stacked on a leading `layers` axis (`blocks/...`);
unrolled they are `blocks_{i}`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from twinbrain_jax.models.layers import dense, layer_norm, remat, scan_layers
from twinbrain_jax.models.qwen25vl_vision import (AttentionSegments, VisionAttention,
                                                  VisionSizes, attention_params_from_hf,
                                                  check_packed_patches, checked_getter,
                                                  image_attention_segments, rotary_cos_sin,
                                                  stacked_blocks, vision_positions)

Dtype = Any

# Defaults of HF's `Qwen3VLVisionConfig` for keys a `config.json` may leave out.
_HF_VISION_DEFAULTS = dict(
    depth=27, hidden_size=1152, hidden_act="gelu_pytorch_tanh", intermediate_size=4304,
    num_heads=16, in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
    out_hidden_size=3584, num_position_embeddings=2304, deepstack_visual_indexes=(8, 16, 24))

# HF activation names -> whether linen's GELU uses the tanh approximation.
_GELU_APPROXIMATE = {"gelu_pytorch_tanh": True, "gelu": False}

LAYER_NORM_EPS = 1e-6  # Fixed in HF's Qwen3-VL vision blocks and mergers.


@dataclasses.dataclass(frozen=True)
class VisionConfig(VisionSizes):
  """Sizes of the Qwen3-VL vision tower; field names follow the HF `vision_config`."""
  depth: int
  hidden_size: int
  num_heads: int
  intermediate_size: int
  out_hidden_size: int
  deepstack_visual_indexes: tuple[int, ...]
  num_position_embeddings: int = 2304
  patch_size: int = 16
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  in_channels: int = 3
  hidden_act: str = "gelu_pytorch_tanh"
  rope_theta: float = 10000.0

  def __post_init__(self):
    object.__setattr__(self, "deepstack_visual_indexes",
                       tuple(int(i) for i in self.deepstack_visual_indexes))
    self.check_heads()
    side = math.isqrt(self.num_position_embeddings)
    if side * side != self.num_position_embeddings or side < 2:
      raise ValueError(f"vision num_position_embeddings={self.num_position_embeddings} must be a "
                       "square of at least 4 (the learned positions form a square grid).")
    bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"vision deepstack_visual_indexes {bad} lie outside "
                       f"[0, depth={self.depth}).")
    if self.hidden_act not in _GELU_APPROXIMATE:
      raise ValueError(f"vision hidden_act={self.hidden_act!r} is not supported; choose one of "
                       f"{sorted(_GELU_APPROXIMATE)}.")

  @property
  def num_grid_per_side(self) -> int:
    """Side of the learned position grid."""
    return math.isqrt(self.num_position_embeddings)

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> VisionConfig:
    """From the `vision_config` dict of a HF Qwen3-VL `config.json`."""
    d = dict(d)
    v = {k: d.get(k, default) for k, default in _HF_VISION_DEFAULTS.items()}
    rope = d.get("rope_parameters") or {}
    v["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    return cls(**v)


# ----------------------------------------------------------------------------------------------
# Learned positions: pure numpy on the static grid.


def _axis_taps(index: np.ndarray, size: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
  """Bilinear (`align_corners=True`) taps `[N, 2]` into a `side`-long axis and their fp32
  weights, for target positions `index` on axes of length `size` (HF's float32 arithmetic)."""
  index = index.astype(np.float32)
  src = index * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
  floor = np.floor(src)
  offsets = np.arange(2)
  taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
  distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
  return taps, np.maximum(np.float32(1) - distance, np.float32(0))


def position_interpolation(grid_thw: np.ndarray, num_grid_per_side: int,
                           spatial_merge_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Rows of the learned position table and their weights for each packed patch.

  The square table of side `S` is resampled to each image's `(h, w)` patch grid as
  `F.interpolate(mode="bilinear", align_corners=True)` would; patches are merge-block-major and
  every frame of an image gets the same positions.

  Returns:
    `indices` int32 `[N, 4]` into the flattened `[S * S]` table, `weights` float32 `[N, 4]`.
  """
  indices, weights = [], []
  side = num_grid_per_side
  for t, h, w in grid_thw.tolist():
    rows, cols = vision_positions(np.array([[1, h, w]]), spatial_merge_size).T
    row_taps, row_weights = _axis_taps(rows, np.full_like(rows, h), side)
    col_taps, col_weights = _axis_taps(cols, np.full_like(cols, w), side)
    idx = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
    wts = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)
    indices.append(np.tile(idx, (t, 1)))
    weights.append(np.tile(wts, (t, 1)))
  return (np.concatenate(indices).astype(np.int32),
          np.concatenate(weights).astype(np.float32))


# ----------------------------------------------------------------------------------------------
# Modules.


class VisionMLP(nn.Module):
  """linear_fc2(gelu(linear_fc1(x))), with biases."""
  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hidden = dense(c.intermediate_size, ("embed", "mlp"), name="linear_fc1", **kw)(x)
    hidden = nn.gelu(hidden, approximate=_GELU_APPROXIMATE[c.hidden_act])
    hidden = nn.with_logical_constraint(hidden, ("batch", "mlp"))
    return dense(c.hidden_size, ("mlp", "embed"), name="linear_fc2", **kw)(hidden)


def write_deepstack(deepstack: jax.Array, x: jax.Array, slot: int | jax.Array) -> jax.Array:
  """`deepstack [K, N, E]` with `x [N, E]` written at `slot` when `slot >= 0` (else unchanged).

  `slot` is a Python int (unrolled blocks) or a traced `[]` int (scanned blocks: one dynamic
  update per block, writing back the kept map where the block feeds no DeepStack merger).
  """
  if deepstack.shape[0] == 0:
    return deepstack
  x = x.astype(deepstack.dtype)
  if isinstance(slot, (int, np.integer)):
    return deepstack.at[int(slot)].set(x) if slot >= 0 else deepstack
  index = jnp.maximum(slot, 0)
  kept = jax.lax.dynamic_index_in_dim(deepstack, index, keepdims=False)
  return jax.lax.dynamic_update_index_in_dim(deepstack, jnp.where(slot >= 0, x, kept), index, 0)


class VisionBlock(nn.Module):
  """LayerNorm -> attention over the frame -> LayerNorm -> MLP, with residuals; the block's
  output is also kept in the DeepStack maps when the block feeds one.

  In the scan form `((x, deepstack), slot, ...) -> ((x, deepstack), None)`.
  """
  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, carry: tuple[jax.Array, jax.Array], deepstack_slot: int | jax.Array,
               cos: jax.Array, sin: jax.Array, frames: AttentionSegments):
    """carry (x `[N, E]`, deepstack `[K, N, E]`) -> (the new carry, None).

    `deepstack_slot` is `k` when this block is `deepstack_visual_indexes[k]`, else -1.
    """
    x, deepstack = carry
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x + VisionAttention(self.config, **kw, name="attn")(
        layer_norm(LAYER_NORM_EPS, **kw, name="norm1")(x), cos, sin, frames, frames, True)
    x = x + VisionMLP(self.config, **kw, name="mlp")(
        layer_norm(LAYER_NORM_EPS, **kw, name="norm2")(x))
    x = nn.with_logical_constraint(x, ("batch", "embed"))
    deepstack = nn.with_logical_constraint(write_deepstack(deepstack, x, deepstack_slot),
                                           (None, "batch", "embed"))
    return (x, deepstack), None


class PatchMerger(nn.Module):
  """LayerNorm, concatenate each merge group of patches, Linear, GELU (erf), Linear.

  Attributes:
    norm_after_merge: normalise the concatenated `merge**2 * E` vector (DeepStack mergers)
      instead of each patch (the final merger).
  """
  config: VisionConfig
  norm_after_merge: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x `[N, E]` -> `[N // merge**2, out_hidden_size]`."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    merged_dim = c.hidden_size * c.spatial_merge_size**2
    norm = layer_norm(LAYER_NORM_EPS, **kw, name="norm")
    if self.norm_after_merge:
      x = norm(x.reshape(-1, merged_dim))
    else:
      x = norm(x).reshape(-1, merged_dim)
    x = dense(merged_dim, ("embed", "mlp"), name="linear_fc1", **kw)(x)
    x = nn.with_logical_constraint(nn.gelu(x, approximate=False), ("batch", "mlp"))
    return dense(c.out_hidden_size, ("mlp", "embed"), name="linear_fc2", **kw)(x)


class VisionTower(nn.Module):
  """Qwen3-VL vision encoder: flattened patches of several images -> merged tokens + DeepStack.

  Attributes:
    remat_policy: recompute each block in the backward pass, keeping what the named policy
      allows (`layers.REMAT_POLICIES`: none, dots, full).
    scan_layers: the blocks are one `nn.scan` with params stacked on a leading `layers` axis
      (`blocks/...`, `[depth, ...]`); the outputs of the DeepStack blocks are collected in the
      scan's carry (`[K, N, E]`) and go through their mergers after it. Otherwise `blocks_{i}`.
  """
  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = True

  @nn.compact
  def __call__(self, pixel_values: jax.Array, grid_thw: np.ndarray
               ) -> tuple[jax.Array, jax.Array]:
    """Encodes packed image patches.

    Args:
      pixel_values: `[N, C * T * p * p]` float, the patches of all images concatenated
        (`image_processor.preprocess_images(..., **processor_settings("qwen3vl"))`).
      grid_thw: `[n_images, 3]` int (t, h, w) patch grid per image; a static host array.

    Returns:
      `features [N // merge**2, out_hidden_size]`, merged tokens image by image in input order,
      and `deepstack [K, N // merge**2, out_hidden_size]`, one merged map per entry of
      `deepstack_visual_indexes` in block order (map k is added after decoder layer k; K may
      be 0).
    """
    c = self.config
    grid = check_packed_patches(pixel_values, grid_thw, c)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    frames = AttentionSegments(*map(jnp.asarray,
                                    image_attention_segments(grid, c.spatial_merge_size, None)))
    cos, sin = rotary_cos_sin(jnp.asarray(vision_positions(grid, c.spatial_merge_size)),
                              c.head_dim, c.rope_theta)

    x = dense(c.hidden_size, ("patch", "embed"), name="patch_embed", **kw)(
        pixel_values.astype(self.dtype))
    table = nn.Embed(c.num_position_embeddings, c.hidden_size, name="pos_embed",
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(0.02), (None, "embed")), **kw)
    indices, weights = position_interpolation(grid, c.num_grid_per_side, c.spatial_merge_size)
    positions = (table(jnp.asarray(indices)) * jnp.asarray(weights)[:, :, None]).sum(axis=1)
    x = nn.with_logical_constraint(x + positions.astype(x.dtype), ("batch", "embed"))

    # Block i writes its output to DeepStack slot k when it is deepstack_visual_indexes[k].
    slots = np.full(c.depth, -1, np.int32)
    slots[list(c.deepstack_visual_indexes)] = np.arange(len(c.deepstack_visual_indexes))
    carry = (x, jnp.zeros((len(c.deepstack_visual_indexes), *x.shape), x.dtype))
    if self.scan_layers:
      # Scanned: the DeepStack slot; shared: rotary tables and the per-frame segments.
      stack = scan_layers(VisionBlock, c.depth, (0,) + (nn.broadcast,) * 3, self.remat_policy)
      carry, _ = stack(c, **kw, name="blocks")(carry, jnp.asarray(slots), cos, sin, frames)
    else:
      block = remat(VisionBlock, self.remat_policy, static_argnums=(2,))
      for i in range(c.depth):
        carry, _ = block(c, **kw, name=f"blocks_{i}")(carry, int(slots[i]), cos, sin, frames)
    x, deepstack = carry
    features = PatchMerger(c, **kw, name="merger")(x)
    # In block order, as HF collects them: map k feeds decoder layer k.
    maps = [PatchMerger(c, norm_after_merge=True, **kw, name=f"deepstack_merger_list_{k}")(
        deepstack[k]) for k in range(deepstack.shape[0])]
    if not maps:
      return features, jnp.zeros((0, *features.shape), features.dtype)
    return features, jnp.stack(maps)


# ----------------------------------------------------------------------------------------------
# Loading from a Hugging Face checkpoint.


def hf_vision_weight_shapes(config: VisionConfig) -> dict[str, tuple[int, ...]]:
  """Every HF vision tensor name (relative to `visual.`) with its torch-layout shape."""
  c = config
  e, f, merged = c.hidden_size, c.intermediate_size, c.hidden_size * c.spatial_merge_size**2
  shapes = {
      "patch_embed.proj.weight": (e, c.in_channels, c.temporal_patch_size, c.patch_size,
                                  c.patch_size),
      "patch_embed.proj.bias": (e,),
      "pos_embed.weight": (c.num_position_embeddings, e),
  }
  for i in range(c.depth):
    p = f"blocks.{i}."
    shapes.update({
        p + "norm1.weight": (e,), p + "norm1.bias": (e,),
        p + "norm2.weight": (e,), p + "norm2.bias": (e,),
        p + "attn.qkv.weight": (3 * e, e), p + "attn.qkv.bias": (3 * e,),
        p + "attn.proj.weight": (e, e), p + "attn.proj.bias": (e,),
        p + "mlp.linear_fc1.weight": (f, e), p + "mlp.linear_fc1.bias": (f,),
        p + "mlp.linear_fc2.weight": (e, f), p + "mlp.linear_fc2.bias": (e,),
    })

  def merger(prefix, norm_dim):
    shapes.update({
        prefix + "norm.weight": (norm_dim,), prefix + "norm.bias": (norm_dim,),
        prefix + "linear_fc1.weight": (merged, merged), prefix + "linear_fc1.bias": (merged,),
        prefix + "linear_fc2.weight": (c.out_hidden_size, merged),
        prefix + "linear_fc2.bias": (c.out_hidden_size,),
    })

  merger("merger.", e)
  for k in range(len(c.deepstack_visual_indexes)):
    merger(f"deepstack_merger_list.{k}.", merged)
  return shapes


def vision_params_from_hf(get: Callable[[str], np.ndarray], config: VisionConfig,
                          scan_layers: bool = True) -> dict:
  """The Qwen3-VL `VisionTower` param tree (unboxed) from HF tensors; arguments, the
  `scan_layers` layout and errors as `qwen25vl_vision.vision_params_from_hf`."""
  c = config
  e = c.hidden_size
  load = checked_getter(get, hf_vision_weight_shapes(c))

  def linear(prefix):
    return {"kernel": load(prefix + ".weight").T, "bias": load(prefix + ".bias")}

  def norm(prefix):
    return {"scale": load(prefix + ".weight"), "bias": load(prefix + ".bias")}

  def merger(prefix):
    return {"norm": norm(prefix + "norm"), "linear_fc1": linear(prefix + "linear_fc1"),
            "linear_fc2": linear(prefix + "linear_fc2")}

  params = {
      "patch_embed": {"kernel": load("patch_embed.proj.weight").reshape(e, -1).T,
                      "bias": load("patch_embed.proj.bias")},
      "pos_embed": {"embedding": load("pos_embed.weight")},
  }
  for i in range(c.depth):
    p = f"blocks.{i}."
    params[f"blocks_{i}"] = {
        "norm1": norm(p + "norm1"), "norm2": norm(p + "norm2"),
        "attn": attention_params_from_hf(load, p + "attn.", c),
        "mlp": {name: linear(p + "mlp." + name) for name in ("linear_fc1", "linear_fc2")},
    }
  params["merger"] = merger("merger.")
  for k in range(len(c.deepstack_visual_indexes)):
    params[f"deepstack_merger_list_{k}"] = merger(f"deepstack_merger_list.{k}.")
  return stacked_blocks(params, c.depth) if scan_layers else params
