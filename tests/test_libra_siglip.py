"""SigLIP vision tower (Libra-VLA's refiner encoder): parity with HF transformers' SiglipVisionModel
on a tiny random checkpoint built here (fp32, CPU), and loading errors."""

import json

import jax
import numpy as np
import pytest

from twinbrain_jax.models import hf_loading, siglip

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

PARITY_ATOL = 1e-4  # fp32 max abs error allowed against HF.
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, layer_norm_eps=1e-6)


@pytest.fixture(scope="module")
def hf_siglip(tmp_path_factory):
  """(HF model, its save_pretrained dir) of a tiny random SigLIP tower with its pooling head."""
  torch.manual_seed(0)
  config = transformers.SiglipVisionConfig(**TINY, vision_use_head=True)
  model = transformers.SiglipVisionModel(config).eval()
  with torch.no_grad():  # Non-trivial norms and biases, so a transposed weight cannot hide.
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  directory = tmp_path_factory.mktemp("siglip")
  model.save_pretrained(directory)
  return model, directory


def test_matches_transformers(hf_siglip):
  model, directory = hf_siglip
  config = siglip.load_config(directory)
  assert config == siglip.SiglipConfig(**TINY, use_head=True)
  params = siglip.load_params(directory, config)
  pixels = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  ours = jax.jit(siglip.SiglipVisionModel(config).apply)({"params": params}, pixels)
  with torch.no_grad():
    theirs = model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
  for key in ("last_hidden_state", "pooler_output"):
    expected = getattr(theirs, key).numpy()
    assert ours[key].shape == expected.shape
    np.testing.assert_allclose(np.asarray(ours[key]), expected, atol=PARITY_ATOL, rtol=0)


def test_param_tree_matches_the_flax_module(hf_siglip):
  _, directory = hf_siglip
  config = siglip.load_config(directory)
  loaded = siglip.load_params(directory, config)
  init = jax.eval_shape(siglip.SiglipVisionModel(config).init, jax.random.key(0),
                        np.zeros((1, 32, 32, 3), np.float32))["params"]
  import flax.linen as nn
  shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), nn.unbox(tree))
  assert shapes(loaded) == shapes(init)


def test_shape_mismatch_names_tensor_and_shapes(hf_siglip):
  _, directory = hf_siglip
  wrong = siglip.SiglipConfig(**dict(TINY, intermediate_size=48), use_head=True)
  with pytest.raises(hf_loading.CheckpointError, match=r"fc1\.weight.*\(64, 32\).*\(48, 32\)"):
    siglip.load_params(directory, wrong)


def test_head_weights_without_head_are_rejected(hf_siglip):
  _, directory = hf_siglip
  headless = siglip.SiglipConfig(**TINY, use_head=False)
  with pytest.raises(hf_loading.CheckpointError, match="does not use.*head"):
    siglip.load_params(directory, headless)


def test_config_from_hf_reads_nested_vision_config(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(dict(vision_config=dict(TINY))))
  assert siglip.load_config(tmp_path) == siglip.SiglipConfig(**TINY)
