"""Qwen2.5-VL vision tower (ViT with windowed attention and a 2x2 patch merger) in linen.

Reads top to bottom as the architecture: patch embedding (the Conv3d as a Dense over each
flattened `(C, T, p, p)` patch), 2-D rotary embedding over (row, column) patch positions, blocks
of RMSNorm -> attention -> RMSNorm -> SwiGLU, where most blocks attend within windows of
`window_size` pixels and the blocks in `fullatt_block_indexes` attend over a whole frame, then
the merger (RMSNorm, concatenate each `merge x merge` group of patches, Linear, GELU, Linear to
the language model's width). `vision_params_from_hf` at the end fills the tower from a Hugging
Face checkpoint.

Images of different sizes are packed along one token axis, `[N, ...]`, in the order of
`grid_thw`; each image's patches come merge-block-major (the image processor's order), so the
patches of one merged token are consecutive. Which tokens may attend to which is fixed by
`grid_thw` alone, so it is planned in numpy at trace time (`attention_segments`): tokens are
gathered into padded segments `[S, L_max]` (one per frame, or one per window), attend there
under a key-length mask, and are scattered back. The reference instead permutes tokens into
window order and back; attention and everything per-token commute with that permutation, so the
outputs agree up to float summation order, and the merged tokens come out in image order.

Parameter layout (the same scheme as the language model): projection kernels keep the head
axes, `DenseGeneral` style: `qkv` kernel `[embed, 3, heads, kv]`, `proj` kernel
`[heads, kv, embed]`; MLP kernels `[embed, mlp]` / `[mlp, embed]`; norms `[norm]`; the patch
embedding `[patch, embed]`. The packed token axis `N` (and the segment axis `S`) is sharded like
a batch axis: vision work splits over the data-parallel devices.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from twinbrain_jax.models.layers import EinsumDense, RMSNorm, dense, remat, scan_layers

Dtype = Any

# Defaults of HF's `Qwen2_5_VLVisionConfig` for keys a `config.json` may leave out.
_HF_VISION_DEFAULTS = dict(
    depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420, num_heads=16,
    in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
    out_hidden_size=3584, fullatt_block_indexes=(7, 15, 23, 31))


class VisionSizes:
  """What the Qwen2.5-VL and Qwen3-VL vision configs share (a mixin of their dataclasses, which
  hold `hidden_size`, `num_heads`, `in_channels`, `temporal_patch_size`, `patch_size`)."""

  def check_heads(self) -> None:
    """Raises ValueError unless the heads split the width and suit the 2-D rotary embedding."""
    if self.hidden_size % self.num_heads:
      raise ValueError(f"vision hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}.")
    if self.head_dim % 4:
      raise ValueError(f"vision head_dim={self.head_dim} must be a multiple of 4 for the 2-D "
                       "rotary embedding (a quarter of it per axis, cos and sin halves).")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened input patch, `C * T * p * p`."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @classmethod
  def from_config_dict(cls, cd: Mapping[str, Any]):
    """From `config.model.backbone.vision` (a ConfigDict or dict with this class's fields)."""
    cd = dict(cd)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cd) - names)
    if unknown:
      raise ValueError(f"Unknown vision config field(s) {unknown} for {cls.__module__}."
                       f"{cls.__name__}; known: {sorted(names)}.")
    return cls(**cd)


def check_packed_patches(pixel_values: jax.Array, grid_thw: Any, config: VisionSizes
                         ) -> np.ndarray:
  """The validated `grid_thw` (`check_grid_thw`); raises ValueError unless `pixel_values` is
  `[N, C*T*p*p]` with N the grids' total patch count."""
  grid = check_grid_thw(grid_thw, config.spatial_merge_size)
  num_tokens = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
  if pixel_values.ndim != 2 or pixel_values.shape != (num_tokens, config.patch_dim):
    raise ValueError(
        f"pixel_values has shape {tuple(pixel_values.shape)} but grid_thw {grid.tolist()} "
        f"with patch_dim C*T*p*p={config.patch_dim} needs ({num_tokens}, {config.patch_dim}).")
  return grid


