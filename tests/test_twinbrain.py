"""TwinBrainVLA: AsyMoT semantics, gradient isolation, sampler, and learning on a fixed batch."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fixtures_flops import dot_general_flops
from fixtures_twinbrain import TINY_PRESETS, init_model, make_obs, tiny_config, twinbrain_configs
from twinbrain_jax.models import asymot, backbones
from twinbrain_jax.models.twinbrain import (TwinBrainConfig, TwinBrainVLA, compute_loss,
                                            init_right_from_left, sample_actions,
                                            scanned_params_from_unrolled, synthetic_observation,
                                            train_step_flops)


@pytest.fixture(scope="module", params=TINY_PRESETS)
def tiny(request):
  """Both backbone families: Qwen2.5-VL and Qwen3-VL (DeepStack in both brains)."""
  config = tiny_config(request.param)
  obs, grid = make_obs(config)
  model, params = init_model(config, obs, grid)
  return config, model, params, obs, grid


def _brains(model, params, obs, grid):
  return jax.jit(lambda p, o: model.apply({"params": p}, o, grid, method=TwinBrainVLA.brains))(
      params, obs)


def test_left_brain_equals_standalone_backbone(tiny):
  config, model, params, obs, grid = tiny
  hidden_left, _ = _brains(model, params, obs, grid)
  standalone = backbones.model_class(config.backbone)(config.backbone).apply(
      {"params": params["left"]}, obs["left_input_ids"], obs["left_attention_mask"],
      obs["pixel_values"], grid, position_ids=obs["left_position_ids"])["hidden_states"]
  valid = obs["left_attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(hidden_left)[valid], np.asarray(standalone)[valid],
                             atol=1e-5, rtol=0)


def test_gradients_never_reach_the_left_brain(tiny):
  config, model, params, obs, grid = tiny
  batch = dict(obs, actions=np.random.default_rng(1).normal(size=(2, 16, 7)).astype(np.float32),
               action_mask=np.ones((2, 16), bool))
  loss_fn = lambda p: compute_loss(model, p, batch, grid, jax.random.key(3), num_repeats=2)
  grads = jax.jit(jax.grad(loss_fn))(params)
  left_norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["left"])]
  assert len(left_norms) > 10 and max(left_norms) == 0.0
  # The right brain, state encoder and expert all learn.
  for part in ("right", "state_encoder", "action_expert"):
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[part])) > 0, part

  # A few optimizer steps that update only the trainable parts leave the left params bit-identical.
  labels = {k: ("frozen" if k == "left" else "train") for k in params}
  tx = optax.multi_transform({"train": optax.adamw(1e-2), "frozen": optax.set_to_zero()}, labels)
  opt_state = tx.init(params)

  @jax.jit
  def step(p, s):
    g = jax.grad(loss_fn)(p)
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  new = params
  for _ in range(3):
    new, opt_state = step(new, opt_state)
  for a, b in zip(jax.tree.leaves(params["left"]), jax.tree.leaves(new["left"])):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(params["right"]["model"]["norm"]["scale"]),
                            np.asarray(new["right"]["model"]["norm"]["scale"]))


def test_joint_attention_is_live_in_all_left_mode(tiny):
  config, model, params, obs, grid = tiny
  _, right = _brains(model, params, obs, grid)
  changed = dict(obs, left_input_ids=obs["left_input_ids"].copy())
  changed["left_input_ids"][:, -2:] = 7  # Change the last two instruction tokens of the left brain.
  _, right_changed = _brains(model, params, changed, grid)
  valid = obs["right_attention_mask"].astype(bool)
  diff = np.abs(np.asarray(right) - np.asarray(right_changed))[valid].max()
  assert diff > 1e-3


def test_right_tokens_cannot_see_left_padding(tiny):
  config, model, params, obs, grid = tiny
  pad = ~obs["left_attention_mask"].astype(bool)
  assert pad.any(), "the fixture must left-pad at least one prompt"
  _, right = _brains(model, params, obs, grid)
  changed = dict(obs, left_input_ids=np.where(pad, 123, obs["left_input_ids"]))
  _, right_changed = _brains(model, params, changed, grid)
  valid = obs["right_attention_mask"].astype(bool)
  np.testing.assert_array_equal(np.asarray(right)[valid], np.asarray(right_changed)[valid])


@pytest.mark.parametrize("tiny", ["qwen3vl_tiny"], indirect=True)  # DeepStack is Qwen3-VL's.
def test_qwen3vl_deepstack_feeds_each_brains_own_stream(tiny):
  """Each brain adds the DeepStack maps of its own vision tower: changing the right brain's
  DeepStack merger moves only the right stream; changing the left one's moves the left stream."""
  config, model, params, obs, grid = tiny
  assert config.backbone.family == "qwen3vl"
  left, right = _brains(model, params, obs, grid)

  def scaled(side):
    tree = jax.tree.map(lambda x: x, params)
    merger = tree[side]["visual"]["deepstack_merger_list_0"]["linear_fc2"]
    merger["bias"] = merger["bias"] + 0.5
    return tree

  left_r, right_r = _brains(model, scaled("right"), obs, grid)
  left_l, _ = _brains(model, scaled("left"), obs, grid)
  valid_left = obs["left_attention_mask"].astype(bool)
  valid_right = obs["right_attention_mask"].astype(bool)
  np.testing.assert_array_equal(np.asarray(left_r), np.asarray(left))
  assert np.abs(np.asarray(right_r) - np.asarray(right))[valid_right].max() > 1e-3
  assert np.abs(np.asarray(left_l) - np.asarray(left))[valid_left].max() > 1e-3


