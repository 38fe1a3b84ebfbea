"""The numpy image processor against HF's `Qwen2VLImageProcessor` (PIL backend, pinned version)."""

import numpy as np
import pytest

from twinbrain_jax.models import image_processor

hf_qwen2_vl = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")


def _random_images(sizes, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _hf(images, **kwargs):
  processor = hf_qwen2_vl.Qwen2VLImageProcessorPil(**kwargs)
  out = processor(images=images, return_tensors="np")
  return out["pixel_values"], out["image_grid_thw"]


def test_two_images_of_different_sizes_equal_hf():
  # 224x280 -> 16x20 patches (8x10 merged units); 130x250 -> 140x252 -> 10x18 (5x9 units).
  images = _random_images([(224, 280), (130, 250)])
  pixel_values, grid = image_processor.preprocess_images(images)
  ref_pixel_values, ref_grid = _hf(images)
  np.testing.assert_array_equal(grid, ref_grid)
  assert grid.dtype == np.int64 and pixel_values.dtype == np.float32
  assert (grid[:, 1:] // 2 >= 4).all()  # At least 4x4 merged units per image.
  assert pixel_values.shape == ref_pixel_values.shape == (16 * 20 + 10 * 18, 3 * 2 * 14 * 14)
  # Exact: same resampler and the same float arithmetic.
  np.testing.assert_array_equal(pixel_values, ref_pixel_values)


@pytest.mark.parametrize("sizes,kwargs", [
    # Up-scaled below min_pixels, down-scaled above max_pixels, ragged aspect ratios.
    ([(20, 30), (1500, 1100), (57, 333)], {}),
    ([(480, 640), (100, 101)], dict(min_pixels=128 * 28 * 28, max_pixels=256 * 28 * 28)),
])
def test_resize_limits_equal_hf(sizes, kwargs):
  images = _random_images(sizes, seed=1)
  pixel_values, grid = image_processor.preprocess_images(images, **kwargs)
  ref_pixel_values, ref_grid = _hf(images, **kwargs)
  np.testing.assert_array_equal(grid, ref_grid)
  np.testing.assert_array_equal(pixel_values, ref_pixel_values)
  if "max_pixels" in kwargs:
    areas = grid[:, 1] * grid[:, 2] * 14 * 14
    assert (areas >= kwargs["min_pixels"]).all() and (areas <= kwargs["max_pixels"]).all()


def test_smart_resize_equals_hf_on_many_sizes():
  rng = np.random.default_rng(2)
  for height, width in rng.integers(1, 3000, (300, 2)):
    if max(height, width) / min(height, width) > 200:
      continue
    ours = image_processor.smart_resize(int(height), int(width))
    ref = hf_qwen2_vl.smart_resize(int(height), int(width), max_pixels=28 * 28 * 1280)
    assert ours == tuple(ref), (height, width)
    assert ours[0] % 28 == 0 and ours[1] % 28 == 0


def test_patches_are_merge_block_major():
  """Row k of the output is the patch the vision tower expects at merge-block-major slot k."""
  image = _random_images([(56, 84)], seed=3)[0]  # Already a multiple of 28: no resampling.
  pixel_values, grid = image_processor.preprocess_images([image])
  assert grid.tolist() == [[1, 4, 6]]
  normalised = ((image / 255.0 - np.array(image_processor.CLIP_MEAN))
                / np.array(image_processor.CLIP_STD))  # float64 reference
  patches = pixel_values.reshape(-1, 3, 2, 14, 14)
  k = 0
  for block_row in range(2):
    for block_col in range(3):
      for r in range(2):
        for c in range(2):
          row, col = 2 * block_row + r, 2 * block_col + c
          expected = normalised[14 * row:14 * row + 14, 14 * col:14 * col + 14].transpose(2, 0, 1)
          for t in range(2):  # A still image is repeated over the temporal patch.
            np.testing.assert_allclose(patches[k, :, t], expected, atol=1e-6)
          k += 1


def test_grayscale_matches_rgb_copy():
  gray = _random_images([(60, 90)], seed=4)[0][..., 0]
  ours, _ = image_processor.preprocess_images([gray])
  rgb, _ = image_processor.preprocess_images([np.repeat(gray[..., None], 3, -1)])
  np.testing.assert_array_equal(ours, rgb)


@pytest.mark.parametrize("images,match", [
    ([np.zeros((32, 32, 3), np.float32)], "uint8"),
    ([np.zeros((32, 32, 4), np.uint8)], r"\[H, W, 3\]"),
    ([np.zeros((3, 32, 32), np.uint8)], r"\[H, W, 3\]"),
    ([np.zeros((2, 500, 3), np.uint8)], "aspect ratio"),
    ([], "empty"),
    (np.zeros((32, 32, 3), np.uint8), "list of images"),
])
def test_bad_images_raise(images, match):
  with pytest.raises(ValueError, match=match):
    image_processor.preprocess_images(images)


def test_qwen3vl_settings_equal_hf_qwen3vl_processor():
  """Qwen3-VL: HF's Qwen2VL processor with the released Qwen3-VL preprocessor_config.json."""
  settings = image_processor.processor_settings("qwen3vl")
  images = _random_images([(300, 420), (180, 500), (2000, 1500)], seed=4)
  pixel_values, grid = image_processor.preprocess_images(images, **settings)
  ref_pixel_values, ref_grid = _hf(
      images, patch_size=16, temporal_patch_size=2, merge_size=2,
      image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
      size={"shortest_edge": 65536, "longest_edge": 16777216})
  np.testing.assert_array_equal(grid, ref_grid)
  assert pixel_values.shape == ref_pixel_values.shape
  assert pixel_values.shape[1] == 3 * 2 * 16 * 16
  assert (grid[:, 1:] // 2 >= 4).all()
  np.testing.assert_array_equal(pixel_values, ref_pixel_values)
  # Sides snap to multiples of 32 and the area respects the 256x256 lower limit.
  assert (grid[:, 1] * grid[:, 2] * 16 * 16 >= 256 * 256).all()
  assert pixel_values.min() >= -1.0 and pixel_values.max() <= 1.0


def test_unknown_family_names_the_choices():
  with pytest.raises(ValueError, match="qwen25vl"):
    image_processor.processor_settings("qwen4")
