"""The Qwen2-VL / Qwen2.5-VL / Qwen3-VL image processor in numpy and PIL (no torch).

Each image is resized (PIL bicubic) so both sides are multiples of `patch_size * merge_size` and
its area lies within `[min_pixels, max_pixels]`, scaled to [0, 1], normalised with the family's
mean/std (`PROCESSOR_SETTINGS`), repeated `temporal_patch_size` times (a still image is a two-frame clip), and cut into
flattened patches ordered merge-block-major: the `merge_size x merge_size` patches that the
vision tower's merger fuses into one token are consecutive. Outputs equal those of HF's
`Qwen2VLImageProcessor` (PIL backend) bit for bit; Qwen3-VL checkpoints use that same class with
patch 16, mean/std 0.5 and their own pixel limits (`preprocessor_config.json`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import PIL.Image

# OpenAI CLIP normalisation, as used by the released Qwen2.5-VL processors.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The released Qwen3-VL processors normalise to [-1, 1].
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)

MAX_ASPECT_RATIO = 200

# `preprocess_images` keyword arguments of each backbone family, as its released
# `preprocessor_config.json` sets them (`size.shortest_edge` / `size.longest_edge` are the pixel
# limits).
PROCESSOR_SETTINGS = {
    "qwen25vl": dict(patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=56 * 56,
                     max_pixels=28 * 28 * 1280, image_mean=CLIP_MEAN, image_std=CLIP_STD),
    "qwen3vl": dict(patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=256 * 256,
                    max_pixels=4096 * 4096, image_mean=HALF_MEAN, image_std=HALF_STD),
}


def processor_settings(family: str) -> dict:
  """A copy of `PROCESSOR_SETTINGS[family]`, with an error naming the families."""
  if family not in PROCESSOR_SETTINGS:
    raise ValueError(f"Unknown backbone family {family!r}; choose one of "
                     f"{sorted(PROCESSOR_SETTINGS)}.")
  return dict(PROCESSOR_SETTINGS[family])


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
  """The size an image is resized to: sides multiples of `factor`, area in [min, max] pixels.

  Rounds each side to the nearest multiple of `factor`; if the area is then too large (small),
  scales both sides down (up) by a common factor, keeping the aspect ratio as closely as
  multiples of `factor` allow.

  Returns:
    `(resized_height, resized_width)`.
  """
  if height <= 0 or width <= 0:
    raise ValueError(f"Image size {height}x{width} is empty; both sides must be positive.")
  aspect = max(height, width) / min(height, width)
  if aspect > MAX_ASPECT_RATIO:
    raise ValueError(
        f"Image of {height}x{width} has aspect ratio {aspect:.1f}, "
        f"above the {MAX_ASPECT_RATIO} the processor accepts; crop or pad it first.")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def _as_rgb_uint8(image: np.ndarray, index: int) -> np.ndarray:
  """`[H, W, 3]` uint8 from an `[H, W, 3]`, `[H, W, 1]` or `[H, W]` uint8 array."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(
        f"images[{index}] has dtype {image.dtype}; pass uint8 pixels in [0, 255] "
        "(e.g. `(x * 255).round().astype(np.uint8)` for a float image in [0, 1]).")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:  # Grayscale: PIL's "L" -> "RGB" copies the channel.
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(
        f"images[{index}] has shape {image.shape}; expected [H, W, 3] RGB (channels last), "
        "[H, W, 1] or [H, W] grayscale.")
  return image


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bicubic resize of an `[H, W, 3]` uint8 image with PIL (the reference's resampler)."""
  return np.asarray(PIL.Image.fromarray(image).resize((width, height), PIL.Image.BICUBIC))


def patchify(image: np.ndarray, patch_size: int = 14, temporal_patch_size: int = 2,
             merge_size: int = 2) -> tuple[np.ndarray, tuple[int, int, int]]:
  """Cuts a normalised `[C, H, W]` still image into flattened spatio-temporal patches.

  Returns:
    `patches [grid_h * grid_w, C * temporal_patch_size * patch_size**2]`, rows in
    merge-block-major order (block row, block column, row in block, column in block), each row
    laid out `(C, T, p, p)` as the Conv3d patch embedding expects; and `(1, grid_h, grid_w)`.
  """
  channels, height, width = image.shape
  grid_h, grid_w = height // patch_size, width // patch_size
  if height % patch_size or width % patch_size or grid_h % merge_size or grid_w % merge_size:
    raise ValueError(
        f"Image of {height}x{width} does not split into {patch_size}-pixel patches grouped "
        f"{merge_size}x{merge_size}; resize it to multiples of {patch_size * merge_size} first.")
  x = image.reshape(channels, grid_h // merge_size, merge_size, patch_size,
                    grid_w // merge_size, merge_size, patch_size)
  # [C, bh, mh, ph, bw, mw, pw] -> [bh, bw, mh, mw, C, ph, pw]
  x = x.transpose(1, 4, 2, 5, 0, 3, 6)
  x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, *x.shape[5:]))
  patches = x.reshape(grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
  return patches, (1, grid_h, grid_w)


def preprocess_images(images: Sequence[np.ndarray], *, min_pixels: int = 56 * 56,
                      max_pixels: int = 28 * 28 * 1280, patch_size: int = 14,
                      temporal_patch_size: int = 2, merge_size: int = 2,
                      image_mean: Sequence[float] = CLIP_MEAN,
                      image_std: Sequence[float] = CLIP_STD) -> tuple[np.ndarray, np.ndarray]:
  """Turns still images into the vision tower's flattened patches.

  The defaults are Qwen2.5-VL's; `**processor_settings("qwen3vl")` gives Qwen3-VL's.

  Args:
    images: `[H, W, 3]` uint8 RGB arrays (sizes may differ; grayscale `[H, W]` is accepted).
    min_pixels, max_pixels: bounds on the resized area (see `smart_resize`).
    patch_size, temporal_patch_size, merge_size: must match the vision tower's config.
    image_mean, image_std: per-channel normalisation of the [0, 1] pixels.

  Returns:
    `pixel_values` float32 `[N, 3 * temporal_patch_size * patch_size**2]`, the images' patches
    concatenated in order (`N = sum(t * h * w)`), and `image_grid_thw` int64 `[n_images, 3]`,
    the `(t, h, w)` patch grid of each image.
  """
  if isinstance(images, np.ndarray) and images.ndim in (2, 3) and images.dtype == np.uint8:
    raise ValueError(
        f"`images` is a single array of shape {images.shape}; pass a list of images, e.g. [image].")
  if len(images) == 0:
    raise ValueError("`images` is empty; pass at least one [H, W, 3] uint8 image.")
  mean = np.asarray(image_mean, np.float32)
  std = np.asarray(image_std, np.float32)
  all_patches, grids = [], []
  for i, image in enumerate(images):
    image = _as_rgb_uint8(image, i)
    height, width = smart_resize(image.shape[0], image.shape[1], patch_size * merge_size,
                                 min_pixels, max_pixels)
    image = resize_image(image, height, width)
    # Scale in float64 then cast, normalise in float32: the reference's exact arithmetic.
    x = (image.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = ((x - mean) / std).transpose(2, 0, 1)  # [C, H, W]
    patches, grid = patchify(x, patch_size, temporal_patch_size, merge_size)
    all_patches.append(patches)
    grids.append(grid)
  return np.concatenate(all_patches, axis=0), np.asarray(grids, dtype=np.int64)
