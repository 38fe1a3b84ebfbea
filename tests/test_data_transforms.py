"""Gripper transforms, normalisation and per-sample transforms against plain references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.fixtures_data import binarize_reference, rel2abs_reference
from twinbrain_jax.data import normalization, oxe_registry, transforms


@pytest.mark.parametrize("seed", range(5))
def test_gripper_transforms_match_reference(seed):
  rng = np.random.default_rng(seed)
  bridge = rng.choice([0.0, 1.0, 0.5, 0.97, 0.03, 0.3], size=20)
  np.testing.assert_array_equal(oxe_registry.binarize_gripper_actions(bridge),
                                binarize_reference(bridge).astype(np.float32))
  fractal = rng.choice([0.0, 0.0, 1.0, -1.0, 0.05, -0.05], size=20)
  np.testing.assert_array_equal(oxe_registry.relative_to_absolute_gripper(fractal),
                                rel2abs_reference(fractal))


def test_fractal_gripper_without_command_is_open():
  np.testing.assert_array_equal(oxe_registry.relative_to_absolute_gripper(np.zeros(4)), 1.0)
  # First command "close": the gripper was open before it.
  np.testing.assert_array_equal(
      oxe_registry.relative_to_absolute_gripper(np.array([0, 1.0, 0, -1.0, 0])),
      [1, 0, 0, 1, 1])


def test_bridge_standardize_relabels_from_state():
  rng = np.random.default_rng(0)
  raw = {"action": rng.normal(size=(6, 7)).astype(np.float32),
         "observation/state": rng.normal(size=(6, 7)).astype(np.float32)}
  raw["action"][:, 6] = [1, 0, 0.5, 0, 1, 1]
  actions, states = oxe_registry.get_spec("bridge_dataset").standardize(raw)
  assert actions.shape == (5, 7) and states.shape == (5, 7)
  np.testing.assert_allclose(actions[:, :6], np.diff(raw["observation/state"][:, :6], axis=0),
                             rtol=0, atol=1e-6)
  np.testing.assert_array_equal(actions[:, 6], [1, 0, 0, 0, 1])
  np.testing.assert_array_equal(states, raw["observation/state"][:5])


def test_unknown_dataset_lists_known():
  with pytest.raises(KeyError, match="not in the OXE registry.*bridge_dataset"):
    oxe_registry.get_spec("droid")


def test_stats_match_float64_reference():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1000, 4)) * [1, 10, 0.1, 0] + [0, 5, -1, 2]
  stats = normalization.ArrayStats.compute(x)
  for name, ref in dict(mean=x.mean(0), std=x.std(0), min=x.min(0), max=x.max(0),
                        q01=np.percentile(x, 1, axis=0), q99=np.percentile(x, 99, axis=0)).items():
    np.testing.assert_allclose(getattr(stats, name), ref, rtol=1e-6, atol=1e-6, err_msg=name)
  again = normalization.ArrayStats.from_json(stats.to_json())
  np.testing.assert_array_equal(again.q99, stats.q99)
  assert again.count == 1000


def test_normalize_reference_and_exact_inverse():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(500, 4)).astype(np.float32)
  x[:, 2] = rng.choice([0.0, 1.0], size=500)  # a gripper
  x[:, 3] = 7.0  # a constant dim
  stats = normalization.ArrayStats.compute(x)
  norm_mask, bin_mask = [True, True, False, True], [False, False, True, False]
  y = normalization.normalize(x, stats, norm_mask, bin_mask)
  q01, q99 = np.percentile(x.astype(np.float64), [1, 99], axis=0)
  ref = np.clip(2 * (x - q01) / np.where(q99 > q01, q99 - q01, 1) - 1, -1, 1)
  np.testing.assert_allclose(y[:, :2], ref[:, :2], rtol=0, atol=1e-5)
  np.testing.assert_array_equal(y[:, 2], x[:, 2])
  np.testing.assert_array_equal(y[:, 3], 0.0)
  assert y.min() >= -1 and y.max() <= 1
  back = normalization.unnormalize(y, stats, norm_mask, bin_mask)
  inside = (x >= stats.q01) & (x <= stats.q99)
  # Exact up to float32 rounding of (x - q01) / span: 1e-6 of the span.
  span = (stats.q99 - stats.q01)[None].repeat(len(x), 0)
  np.testing.assert_array_less(np.abs(back - x)[inside], 1e-6 * span[inside] + 1e-7)
  # Outside [q01, q99] the inverse returns the clipping bound.
  np.testing.assert_allclose(back[:, 0][x[:, 0] > stats.q99[0]], stats.q99[0], rtol=1e-6)
  # A continuous model output for the gripper is thresholded at 0.5.
  np.testing.assert_array_equal(
      normalization.unnormalize(np.array([[0, 0, 0.7, 0], [0, 0, 0.2, 0]]), stats, norm_mask,
                                bin_mask)[:, 2], [1, 0])


def test_action_chunk_and_history_match_loops():
  actions = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)
  for mode in transforms.PAD_MODES:
    for t in range(5):
      chunk, mask = transforms.action_chunk(actions, t, 4, mode)
      for h in range(4):
        real = t + h < 5
        assert mask[h] == real
        expected = actions[t + h] if real else (actions[-1] if mode == "repeat_last" else 0)
        np.testing.assert_array_equal(chunk[h], expected)
  steps, mask = transforms.history_steps(1, 3)
  np.testing.assert_array_equal(steps, [0, 0, 1])
  np.testing.assert_array_equal(mask, [False, True, True])


def test_resize_close_to_jax_antialiased_bilinear():
  rng = np.random.default_rng(3)
  image = (rng.uniform(size=(256, 320, 3)) ** 3 * 255).astype(np.uint8)
  image = np.asarray(jax.image.resize(image.astype(np.float32), (256, 320, 3), "linear"))
  image = np.clip(image, 0, 255).astype(np.uint8)
  ours = transforms.resize(image, (224, 224)).astype(np.float32)
  ref = np.asarray(jax.image.resize(jnp.asarray(image, jnp.float32), (224, 224, 3), "linear",
                                    antialias=True))
  # PIL and XLA place their triangle filters slightly differently: a few grey levels at most.
  assert np.abs(ours - ref).mean() < 1.5, np.abs(ours - ref).mean()


def test_pad_to_multiple():
  image = np.ones((2, 30, 57, 3), np.uint8)
  padded = transforms.pad_to_multiple(image, 28)
  assert padded.shape == (2, 56, 84, 3)
  assert padded[:, :30, :57].min() == 1 and padded[:, 30:].max() == 0
  assert padded[:, :, 57:].max() == 0
  assert transforms.pad_to_multiple(np.ones((224, 224, 3)), 28).shape == (224, 224, 3)


def test_augmentation_identity_and_determinism():
  rng = np.random.default_rng(4)
  image = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
  same = transforms.color_jitter(image, np.random.default_rng(0), 0, 0, 0, 0)
  np.testing.assert_allclose(same, image, atol=1)  # YIQ round trip rounding only.
  full = transforms.random_resized_crop(image, np.random.default_rng(0), (64, 80), (1, 1), (1.25, 1.25))
  np.testing.assert_array_equal(full, image)  # Whole image, same size: unchanged.
  a = transforms.color_jitter(
      transforms.random_resized_crop(image, np.random.default_rng(5), (32, 32), (0.5, 1), (0.8, 1.2)),
      np.random.default_rng(5), 0.2, 0.2, 0.2, 0.05)
  b = transforms.color_jitter(
      transforms.random_resized_crop(image, np.random.default_rng(5), (32, 32), (0.5, 1), (0.8, 1.2)),
      np.random.default_rng(5), 0.2, 0.2, 0.2, 0.05)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (32, 32, 3)
  # Grey pixels stay grey under saturation and hue changes (chroma is zero).
  grey = np.full((4, 4, 3), 100, np.uint8)
  out = transforms.color_jitter(grey, np.random.default_rng(1), 0, 0, 0.5, 0.5)
  assert np.ptp(out.astype(int), axis=-1).max() <= 1
