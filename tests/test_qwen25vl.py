"""Qwen2.5-VL language model and full model against the pinned HF transformers (fp32, CPU).

Reference: `transformers.Qwen2_5_VLForConditionalGeneration` loaded from the tiny random
checkpoint of `tests/fixtures_backbone.py`. Tolerance for parity: 1e-4 max abs error, compared
at the valid (non-padding) positions; HF gives padded rows values that depend on its mask
implementation, ours attend to nothing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.twinbrain import LOGICAL_AXIS_RULES
from tests.fixtures_backbone import tiny_hf_checkpoint  # noqa: F401  (pytest fixture)
from twinbrain_jax import sharding
from twinbrain_jax.models import hf_loading, qwen25vl
from twinbrain_jax.models.backbone_presets import backbone_preset
from twinbrain_jax.models.image_processor import preprocess_images

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PARITY_TOL = 1e-4


@pytest.fixture(scope="module")
def hf_model(tiny_hf_checkpoint):
  model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      tiny_hf_checkpoint, dtype=torch.float32)
  return model.eval()


@pytest.fixture(scope="module")
def flax_model(tiny_hf_checkpoint):
  config = hf_loading.load_config(tiny_hf_checkpoint)
  params = hf_loading.load_params(tiny_hf_checkpoint, config)
  return qwen25vl.Qwen25VL(config), params


def _left_pad(prompts):
  """Token lists -> (ids [B, L], mask [B, L]) padded on the left with token 0."""
  length = max(len(p) for p in prompts)
  ids = np.zeros((len(prompts), length), np.int64)
  mask = np.zeros((len(prompts), length), np.int64)
  for b, p in enumerate(prompts):
    ids[b, length - len(p):] = p
    mask[b, length - len(p):] = 1
  return ids, mask


def multimodal_batch(config, seed=0):
  """Two prompts of different lengths, each with one image of a different size, left padded.

  Images: 112x112 (8x8 patches -> 4x4 merged units, one window) and 168x224 (12x16 patches ->
  6x8 merged units, partial windows).
  """
  rng = np.random.default_rng(seed)
  images = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8),
            rng.integers(0, 256, (168, 224, 3), dtype=np.uint8)]
  pixel_values, grid = preprocess_images(images)
  merge = config.vision.spatial_merge_size
  prompts = []
  for g, num_text in zip(grid, (9, 4)):
    num_image = int(np.prod(g)) // merge ** 2
    text = rng.integers(0, 490, num_text).tolist()
    prompts.append([config.vision_start_token_id] + [config.image_token_id] * num_image
                   + [config.vision_end_token_id] + text)
  ids, mask = _left_pad(prompts)
  return ids, mask, pixel_values, grid


def _hf_forward(hf_model, ids, mask, config, pixel_values=None, grid=None, position_ids=None):
  kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                output_hidden_states=True)
  if pixel_values is not None:
    kwargs.update(pixel_values=torch.tensor(pixel_values), image_grid_thw=torch.tensor(grid),
                  mm_token_type_ids=torch.tensor((ids == config.image_token_id).astype(np.int64)))
  if position_ids is not None:
    kwargs["position_ids"] = torch.tensor(position_ids.astype(np.int64))
  with torch.no_grad():
    out = hf_model(**kwargs)
  return out.logits.numpy(), out.hidden_states[-1].numpy()


def _max_err(a, b, valid):
  return float(np.abs(np.asarray(a)[valid] - np.asarray(b)[valid]).max())


# ---------------------------------------------------------------------------------------------
# Pure functions.


def test_mrope_cos_sin_matches_hf(hf_model):
  text = hf_model.config.text_config
  head_dim = text.hidden_size // text.num_attention_heads
  rng = np.random.default_rng(1)
  positions = rng.integers(0, 3000, (3, 2, 11))
  cos, sin = qwen25vl.mrope_cos_sin(positions, head_dim, text.rope_parameters["rope_theta"],
                                    text.rope_parameters["mrope_section"])
  with torch.no_grad():
    hf_cos, hf_sin = hf_model.model.language_model.rotary_emb(
        torch.zeros(1, dtype=torch.float32), torch.tensor(positions))
  assert cos.shape == (2, 11, head_dim)
  np.testing.assert_allclose(cos, hf_cos.numpy(), atol=1e-5)
  np.testing.assert_allclose(sin, hf_sin.numpy(), atol=1e-5)


def test_mrope_sections_take_their_axis():
  """Frequencies in section i move only with position axis i (float64 reference)."""
  section, head_dim, theta = (2, 3, 3), 16, 1e6
  positions = np.zeros((3, 1, 1), np.int64)
  base_cos, _ = qwen25vl.mrope_cos_sin(positions, head_dim, theta, section)
  bounds = np.cumsum((0,) + section)
  for axis in range(3):
    moved = positions.copy()
    moved[axis] = 7
    cos, _ = qwen25vl.mrope_cos_sin(moved, head_dim, theta, section)
    changed = np.abs(np.asarray(cos - base_cos))[0, 0, :head_dim // 2] > 1e-7
    expected = np.zeros(head_dim // 2, bool)
    expected[bounds[axis]:bounds[axis + 1]] = True
    # 1 - cos(7 * inv_freq) is below 1e-7 for the slowest frequencies; test only where it is not.
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    visible = 1 - np.cos(7 * inv_freq) > 1e-6
    np.testing.assert_array_equal(changed[visible], expected[visible])


def test_apply_rope_matches_hf():
  from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf_lib
  rng = np.random.default_rng(2)
  q = rng.standard_normal((2, 5, 4, 8)).astype(np.float32)
  k = rng.standard_normal((2, 5, 2, 8)).astype(np.float32)
  angles = rng.uniform(-3, 3, (2, 5, 4)).astype(np.float32)
  cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))
  hf_q, hf_k = hf_lib.apply_rotary_pos_emb(
      torch.tensor(q), torch.tensor(k), torch.tensor(cos), torch.tensor(sin), unsqueeze_dim=2)
  np.testing.assert_allclose(qwen25vl.apply_rope(q, cos, sin), hf_q.numpy(), atol=1e-6)
  np.testing.assert_allclose(qwen25vl.apply_rope(k, cos, sin), hf_k.numpy(), atol=1e-6)


def _attention_reference(q, k, v, mask):
  """float64 numpy GQA attention; fully masked rows give zeros."""
  q, k, v = (x.astype(np.float64) for x in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask[:, None], logits, -np.inf)
  row_max = np.max(logits, axis=-1, keepdims=True)
  weights = np.exp(logits - np.where(np.isfinite(row_max), row_max, 0))
  denom = weights.sum(-1, keepdims=True)
  probs = np.where(denom > 0, weights / np.where(denom > 0, denom, 1), 0)
  return np.einsum("bhqk,bkhd->bqhd", probs, v)


def test_dot_product_attention_gqa_and_masked_rows():
  rng = np.random.default_rng(3)
  q = rng.standard_normal((2, 6, 4, 8)).astype(np.float32)
  k = rng.standard_normal((2, 7, 2, 8)).astype(np.float32)
  v = rng.standard_normal((2, 7, 2, 8)).astype(np.float32)
  mask = rng.random((2, 6, 7)) > 0.4
  mask[0, 2] = False  # A fully masked query row.
  out = np.asarray(qwen25vl.dot_product_attention(q, k, v, mask))
  np.testing.assert_allclose(out, _attention_reference(q, k, v, mask), atol=1e-5)
  assert np.all(out[0, 2] == 0) and np.all(np.isfinite(out))


def _grouped_einsum_attention(q, k, v, mask):
  """The earlier attention path (float32 einsums over grouped query heads), for comparison."""
  batch, q_len, num_q_heads, head_dim = q.shape
  groups = num_q_heads // k.shape[2]
  q = q.reshape(batch, q_len, k.shape[2], groups, head_dim)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", q.astype(jnp.float32), k.astype(jnp.float32))
  logits = jnp.where(mask[:, None, None], logits * head_dim ** -0.5, jnp.finfo(jnp.float32).min)
  probs = jnp.where(mask[:, None, None].any(-1, keepdims=True), jax.nn.softmax(logits, -1), 0.0)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v)
  return out.reshape(batch, q_len, num_q_heads, head_dim)


def test_fused_attention_equals_the_einsum_path_without_repeating_kv():
  """`jax.nn.dot_product_attention` gives the earlier path's values and gradients (fp32, CPU),
  tracks the float64 reference in bf16, and never materialises K/V repeated to Hq heads."""
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.standard_normal((2, 6, 6, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, 9, 2, 8)), jnp.float32) for _ in range(2))
  mask = rng.random((2, 6, 9)) > 0.4
  mask[1, 4] = False
  for fn in (qwen25vl.dot_product_attention, _grouped_einsum_attention):
    np.testing.assert_allclose(np.asarray(fn(q, k, v, mask)),
                               _attention_reference(*map(np.asarray, (q, k, v)), mask), atol=1e-5)
  loss = lambda fn: jax.grad(lambda *a: jnp.sum(fn(*a, mask) ** 2), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(loss(qwen25vl.dot_product_attention), loss(_grouped_einsum_attention)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  bf16 = np.asarray(qwen25vl.dot_product_attention(
      *(x.astype(jnp.bfloat16) for x in (q, k, v)), mask), np.float32)
  reference = _attention_reference(*(np.asarray(x, np.float64) for x in (q, k, v)), mask)
  assert np.abs(bf16 - reference).max() < 0.05  # bf16 inputs/outputs, fp32 softmax.
  def shapes(jaxpr):  # Output shapes of every equation, nested jaxprs included.
    for eqn in jaxpr.eqns:
      yield from (tuple(var.aval.shape) for var in eqn.outvars)
      for param in eqn.params.values():
        if isinstance(param, jax.extend.core.ClosedJaxpr):
          yield from shapes(param.jaxpr)

  traced = jax.make_jaxpr(lambda *a: qwen25vl.dot_product_attention(*a, mask))(q, k, v)
  seen = set(shapes(traced.jaxpr))
  assert (2, 6, 6, 8) in seen and (2, 9, 6, 8) not in seen  # No [B, Lk, Hq, D] copy of K/V.


# ---------------------------------------------------------------------------------------------
# Position ids.


def test_get_rope_index_matches_hf(hf_model, flax_model):
  model, _ = flax_model
  ids, mask, _, grid = multimodal_batch(model.config)
  positions, deltas = qwen25vl.get_rope_index(ids, grid, mask, model.config)
  with torch.no_grad():
    hf_positions, hf_deltas = hf_model.model.get_rope_index(
        torch.tensor(ids), image_grid_thw=torch.tensor(grid), attention_mask=torch.tensor(mask),
        mm_token_type_ids=torch.tensor((ids == model.config.image_token_id).astype(np.int64)))
  np.testing.assert_array_equal(positions, hf_positions.numpy())
  np.testing.assert_array_equal(deltas, hf_deltas.numpy())
  # Text-only prompts: left-padded positions count valid tokens.
  text_positions, text_deltas = qwen25vl.get_rope_index(ids[:, -3:], None, [[0, 1, 1], [1, 1, 1]],
                                                        model.config)
  np.testing.assert_array_equal(text_positions[0], [[0, 0, 1], [0, 1, 2]])
  np.testing.assert_array_equal(text_deltas, [[0], [0]])


def test_get_rope_index_rejects_wrong_grid_count(flax_model):
  model, _ = flax_model
  ids, mask, _, grid = multimodal_batch(model.config)
  with pytest.raises(ValueError, match="grids"):
    qwen25vl.get_rope_index(ids, grid[:1], mask, model.config)
  with pytest.raises(ValueError, match="exactly one grid per image"):
    qwen25vl.get_rope_index(ids, np.concatenate([grid, grid[:1]]), mask, model.config)


# ---------------------------------------------------------------------------------------------
# Forward parity.


def test_text_only_parity_left_padding(hf_model, flax_model):
  model, params = flax_model
  rng = np.random.default_rng(4)
  ids, mask = _left_pad([rng.integers(0, 490, 9).tolist(), rng.integers(0, 490, 5).tolist()])
  positions = qwen25vl.text_position_ids(mask)
  out = model.apply({"params": params}, ids, mask, position_ids=positions)
  hf_logits, hf_hidden = _hf_forward(hf_model, ids, mask, model.config, position_ids=positions)
  valid = mask.astype(bool)
  assert _max_err(out["hidden_states"], hf_hidden, valid) < PARITY_TOL
  assert _max_err(out["logits"], hf_logits, valid) < PARITY_TOL


def test_multimodal_parity_two_images_left_padding(hf_model, flax_model):
  """The acceptance case: two images of different sizes, two prompts, left padding."""
  model, params = flax_model
  ids, mask, pixel_values, grid = multimodal_batch(model.config)
  out = model.apply({"params": params}, ids, mask, pixel_values, grid)
  hf_logits, hf_hidden = _hf_forward(hf_model, ids, mask, model.config, pixel_values, grid)
  valid = mask.astype(bool)
  hidden_err = _max_err(out["hidden_states"], hf_hidden, valid)
  logits_err = _max_err(out["logits"], hf_logits, valid)
  print(f"multimodal parity: hidden {hidden_err:.2e}, logits {logits_err:.2e}")
  assert hidden_err < PARITY_TOL and logits_err < PARITY_TOL
  assert np.all(np.isfinite(np.asarray(out["logits"])))


def test_jitted_forward_matches_eager(flax_model):
  model, params = flax_model
  ids, mask, pixel_values, grid = multimodal_batch(model.config)
  positions, _ = qwen25vl.get_rope_index(ids, grid, mask, model.config)
  forward = jax.jit(lambda p, i, m, x, pos: model.apply({"params": p}, i, m, x, grid, pos))
  jitted = forward(params, ids, mask, pixel_values, positions)
  eager = model.apply({"params": params}, ids, mask, pixel_values, grid)
  np.testing.assert_allclose(jitted["logits"], eager["logits"], atol=1e-5)


def test_position_ids_needed_under_jit(flax_model):
  model, params = flax_model
  ids, mask, pixel_values, grid = multimodal_batch(model.config)
  forward = jax.jit(lambda p, i, m, x: model.apply({"params": p}, i, m, x, grid))
  with pytest.raises(ValueError, match="get_rope_index"):
    forward(params, ids, mask, pixel_values)


def test_image_token_count_mismatch_raises(flax_model):
  model, params = flax_model
  ids, mask, pixel_values, grid = multimodal_batch(model.config)
  ids = ids.copy()
  ids[0, -1] = model.config.image_token_id  # One image token too many.
  positions = qwen25vl.text_position_ids(mask)
  with pytest.raises(ValueError, match="image tokens"):
    model.apply({"params": params}, ids, mask, pixel_values, grid, positions)


# ---------------------------------------------------------------------------------------------
# KV cache.


def test_per_sample_image_features_equal_the_global_order():
  """`per_sample` places sample b's features at its image tokens like the global order does; a
  concrete uneven batch falls back to the global order, a traced one gets NaN for that sample."""
  image_id, rng = 7, np.random.default_rng(0)
  ids = np.array([[1, 7, 7, 2, 7, 3], [7, 7, 7, 4, 5, 6]], np.int32)  # 3 image tokens each
  base = jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32)
  features = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  want = qwen25vl.scatter_image_features(base, ids, features, image_id)
  np.testing.assert_array_equal(
      qwen25vl.scatter_image_features(base, ids, features, image_id, per_sample=True), want)
  traced = jax.jit(lambda i: qwen25vl.scatter_image_features(base, i, features, image_id, True))
  np.testing.assert_array_equal(traced(ids), want)
  np.testing.assert_array_equal(want[0, 1], features[0])
  np.testing.assert_array_equal(want[1, 0], features[3])

  uneven = np.array([[7, 7, 7, 7, 1, 2], [7, 7, 3, 4, 5, 6]], np.int32)  # 4 + 2 image tokens
  np.testing.assert_array_equal(
      qwen25vl.scatter_image_features(base, uneven, features, image_id, per_sample=True),
      qwen25vl.scatter_image_features(base, uneven, features, image_id))
  assert np.isnan(np.asarray(traced(uneven))).all()
  assert qwen25vl.images_split_evenly(np.array([[1, 4, 4]] * 4), 2)
  assert not qwen25vl.images_split_evenly(np.array([[1, 4, 4]] * 3), 2)
  assert not qwen25vl.images_split_evenly(np.array([[1, 4, 4], [1, 4, 6]]), 2)


def test_kv_cache_prefill_then_decode_equals_full_forward(flax_model):
  """Prefill the prompt (with its images) then feed 3 tokens one at a time under jit."""
  model, params = flax_model
  ids, mask, pixel_values, grid = multimodal_batch(model.config)
  num_decode = 3
  positions, _ = qwen25vl.get_rope_index(ids, grid, mask, model.config)
  full = model.apply({"params": params}, ids, mask, pixel_values, grid, positions)

  prefill_len = ids.shape[1] - num_decode
  cache = qwen25vl.KVCache.init(model.config.text, ids.shape[0], ids.shape[1] + 2)
  prefill = model.apply({"params": params}, ids[:, :prefill_len], mask[:, :prefill_len],
                        pixel_values, grid, positions[:, :, :prefill_len], cache)
  step = jax.jit(lambda p, i, m, pos, c: model.apply({"params": p}, i, m, None, None, pos, c))
  cache, step_logits = prefill["cache"], [prefill["logits"]]
  for t in range(prefill_len, ids.shape[1]):
    out = step(params, ids[:, t:t + 1], mask[:, t:t + 1], positions[:, :, t:t + 1], cache)
    cache = out["cache"]
    step_logits.append(out["logits"])
  assert int(cache.index) == ids.shape[1]
  valid = mask.astype(bool)
  assert _max_err(jnp.concatenate(step_logits, axis=1), full["logits"], valid) < 1e-5
  # Generation-style positions (valid count + rope delta of the prompt) agree for text tokens.
  _, deltas = qwen25vl.get_rope_index(ids[:, :prefill_len], grid, mask[:, :prefill_len],
                                      model.config)
  for t in range(prefill_len, ids.shape[1]):
    np.testing.assert_array_equal(
        qwen25vl.decode_position_ids(mask[:, :t].sum(1), deltas), positions[:, :, t:t + 1])
  with pytest.raises(ValueError, match="decode_position_ids"):
    model.apply({"params": params}, ids[:, -1:], mask[:, -1:], cache=cache)


# ---------------------------------------------------------------------------------------------
# Sharding annotations.


def test_every_parameter_has_known_logical_axes():
  config = qwen25vl.Qwen25VLConfig.from_config_dict(backbone_preset("tiny"))
  abstract = hf_loading.abstract_params(config)
  sharding.check_logical_names(abstract, LOGICAL_AXIS_RULES)
  boxed = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)
                          or hasattr(x, "names"))
  assert all(hasattr(leaf, "names") for leaf in boxed), "a parameter has no logical axes"
  layer = abstract["model"]["layers"]["self_attn"]  # Stacked on a leading `layers` axis.
  assert layer["q_proj"]["kernel"].names == ("layers", "embed", "heads", "kv")
  assert layer["k_proj"]["kernel"].names == ("layers", "embed", "kv_heads", "kv")
  assert layer["o_proj"]["kernel"].names == ("layers", "heads", "kv", "embed")


def test_decoder_layer_halves_compose_to_the_layer(flax_model):
  """`out(hidden, attention(qkv(hidden)))` with AsyMoT-style extra keys masked out."""
  model, params = flax_model
  text = model.config.text
  layer = qwen25vl.DecoderLayer(text)
  layer_params = {"params": jax.tree.map(lambda x: x[0], params["model"]["layers"])}
  rng = np.random.default_rng(5)
  hidden = rng.standard_normal((2, 6, text.hidden_size)).astype(np.float32)
  mask = np.asarray(qwen25vl.causal_padding_mask(np.ones((2, 6))))
  cos, sin = qwen25vl.mrope_cos_sin(qwen25vl.text_position_ids(np.ones((2, 6))), text.head_dim,
                                    text.rope_theta, text.mrope_section)
  whole, _ = layer.apply(layer_params, hidden, cos, sin, mask)
  q, k, v = layer.apply(layer_params, hidden, cos, sin, method="qkv")
  # Extra keys/values (as another stream would supply) that the mask hides change nothing.
  extra = rng.standard_normal((2, 3, text.num_key_value_heads, text.head_dim)).astype(np.float32)
  joint_mask = np.concatenate([np.zeros((2, 6, 3), bool), mask], axis=-1)
  attn = qwen25vl.dot_product_attention(q, np.concatenate([extra, k], 1),
                                        np.concatenate([extra, v], 1), joint_mask)
  halves = layer.apply(layer_params, hidden, attn, method="out")
  np.testing.assert_allclose(halves, whole, atol=1e-5)


@pytest.mark.parametrize("with_images", [False, True])
def test_sharded_forward_matches_single_device(tiny_hf_checkpoint, flax_model, with_images):
  """Params loaded onto a (fsdp=2, tensor=2) mesh; jitted forward under the logical rules."""
  import flax.linen as nn
  model, params = flax_model
  mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2), devices=jax.devices()[:4])
  rules = sharding.logical_axis_rules(LOGICAL_AXIS_RULES, mesh)
  sharded = hf_loading.load_params(tiny_hf_checkpoint, model.config, mesh=mesh, rules=rules)
  ids, mask, pixel_values, grid = multimodal_batch(model.config)
  if not with_images:
    pixel_values, grid = None, None
    ids = np.where(ids == model.config.image_token_id, 7, ids)
  positions, _ = qwen25vl.get_rope_index(ids, grid, mask, model.config)
  forward = jax.jit(lambda p, i, m, x, pos: model.apply({"params": p}, i, m, x, grid, pos))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    logits = forward(sharded, ids, mask, pixel_values, positions)["logits"]
  expected = model.apply({"params": params}, ids, mask, pixel_values, grid)["logits"]
  np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_bfloat16_forward_tracks_float32(tiny_hf_checkpoint, flax_model):
  """bf16 params and compute: logits within 5% of the fp32 logits' range (bf16 has 8 bits)."""
  model, params = flax_model
  bf16_model, bf16_params = hf_loading.load_pretrained(tiny_hf_checkpoint, dtype=jnp.bfloat16)
  ids, mask, pixel_values, grid = multimodal_batch(model.config)
  out = bf16_model.apply({"params": bf16_params}, ids, mask, pixel_values, grid)
  expected = np.asarray(model.apply({"params": params}, ids, mask, pixel_values, grid)["logits"])
  assert out["logits"].dtype == jnp.bfloat16
  valid = mask.astype(bool)
  error = _max_err(np.asarray(out["logits"], np.float32), expected, valid)
  assert error < 0.05 * np.abs(expected[valid]).max()