@dataclasses.dataclass(frozen=True)
class VisionConfig(VisionSizes):
  """Sizes of the vision tower; field names follow the HF `vision_config`."""
  depth: int
  hidden_size: int
  num_heads: int
  intermediate_size: int
  out_hidden_size: int
  fullatt_block_indexes: tuple[int, ...]
  window_size: int = 112
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  in_channels: int = 3
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0

  def __post_init__(self):
    object.__setattr__(self, "fullatt_block_indexes",
                       tuple(int(i) for i in self.fullatt_block_indexes))
    self.check_heads()
    if self.window_size % (self.patch_size * self.spatial_merge_size):
      raise ValueError(
          f"vision window_size={self.window_size} must be a multiple of patch_size * "
          f"spatial_merge_size = {self.patch_size * self.spatial_merge_size}.")
    bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"vision fullatt_block_indexes {bad} lie outside [0, depth={self.depth}).")
    if self.hidden_act != "silu":
      raise ValueError(f"vision hidden_act={self.hidden_act!r} is not supported; Qwen2.5-VL "
                       "uses 'silu'.")

  @property
  def window_merge_units(self) -> int:
    """Side of an attention window in merged units (112 px / 14 px / 2 = 4)."""
    return self.window_size // self.spatial_merge_size // self.patch_size

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> VisionConfig:
    """From the `vision_config` dict of a HF Qwen2.5-VL `config.json` (old or new layout)."""
    d = dict(d)
    # Released checkpoints spell the channel count `in_chans`.
    if "in_channels" not in d and "in_chans" in d:
      d["in_channels"] = d["in_chans"]
    v = {k: d.get(k, default) for k, default in _HF_VISION_DEFAULTS.items()}
    rope = d.get("rope_parameters") or {}
    v["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    return cls(**v)


# ----------------------------------------------------------------------------------------------
# Attention plan: pure numpy on the static grid, run once per trace.


class AttentionSegments(NamedTuple):
  """Where each token goes in a padded `[S, L_max]` layout of attention segments.

  Attributes:
    gather: int32 `[S, L_max]`, token index at each slot (0 in padding slots).
    lengths: int32 `[S]`, valid slots of each segment (valid slots come first).
    scatter: int32 `[N]`, flat slot `s * L_max + i` of each token.
  """
  gather: np.ndarray
  lengths: np.ndarray
  scatter: np.ndarray


def check_grid_thw(grid_thw: Any, spatial_merge_size: int) -> np.ndarray:
  """`grid_thw` as a validated int64 `[n_images, 3]` host array."""
  if isinstance(grid_thw, jax.core.Tracer):
    raise TypeError(
        "grid_thw must be a concrete host array (numpy), not a traced value: it fixes shapes "
        "and attention windows. Close over it instead of passing it through jax.jit.")
  grid = np.asarray(grid_thw)
  if grid.ndim != 2 or grid.shape[1] != 3 or not np.issubdtype(grid.dtype, np.integer):
    raise ValueError(f"grid_thw must be an integer array [n_images, 3] of (t, h, w) patch "
                     f"counts; got {grid.dtype} {grid.shape}.")
  if (grid <= 0).any() or (grid[:, 1:] % spatial_merge_size).any():
    raise ValueError(f"grid_thw rows must be positive with h and w multiples of "
                     f"spatial_merge_size={spatial_merge_size}; got {grid.tolist()}.")
  return grid.astype(np.int64)


def attention_segments(grid_thw: np.ndarray, spatial_merge_size: int,
                       window_merge_units: int | None) -> AttentionSegments:
  """Plans block-diagonal attention over packed tokens.

  Args:
    grid_thw: `[n_images, 3]` (t, h, w) patch grid per image, in packing order.
    spatial_merge_size: side of a merged unit in patches.
    window_merge_units: window side in merged units, or None for one segment per frame.

  Returns:
    The segment layout; tokens keep their packing order within a segment.
  """
  unit = spatial_merge_size**2
  segment_ids, offset = [], 0
  for t, h, w in grid_thw.tolist():
    units_h, units_w = h // spatial_merge_size, w // spatial_merge_size
    if window_merge_units is None:
      per_frame, windows = np.zeros(units_h * units_w, np.int64), 1
    else:
      windows_h = -(-units_h // window_merge_units)
      windows_w = -(-units_w // window_merge_units)
      row, col = np.meshgrid(np.arange(units_h), np.arange(units_w), indexing="ij")
      per_frame = ((row // window_merge_units) * windows_w + col // window_merge_units).ravel()
      windows = windows_h * windows_w
    per_frame = np.repeat(per_frame, unit)  # Units -> tokens (merge-block-major order).
    frames = np.arange(t)[:, None] * windows + per_frame[None, :]
    segment_ids.append(offset + frames.ravel())
    offset += t * windows
  # Number segments densely (windows of a ragged border may be empty).
  _, segment = np.unique(np.concatenate(segment_ids), return_inverse=True)
  order = np.argsort(segment, kind="stable")
  lengths = np.bincount(segment)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  seg_of_sorted = segment[order]
  slot = np.arange(len(order)) - starts[seg_of_sorted]
  max_len = int(lengths.max())
  gather = np.zeros((len(lengths), max_len), np.int32)
  gather[seg_of_sorted, slot] = order
  scatter = np.empty(len(order), np.int32)
  scatter[order] = seg_of_sorted * max_len + slot
  return AttentionSegments(gather, lengths.astype(np.int32), scatter)


def image_attention_segments(grid_thw: np.ndarray, spatial_merge_size: int,
                             window_merge_units: int | None) -> AttentionSegments:
  """`attention_segments`, planned for one image when all images share one grid.

  Segments never cross images, so equal images share one plan, applied image by image
  (`segment_attention` reads the image count off the token count). Tokens then move only
  within their image, and a token axis sharded by image stays sharded: with one global plan
  the gather over all images' tokens makes every device gather the whole batch.
  """
  if (grid_thw == grid_thw[:1]).all():
    grid_thw = grid_thw[:1]
  return attention_segments(grid_thw, spatial_merge_size, window_merge_units)


def vision_positions(grid_thw: np.ndarray, spatial_merge_size: int) -> np.ndarray:
  """(row, column) patch position of each packed token, int32 `[N, 2]`, merge-block-major."""
  out = []
  m = spatial_merge_size
  for t, h, w in grid_thw.tolist():
    row, col = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).ravel()  # noqa: E731
    out.append(np.tile(np.stack([block(row), block(col)], -1), (t, 1)))
  return np.concatenate(out).astype(np.int32)


def rotary_cos_sin(positions: jax.Array, head_dim: int,
                   theta: float) -> tuple[jax.Array, jax.Array]:
  """2-D rotary tables `[N, head_dim]` in fp32: a quarter of the frequencies per axis, twice.

  Layout `[row freqs, column freqs, row freqs, column freqs]`, for rotate-half RoPE.
  """
  quarter = head_dim // 4
  inv_freq = 1.0 / theta**(jnp.arange(0, 2 * quarter, 2, dtype=jnp.float32) / (2 * quarter))
  angles = positions.astype(jnp.float32)[:, :, None] * inv_freq  # [N, 2, quarter]
  angles = angles.reshape(angles.shape[0], 2 * quarter)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half RoPE in fp32. x `[N, H, D]`, cos/sin `[N, D]`."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos[:, None] + rotated * sin[:, None]).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Modules.


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      segments: AttentionSegments) -> jax.Array:
  """Attention within segments: q/k/v `[N, H, D]` -> `[N, H, D]`.

  `segments` plans `n` tokens (all images, or one of `N / n` equal images: see
  `image_attention_segments`). Each image's tokens are gathered into padded segments
  `[I * S, L, H, D]`, padding keys are masked by length, and the outputs are scattered back to
  the packed order.
  """
  heads, head_dim = q.shape[1:]
  tokens = segments.scatter.shape[0]
  images = q.shape[0] // tokens
  if images * tokens != q.shape[0]:
    raise ValueError(f"segment_attention: {q.shape[0]} tokens are not a whole number of images "
                     f"of the planned {tokens} tokens.")
  num_segments, length = segments.gather.shape

  def to_segments(a):  # [N, H, D] -> [I * S, L, H, D], gathered within each image.
    a = a.reshape(images, tokens, heads, head_dim)[:, segments.gather]
    return nn.with_logical_constraint(a.reshape(images * num_segments, length, heads, head_dim),
                                      ("batch", "length", "heads", "kv"))

  out = jax.nn.dot_product_attention(to_segments(q), to_segments(k), to_segments(v),
                                     key_value_seq_lengths=jnp.tile(segments.lengths, images))
  out = out.reshape(images, num_segments * length, heads, head_dim)[:, segments.scatter]
  return out.reshape(-1, heads, head_dim)


class VisionAttention(nn.Module):
  """Multi-head self-attention within segments, with 2-D RoPE on q and k."""
  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, windows: AttentionSegments, full: AttentionSegments,
               is_full: bool | jax.Array):
    """x `[N, E]`, cos/sin `[N, D]` -> `[N, E]`.

    Attends within `full` (whole frames) when `is_full`, else within `windows`; `is_full` is a
    Python bool (unrolled blocks) or a traced `[]` bool (scanned blocks: `lax.cond` runs one
    branch).
    """
    c = self.config
    heads, head_dim = c.num_heads, c.head_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = EinsumDense("ne,ethd->nthd", (c.hidden_size, 3, heads, head_dim),
                      ("embed", None, "heads", "kv"), **kw, name="qkv")(x)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [N, H, D]
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    attend_full = lambda q, k, v: segment_attention(q, k, v, full)  # noqa: E731
    attend_windows = lambda q, k, v: segment_attention(q, k, v, windows)  # noqa: E731
    if isinstance(is_full, (bool, np.bool_)):
      out = (attend_full if is_full else attend_windows)(q, k, v)
    else:
      out = jax.lax.cond(is_full, attend_full, attend_windows, q, k, v)
    return EinsumDense("nhd,hde->ne", (heads, head_dim, c.hidden_size), ("heads", "kv", "embed"),
                       contracted=2, **kw, name="proj")(out)


class VisionMLP(nn.Module):
  """SwiGLU with biases: down(silu(gate(x)) * up(x))."""
  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config

    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate = dense(c.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
    up = dense(c.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
    hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "mlp"))
    return dense(c.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(hidden)


class VisionBlock(nn.Module):
  """RMSNorm -> attention -> RMSNorm -> SwiGLU, with residuals; in the scan form
  `(x, is_full, ...) -> (x, None)`."""
  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, is_full, cos, sin, windows: AttentionSegments,
               full: AttentionSegments):
    """x `[N, E]` -> (`[N, E]`, None); `is_full` picks the attention segments."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    eps = self.config.rms_norm_eps
    x = x + VisionAttention(self.config, **kw, name="attn")(
        RMSNorm(eps, **kw, name="norm1")(x), cos, sin, windows, full, is_full)
    x = x + VisionMLP(self.config, **kw, name="mlp")(RMSNorm(eps, **kw, name="norm2")(x))
    return nn.with_logical_constraint(x, ("batch", "embed")), None


class PatchMerger(nn.Module):
  """RMSNorm, concatenate each merge group of patches, Linear, GELU (erf), Linear."""
  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x `[N, E]` -> `[N // merge**2, out_hidden_size]`."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    merged_dim = c.hidden_size * c.spatial_merge_size**2
    x = RMSNorm(c.rms_norm_eps, **kw, name="ln_q")(x).reshape(-1, merged_dim)
    x = dense(merged_dim, ("embed", "mlp"), name="mlp_0", **kw)(x)
    x = nn.with_logical_constraint(nn.gelu(x, approximate=False), ("batch", "mlp"))
    return dense(c.out_hidden_size, ("mlp", "embed"), name="mlp_2", **kw)(x)


class VisionTower(nn.Module):
  """Qwen2.5-VL vision encoder: flattened patches of several images -> merged tokens.

  Attributes:
    remat_policy: recompute each block in the backward pass, keeping what the named policy
      allows (`layers.REMAT_POLICIES`: none, dots, full).
    scan_layers: the blocks are one `nn.scan` with params stacked on a leading `layers` axis
      (`blocks/...`, `[depth, ...]`); windowed and full-attention blocks share the stack, a
      per-block flag (scanned input) picks the attention segments. Otherwise `blocks_{i}`.
  """
  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = True

  @nn.compact
  def __call__(self, pixel_values: jax.Array, grid_thw: np.ndarray) -> jax.Array:
    """Encodes packed image patches.

    Args:
      pixel_values: `[N, C * T * p * p]` float, the patches of all images concatenated
        (as `image_processor.preprocess_images` returns them).
      grid_thw: `[n_images, 3]` int (t, h, w) patch grid per image; a static host array.

    Returns:
      `[N // merge**2, out_hidden_size]` merged tokens, image by image in input order.
    """
    c = self.config
    grid = check_packed_patches(pixel_values, grid_thw, c)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    full, windows = (
        AttentionSegments(*map(jnp.asarray,
                               image_attention_segments(grid, c.spatial_merge_size, units)))
        for units in (None, c.window_merge_units))
    cos, sin = rotary_cos_sin(jnp.asarray(vision_positions(grid, c.spatial_merge_size)),
                              c.head_dim, c.rope_theta)

    x = dense(c.hidden_size, ("patch", "embed"), use_bias=False, name="patch_embed", **kw)(
                     pixel_values.astype(self.dtype))
    x = nn.with_logical_constraint(x, ("batch", "embed"))
    is_full = np.isin(np.arange(c.depth), c.fullatt_block_indexes)
    if self.scan_layers:
      # Scanned: the full-attention flag; shared: rotary tables and both segment plans.
      stack = scan_layers(VisionBlock, c.depth, (0,) + (nn.broadcast,) * 4, self.remat_policy)
      x, _ = stack(c, **kw, name="blocks")(x, jnp.asarray(is_full), cos, sin, windows, full)
    else:
      block = remat(VisionBlock, self.remat_policy, static_argnums=(2,))
      for i in range(c.depth):
        x, _ = block(c, **kw, name=f"blocks_{i}")(x, bool(is_full[i]), cos, sin, windows, full)
    return PatchMerger(c, **kw, name="merger")(x)


# ----------------------------------------------------------------------------------------------
# Loading from a Hugging Face checkpoint.


def hf_vision_weight_shapes(config: VisionConfig) -> dict[str, tuple[int, ...]]:
  """Every HF vision tensor name (relative to `visual.`) with its torch-layout shape."""
  c = config
  e, f, merged = c.hidden_size, c.intermediate_size, c.hidden_size * c.spatial_merge_size**2
  shapes = {"patch_embed.proj.weight": (e, c.in_channels, c.temporal_patch_size, c.patch_size,
                                        c.patch_size)}
  for i in range(c.depth):
    p = f"blocks.{i}."
    shapes.update({
        p + "norm1.weight": (e,), p + "norm2.weight": (e,),
        p + "attn.qkv.weight": (3 * e, e), p + "attn.qkv.bias": (3 * e,),
        p + "attn.proj.weight": (e, e), p + "attn.proj.bias": (e,),
        p + "mlp.gate_proj.weight": (f, e), p + "mlp.gate_proj.bias": (f,),
        p + "mlp.up_proj.weight": (f, e), p + "mlp.up_proj.bias": (f,),
        p + "mlp.down_proj.weight": (e, f), p + "mlp.down_proj.bias": (e,),
    })
  shapes.update({
      "merger.ln_q.weight": (e,),
      "merger.mlp.0.weight": (merged, merged), "merger.mlp.0.bias": (merged,),
      "merger.mlp.2.weight": (c.out_hidden_size, merged), "merger.mlp.2.bias": (c.out_hidden_size,),
  })
  return shapes


def checked_getter(get: Callable[[str], np.ndarray], shapes: Mapping[str, tuple[int, ...]]
                   ) -> Callable[[str], np.ndarray]:
  """`get` that checks each tensor against `shapes` (HF name -> torch-layout shape).

  Raises KeyError (a missing tensor: its name and expected shape) or ValueError (a wrong shape:
  the name and both shapes).
  """

  def load(name: str) -> np.ndarray:
    try:
      array = get(name)
    except KeyError as err:
      raise KeyError(f"Vision weight {name!r} (expected shape {shapes[name]}) is missing from "
                     f"the checkpoint: {err}") from err
    if tuple(array.shape) != shapes[name]:
      raise ValueError(
          f"Vision weight {name!r} has shape {tuple(array.shape)} in the checkpoint but the "
          f"config needs {shapes[name]}; check that the vision config matches the checkpoint.")
    return array

  return load


def attention_params_from_hf(load: Callable[[str], np.ndarray], prefix: str, config: Any
                             ) -> dict:
  """`VisionAttention` params from HF's fused `qkv` / `proj` Linear tensors under `prefix`
  (e.g. `blocks.0.attn.`); `config` gives `hidden_size`, `num_heads`, `head_dim`."""
  e, heads, head_dim = config.hidden_size, config.num_heads, config.head_dim
  return {
      "qkv": {"kernel": load(prefix + "qkv.weight").T.reshape(e, 3, heads, head_dim),
              "bias": load(prefix + "qkv.bias").reshape(3, heads, head_dim)},
      "proj": {"kernel": load(prefix + "proj.weight").T.reshape(heads, head_dim, e),
               "bias": load(prefix + "proj.bias")},
  }


def vision_params_from_hf(get: Callable[[str], np.ndarray], config: VisionConfig,
                          scan_layers: bool = True) -> dict:
  """The `VisionTower` param tree from HF tensors.

  Args:
    get: returns the torch-layout array of a HF vision tensor named relative to the vision
      prefix (e.g. `blocks.0.attn.qkv.weight`).
    config: the tower's config; every tensor's shape is checked against it.
    scan_layers: the blocks stacked on a leading axis (`blocks`) or unrolled (`blocks_{i}`).

  Returns:
    A nested dict of arrays (unboxed), the `params` collection of `VisionTower`.

  Raises:
    KeyError: a tensor is missing (names it and the shape expected).
    ValueError: a tensor's shape differs from the config's (names it and both shapes).
  """
  c = config
  load = checked_getter(get, hf_vision_weight_shapes(c))

  def linear(prefix):
    return {"kernel": load(prefix + ".weight").T, "bias": load(prefix + ".bias")}

  params = {"patch_embed": {"kernel": load("patch_embed.proj.weight").reshape(
      c.hidden_size, -1).T}}
  for i in range(c.depth):
    p = f"blocks.{i}."
    params[f"blocks_{i}"] = {
        "norm1": {"scale": load(p + "norm1.weight")},
        "norm2": {"scale": load(p + "norm2.weight")},
        "attn": attention_params_from_hf(load, p + "attn.", c),
        "mlp": {name: linear(p + "mlp." + name) for name in ("gate_proj", "up_proj", "down_proj")},
    }
  params["merger"] = {"ln_q": {"scale": load("merger.ln_q.weight")},
                      "mlp_0": linear("merger.mlp.0"), "mlp_2": linear("merger.mlp.2")}
  return stacked_blocks(params, c.depth) if scan_layers else params


def stacked_blocks(params: dict, depth: int) -> dict:
  """Converted tower params with `blocks_{i}` (i < depth) stacked into `blocks` (numpy, on the
  host: the scanned layout)."""
  params = dict(params)
  blocks = [params.pop(f"blocks_{i}") for i in range(depth)]
  params["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
  return params