def test_mask_modes_on_a_hand_checked_case():
  # Left: [pad, l1, l2]; right: [r0, r1].
  left_valid = np.array([[0, 1, 1]])
  right_valid = np.array([[1, 1]])
  T, F = True, False
  left_self = [[F, F, F], [F, T, F], [F, T, T]]
  right_self = [[T, F], [T, T]]
  expected_right = {
      # every valid left token
      "all_left": [[F, T, T] + right_self[0], [F, T, T] + right_self[1]],
      # right i sees left j <= i (by array index), valid only
      "index_causal": [[F, F, F] + right_self[0], [F, T, F] + right_self[1]],
      "full_joint": [[F, T, T] + right_self[0], [F, T, T] + right_self[1]],
  }
  for mode, right in expected_right.items():
    masks = asymot.joint_masks(left_valid, right_valid, mode)
    np.testing.assert_array_equal(masks.right[0], np.array(right), err_msg=mode)
    if mode == "full_joint":
      # Left queries also see every valid right token (left padding sees nothing).
      expected_left = [row + [F, F] if i == 0 else row + [T, T] for i, row in enumerate(left_self)]
      np.testing.assert_array_equal(masks.left[0], np.array(expected_left))
    else:
      np.testing.assert_array_equal(masks.left[0], np.array(left_self))
  with pytest.raises(ValueError, match="Unknown AsyMoT mask mode 'causal'"):
    asymot.joint_masks(left_valid, right_valid, "causal")


