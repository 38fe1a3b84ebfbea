"""Per-sample transforms: action chunks, observation history, resize/pad, augmentation.

All functions are pure numpy; randomness comes from an explicit `np.random.Generator` (grain's
`random_map` seeds one per element from the pipeline seed and the element index, so augmentation
is reproducible and independent of the number of workers).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

PAD_MODES = ("repeat_last", "zero")


def action_chunk(actions: np.ndarray, t: int, horizon: int,
                 pad_mode: str = "repeat_last") -> tuple[np.ndarray, np.ndarray]:
  """Actions `t .. t + horizon - 1` of an episode.

  Args:
    actions: `[T, A]` actions of the whole episode.
    t: current step, `0 <= t < T`.
    horizon: H.
    pad_mode: past the episode end, "repeat_last" repeats the last action, "zero" writes zeros.

  Returns:
    `(chunk [H, A], mask [H])`; mask is True for real steps and False for padding.
  """
  if pad_mode not in PAD_MODES:
    raise ValueError(f"Unknown pad_mode {pad_mode!r}; choose one of {PAD_MODES}.")
  num_steps = actions.shape[0]
  index = t + np.arange(horizon)
  mask = index < num_steps
  chunk = actions[np.minimum(index, num_steps - 1)]
  if pad_mode == "zero":
    chunk = np.where(mask[:, None], chunk, 0.0)
  return chunk.astype(np.float32), mask


def history_steps(t: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  """Steps `t - length + 1 .. t` clamped at 0, and a mask (False = before the episode start)."""
  index = t - length + 1 + np.arange(length)
  return np.maximum(index, 0), index >= 0


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """`[h, w, 3]` uint8 -> `[H, W, 3]` uint8, bilinear with antialiasing (PIL)."""
  height, width = size
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
  """Zero-pads `[..., H, W, C]` at the bottom/right so H and W are multiples of `multiple`."""
  if multiple <= 1:
    return image
  height, width = image.shape[-3:-1]
  pad_h, pad_w = -height % multiple, -width % multiple
  if not pad_h and not pad_w:
    return image
  pad = [(0, 0)] * (image.ndim - 3) + [(0, pad_h), (0, pad_w), (0, 0)]
  return np.pad(image, pad)


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: tuple[int, int],
                        scale: tuple[float, float], ratio: tuple[float, float]) -> np.ndarray:
  """Crops a random box (area fraction in `scale`, aspect in `ratio`) and resizes it to `size`."""
  height, width = image.shape[:2]
  area = rng.uniform(*scale) * height * width
  aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
  crop_w = int(round(min(width, np.sqrt(area * aspect))))
  crop_h = int(round(min(height, np.sqrt(area / aspect))))
  y0 = int(rng.integers(0, height - crop_h + 1))
  x0 = int(rng.integers(0, width - crop_w + 1))
  crop = Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR,
                                       box=(x0, y0, x0 + crop_w, y0 + crop_h))
  return np.asarray(crop)


# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) chroma plane.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                        [0.211, -0.523, 0.312]], np.float32)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


def color_jitter(image: np.ndarray, rng: np.random.Generator, brightness: float,
                 contrast: float, saturation: float, hue: float) -> np.ndarray:
  """Random brightness/contrast/saturation scaling and hue rotation, as one 3x3 colour map.

  Factors are drawn from `1 ± brightness`, `1 ± contrast`, `1 ± saturation` and a hue angle from
  `± hue` turns. `[H, W, 3]` uint8 in and out.
  """
  b = rng.uniform(1 - brightness, 1 + brightness)
  c = rng.uniform(1 - contrast, 1 + contrast)
  s = rng.uniform(1 - saturation, 1 + saturation)
  angle = rng.uniform(-hue, hue) * 2 * np.pi
  cos, sin = np.cos(angle), np.sin(angle)
  # In YIQ: saturation scales and hue rotates the chroma (I, Q); brightness scales everything.
  yiq_map = np.array([[1, 0, 0], [0, s * cos, -s * sin], [0, s * sin, s * cos]], np.float32)
  color = b * _YIQ_TO_RGB @ yiq_map @ _RGB_TO_YIQ
  x = np.einsum("hwc,dc->hwd", image.astype(np.float32), color)
  mean = x.mean()  # Contrast pulls every channel towards the image mean.
  x = (x - mean) * c + mean
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)