def test_joint_attention_matches_float64_reference():
  rng = np.random.default_rng(0)
  b, lo, lq, hq, hkv, d = 2, 5, 3, 4, 2, 8
  q = rng.normal(size=(b, lq, hq, d))
  ko, vo = rng.normal(size=(2, b, lo, hkv, d))
  kq, vq = rng.normal(size=(2, b, lq, hkv, d))
  mask = rng.uniform(size=(b, lq, lo + lq)) > 0.3
  mask[..., 0] = True
  out = asymot.joint_attention(*(jnp.asarray(x, jnp.float32) for x in (q, ko, vo, kq, vq)),
                               jnp.asarray(mask))
  k = np.concatenate([ko, kq], 1).repeat(hq // hkv, axis=2)
  v = np.concatenate([vo, vq], 1).repeat(hq // hkv, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
  logits = np.where(mask[:, None], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  expected = np.einsum("bhqk,bkhd->bqhd", probs, v)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_monolithic_variant_has_no_left_brain():
  config = tiny_config(variant="monolithic")
  obs, grid = make_obs(config)
  _, params = init_model(config, obs, grid)
  assert "left" not in params and "right" in params


def test_sampler_is_deterministic_and_converges_with_more_steps(tiny):
  config, model, params, obs, grid = tiny
  sample = jax.jit(functools.partial(sample_actions, model), static_argnames=("num_steps",))
  sample = lambda steps, seed=0: np.asarray(jax.jit(
      lambda p, o, r: sample_actions(model, p, o, grid, r, num_steps=steps))(
          params, obs, jax.random.key(seed)), np.float64)
  a, b = sample(4), sample(4)
  np.testing.assert_array_equal(a, b)
  assert np.abs(sample(4, seed=1) - a).max() > 1e-3
  reference = sample(128)
  errors = [np.abs(sample(n) - reference).max() for n in (2, 8, 32)]
  assert errors[0] > errors[1] > errors[2], errors


def test_right_brain_init_copies_left_with_mean_special_tokens(tiny):
  config, model, params, obs, grid = tiny
  right = init_right_from_left(params["left"], config, num_real_tokens=400)
  table = np.asarray(params["left"]["model"]["embed_tokens"]["embedding"])
  new = np.asarray(right["model"]["embed_tokens"]["embedding"])
  np.testing.assert_allclose(new[config.action_token_id], table[:400].mean(0), atol=1e-8)
  np.testing.assert_allclose(new[config.propri_token_id], table[:400].mean(0), atol=1e-8)
  untouched = np.setdiff1d(np.arange(len(table)), [config.action_token_id, config.propri_token_id])
  np.testing.assert_array_equal(new[untouched], table[untouched])


def _overfit(config, num_steps):
  """Adam on one fixed batch of 4 smooth chunks: (per-step losses, |sampled - target| mean)."""
  obs, grid = make_obs(config, text_lengths=(4, 6, 5, 7), seed=5)
  model, params = init_model(config, obs, grid, seed=1)
  rng = np.random.default_rng(2)
  # Smooth target chunks in [-1, 1], different per sample.
  steps = np.linspace(0, 1, 16)[None, :, None]
  actions = np.sin(2 * np.pi * (steps * rng.uniform(0.5, 1.5, (4, 1, 7)) + rng.uniform(0, 1, (4, 1, 7))))
  batch = dict(obs, actions=actions.astype(np.float32), action_mask=np.ones((4, 16), bool))
  trainable = {k: v for k, v in params.items() if k != "left"}
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0, 3e-3, 20, 400, 1e-4))
  opt_state = tx.init(trainable)

  @jax.jit
  def step(trainable, opt_state, rng):
    loss_fn = lambda tr: compute_loss(model, dict(tr, left=params["left"]), batch, grid, rng,
                                      num_repeats=8)
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  losses = []
  for i in range(num_steps):
    trainable, opt_state, loss = step(trainable, opt_state, jax.random.key(i))
    losses.append(float(loss))
  sampled = jax.jit(lambda p, o: sample_actions(model, p, o, grid, jax.random.key(0), num_steps=8))(
      dict(trainable, left=params["left"]), obs)
  return np.array(losses), np.abs(np.asarray(sampled, np.float32) - actions).mean()


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tiny_model_overfits_a_fixed_batch(preset):
  losses, error = _overfit(tiny_config(preset), 400)
  first, last = np.mean(losses[:10]), np.mean(losses[-20:])
  print(f"flow loss {first:.4f} -> {last:.4f} ({first / last:.0f}x); sampled |error| {error:.4f}")
  assert last < first / 10, (first, last)
  assert error < 0.1, error


@pytest.mark.slow
def test_bfloat16_compute_tracks_float32_training():
  """bf16 compute with fp32 params and Adam state (model.dtype="bfloat16"; softmax, norms and
  the loss in fp32): the 100-step loss trajectory stays within 10 % (per 10-step window) of the
  fp32 one, and the 400-step overfit reaches the fp32 criteria."""
  reference, _ = _overfit(tiny_config(), 100)
  losses, error = _overfit(tiny_config(dtype="bfloat16"), 400)
  windows = lambda x: x[:100].reshape(10, 10).mean(1)  # noqa: E731
  relative = np.abs(windows(losses) / windows(reference) - 1)
  first, last = np.mean(losses[:10]), np.mean(losses[-20:])
  print(f"bf16 vs fp32 loss, per 10-step window: max relative gap {relative.max():.3f}; "
        f"bf16 overfit {first:.4f} -> {last:.4f}, sampled |error| {error:.4f}")
  assert relative.max() < 0.1, relative
  assert last < first / 10 and error < 0.1, (first, last, error)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_the_same_loss_and_gradients(tiny, policy):
  """`remat_policy` of the right brain's layers, the vision blocks and the expert's blocks."""
  config, _, params, obs, grid = tiny

  def with_policy(name):
    expert = dataclasses.replace(config.action_expert, remat_policy=name)
    return TwinBrainVLA(dataclasses.replace(config, remat_policy=name, action_expert=expert))

  batch = dict(obs, actions=np.zeros((2, 16, 7), np.float32), action_mask=np.ones((2, 16), bool))
  grad = lambda m: jax.jit(jax.value_and_grad(
      lambda p: compute_loss(m, p, batch, grid, jax.random.key(0), num_repeats=2)))(params)
  # `none` keeps every activation.
  (loss, grads), (remat_loss, remat_grads) = grad(with_policy("none")), grad(with_policy(policy))
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  # fp32: recomputation may fuse differently (entries of ~3 differ by ~1 ulp; with Qwen3-VL the
  # <|action|> embedding row, a sum over 16 query positions, moves by up to 1.5e-6).
  trainable = lambda g: {k: v for k, v in g.items() if k != "left"}  # noqa: E731
  for a, b in zip(jax.tree.leaves(trainable(grads)), jax.tree.leaves(trainable(remat_grads))):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-6, rtol=1e-6)


def test_the_expert_takes_the_model_remat_policy_unless_set():
  assert tiny_config(remat_policy="full").action_expert.remat_policy == "full"
  model = twinbrain_configs.get_config("tiny").model
  model.remat_policy = "dots"
  model.action_expert.remat_policy = "none"
  config = TwinBrainConfig.from_config_dict(model)
  assert (config.remat_policy, config.action_expert.remat_policy) == ("dots", "none")


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_scanned_layers_give_the_unrolled_loss_and_gradients(preset):
  """One scan over both brains' layers (AsyMoT step i reads layer i of each; with Qwen3-VL
  it also adds each brain's DeepStack map i while i < K), the vision blocks (Qwen3-VL: collecting
  the DeepStack blocks' outputs) and the expert's (cross, self) block pairs computes what the
  unrolled model does. (Scanned remat: `test_remat_gives_the_same_loss_and_gradients`; the
  single-brain scan: the backbone's parity tests.)"""
  unrolled_config = tiny_config(preset, scan_layers=False)
  scanned_config = tiny_config(preset)
  obs, grid = make_obs(scanned_config)
  unrolled, params = init_model(unrolled_config, obs, grid)
  assert "layers_1" in params["right"]["model"] and "block_1" in params["action_expert"]
  scanned = TwinBrainVLA(scanned_config)
  scanned_params = scanned_params_from_unrolled(params, scanned_config)
  _, fresh = init_model(scanned_config, obs, grid)  # The scanned model's own layout.
  assert jax.tree.structure(fresh) == jax.tree.structure(scanned_params)
  assert jax.tree.map(np.shape, fresh) == jax.tree.map(np.shape, scanned_params)
  batch = dict(obs, actions=np.random.default_rng(1).normal(size=(2, 16, 7)).astype(np.float32),
               action_mask=np.ones((2, 16), bool))
  grad = lambda m, p: jax.jit(jax.value_and_grad(
      lambda p: compute_loss(m, p, batch, grid, jax.random.key(0), num_repeats=2)))(p)
  (loss, grads), (scanned_loss, scanned_grads) = grad(unrolled, params), grad(scanned,
                                                                             scanned_params)
  # fp32; the two differ only in XLA's fusion and summation order.
  np.testing.assert_allclose(scanned_loss, loss, rtol=1e-5)
  want = scanned_params_from_unrolled(grads, scanned_config)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0],
                          jax.tree.leaves(scanned_grads)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-6, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(want["right"]["model"]["layers"])) > 0


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("variant", ["twinbrain", "monolithic"])
def test_analytic_brain_flops_match_the_traced_matmuls(variant, preset):
  """`train_step_flops`' forward brain FLOPs equal the dot_general FLOPs of the traced brains
  (unrolled: a scanned vision tower picks its attention by `cond`, which a trace cannot count)."""
  config = tiny_config(preset, variant=variant, scan_layers=False)
  obs, grid = synthetic_observation(config, (24, 20), (1, 16, 16))
  model = TwinBrainVLA(config)
  noisy, t = jnp.zeros((2, 16, 7)), jnp.zeros(2)
  params = jax.eval_shape(lambda r: model.init(r, obs, grid, noisy, t)["params"], jax.random.key(0))
  traced = jax.make_jaxpr(lambda p, o: model.apply({"params": p}, o, grid,
                                                   method=TwinBrainVLA.brains))(params, obs)
  flops = train_step_flops(config, 2, obs["left_input_ids"].shape[1],
                           obs["right_input_ids"].shape[1], 256, num_repeats=1)
  # `right` counts forward + backward (3x the forward); the frozen left brain only its forward.
  assert flops["left"] + flops["right"] // 3 == dot_general_flops(traced.jaxpr)
  assert (flops["left"] == 0) == (variant == "monolithic")
