"""The flow-matching DiT action expert: embeddings, context caching and masking, parameter
annotations, analytic FLOPs, and a small overfitting run through the loss and the sampler."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.twinbrain import LOGICAL_AXIS_RULES
from fixtures_flops import dot_general_flops
from twinbrain_jax import flow_matching as fm
from twinbrain_jax import sharding
from twinbrain_jax.models.dit import (ActionExpert, ActionExpertConfig, action_expert_flops,
                                      scanned_expert_params, sinusoidal_embedding)

BATCH, CONTEXT_LEN = 3, 5


def _config(**overrides) -> ActionExpertConfig:
  base = dict(num_layers=3, num_heads=2, head_dim=8, action_dim=3, action_horizon=4, state_dim=2,
              num_future_tokens=2, context_dim=6, timestep_embed_dim=16, hidden_dim=12,
              dropout=0.0)
  return ActionExpertConfig(**{**base, **overrides})


def _inputs(config: ActionExpertConfig, seed: int = 0, batch: int = BATCH):
  rng = np.random.default_rng(seed)
  return dict(
      noisy_actions=jnp.asarray(rng.normal(size=(batch, config.action_horizon, config.action_dim)),
                                jnp.float32),
      t=jnp.asarray(rng.uniform(0, 1, batch), jnp.float32),
      context=jnp.asarray(rng.normal(size=(batch, CONTEXT_LEN, config.context_dim)), jnp.float32),
      state=jnp.asarray(rng.normal(size=(batch, config.state_dim)), jnp.float32))


def _init(config, inputs, seed=0):
  model = ActionExpert(config)
  boxed = model.init(jax.random.key(seed), inputs["noisy_actions"], inputs["t"],
                     context=inputs["context"], state=inputs["state"])
  return model, boxed, nn.unbox(boxed)


@functools.partial(jax.jit, static_argnames=("model", "deterministic"))
def _apply(model, params, inputs, context_mask=None, embodiment_id=None, deterministic=True,
           dropout_rng=None):
  """The jitted forward (one compile per model and input shapes; eager runs are slower)."""
  return model.apply(params, inputs["noisy_actions"], inputs["t"], context=inputs["context"],
                     state=inputs["state"], context_mask=context_mask,
                     embodiment_id=embodiment_id, deterministic=deterministic,
                     rngs=None if dropout_rng is None else {"dropout": dropout_rng})


def test_sinusoidal_embedding_matches_numpy_reference():
  """Both GR00T variants against float64 numpy; 1e-4 absolute (float32 angles up to 1000 rad)."""
  steps = np.array([0, 1, 250, 999, 1000], np.float64)

  def reference(dim, freq_shift, cos_first):
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - freq_shift))
    angles = steps[:, None] * freqs
    parts = [np.cos(angles), np.sin(angles)]
    return np.concatenate(parts if cos_first else parts[::-1], axis=-1)

  np.testing.assert_allclose(
      sinusoidal_embedding(jnp.asarray(steps), 256, freq_shift=1.0, cos_first=True),
      reference(256, 1.0, True), atol=1e-4)
  np.testing.assert_allclose(
      sinusoidal_embedding(jnp.asarray(steps), 64), reference(64, 0.0, False), atol=1e-4)


def test_output_shape_and_cached_context_equals_uncached():
  config = _config()
  inputs = _inputs(config)
  model, _, params = _init(config, inputs)
  direct = _apply(model, params, inputs)
  assert direct.shape == (BATCH, config.action_horizon, config.action_dim)

  kv = jax.jit(lambda p, c: model.apply(p, c, method=ActionExpert.context_kv))(
      params, inputs["context"])
  assert len(kv) == config.num_cross_blocks == 2        # blocks 0 and 2 cross-attend
  assert kv[0][0].shape == (BATCH, CONTEXT_LEN, config.num_heads, config.head_dim)
  cached = jax.jit(lambda p, kv, x: model.apply(
      p, x["noisy_actions"], x["t"], context_kv=kv, state=x["state"]))(params, kv, inputs)
  np.testing.assert_allclose(cached, direct, rtol=0, atol=1e-6)

  # A different context gives a different velocity (the cache is not a constant).
  other = dict(inputs, context=inputs["context"] + 1.0)
  assert np.abs(np.asarray(_apply(model, params, other) - direct)).max() > 1e-3


def test_masked_context_tokens_do_not_affect_the_output():
  config = _config()
  inputs = _inputs(config)
  model, _, params = _init(config, inputs)
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
  base = _apply(model, params, inputs, context_mask=mask)

  # Overwrite every masked token with large values: outputs must not move (exact zero weights).
  noise = 100 * jax.random.normal(jax.random.key(1), inputs["context"].shape)
  garbled = dict(inputs, context=jnp.where(mask[..., None], inputs["context"], noise))
  np.testing.assert_allclose(_apply(model, params, garbled, context_mask=mask), base, rtol=0,
                             atol=1e-6)

  # Changing a valid token does move the output of that example only.
  changed = dict(inputs, context=inputs["context"].at[0, 1].add(3.0))
  diff = np.abs(np.asarray(_apply(model, params, changed, context_mask=mask) - base))
  assert diff[0].max() > 1e-3 and diff[1:].max() == 0.0

  # Without the mask the padding tokens would matter.
  unmasked = np.abs(np.asarray(_apply(model, params, garbled) - _apply(model, params, inputs)))
  assert unmasked.max() > 1e-3

  # A fully masked context stays finite.
  assert np.isfinite(np.asarray(_apply(model, params, inputs,
                                       context_mask=jnp.zeros_like(mask)))).all()


def test_every_param_has_known_logical_axes_and_sharded_forward_matches():
  config = _config(num_heads=2, head_dim=8, hidden_dim=16, context_dim=8)
  inputs = _inputs(config, batch=4)
  model, boxed, params = _init(config, inputs)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim
  sharding.check_logical_names(boxed, LOGICAL_AXIS_RULES)

  expected = _apply(model, params, inputs)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  rules = sharding.logical_axis_rules(LOGICAL_AXIS_RULES, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    sharded = jax.device_put(params, shardings)
    # The FSDP axis really splits the width-`embed` axis of the FF weights.
    spec = shardings["params"]["blocks"]["cross_attention"]["ff_up"]["kernel"].spec
    assert tuple(spec) == (None, "fsdp", "tensor")  # Blocks stacked on a leading axis.
    batch_inputs = jax.device_put(inputs, sharding.batch_sharding(mesh))
    # A fresh jit traced under the mesh and rules, so the logical constraints apply.
    out = jax.jit(lambda p, x: model.apply(
        p, x["noisy_actions"], x["t"], context=x["context"], state=x["state"]))(
            sharded, batch_inputs)
    assert out.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_bfloat16_compute_tracks_float32():
  """bf16 compute with fp32 params stays within 5 % (relative to the output scale) of fp32."""
  config = _config()
  inputs = _inputs(config)
  model, _, params = _init(config, inputs)
  reference = np.asarray(_apply(model, params, inputs))
  out = _apply(ActionExpert(config, dtype=jnp.bfloat16), params, inputs)
  assert out.dtype == jnp.bfloat16
  error = np.abs(np.asarray(out, np.float32) - reference).max()
  assert error < 0.05 * np.abs(reference).max(), error


@pytest.mark.parametrize("policy", ["dots", "full"])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_remat_gives_the_same_values_and_gradients(policy, scan_layers):
  config = _config(dropout=0.1, scan_layers=scan_layers)
  inputs = _inputs(config)
  model, _, params = _init(config, inputs)
  remat_model = ActionExpert(dataclasses.replace(config, remat_policy=policy))

  def grads(model):
    def loss(p):
      out = model.apply(p, inputs["noisy_actions"], inputs["t"], context=inputs["context"],
                        state=inputs["state"], deterministic=False,
                        rngs={"dropout": jax.random.key(3)})
      return jnp.sum(out ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  (value, grad), (remat_value, remat_grad) = grads(model), grads(remat_model)
  np.testing.assert_allclose(remat_value, value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               remat_grad, grad)


@pytest.mark.parametrize("overrides", [dict(num_layers=3), dict(interleave_self_attention=False)])
def test_scanned_blocks_give_the_unrolled_values_and_gradients(overrides):
  """(cross, self) block pairs as one `nn.scan` (an odd stack ends with an unscanned cross
  block), the cached context K/V included, compute what the unrolled blocks do."""
  config = _config(dropout=0.0, scan_layers=False, **overrides)
  inputs = _inputs(config)
  model, _, params = _init(config, inputs)
  scanned_config = dataclasses.replace(config, scan_layers=True)
  scanned = ActionExpert(scanned_config)
  scanned_params = {"params": scanned_expert_params(params["params"], scanned_config)}
  fresh = jax.eval_shape(lambda: nn.unbox(scanned.init(
      jax.random.key(0), inputs["noisy_actions"], inputs["t"], context=inputs["context"],
      state=inputs["state"])))
  assert jax.tree.map(np.shape, fresh) == jax.tree.map(np.shape, scanned_params)

  def value_and_grad(model, params):
    def loss(p):
      kv = model.apply(p, inputs["context"], method=ActionExpert.context_kv)
      out = model.apply(p, inputs["noisy_actions"], inputs["t"], context_kv=kv,
                        state=inputs["state"])
      return jnp.sum(out ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  (value, grad), (scanned_value, scanned_grad) = (value_and_grad(model, params),
                                                  value_and_grad(scanned, scanned_params))
  np.testing.assert_allclose(scanned_value, value, rtol=1e-5)
  want = {"params": scanned_expert_params(grad["params"], scanned_config)}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6), want,
               scanned_grad)


def test_interleaving_and_no_state_token():
  config = _config(num_layers=4, interleave_self_attention=False, state_dim=0)
  assert config.num_cross_blocks == 4 and config.num_prefix_tokens == 2
  inputs = _inputs(_config())
  model = ActionExpert(config)
  params = model.init(jax.random.key(0), inputs["noisy_actions"], inputs["t"],
                      context=inputs["context"])
  assert "state_encoder" not in params["params"]
  kv = model.apply(params, inputs["context"], method=ActionExpert.context_kv)
  assert len(kv) == 4


def test_per_embodiment_weights_select_the_right_slot():
  """A 2-embodiment model on id e equals a 1-embodiment model holding slot e's weights."""
  config = _config(num_embodiments=2)
  inputs = _inputs(config)
  model = ActionExpert(config)
  ids = jnp.array([0, 1, 1])
  params = nn.unbox(model.init(jax.random.key(0), inputs["noisy_actions"], inputs["t"],
                               context=inputs["context"], state=inputs["state"],
                               embodiment_id=ids))
  out = _apply(model, params, inputs, embodiment_id=ids)
  single = ActionExpert(dataclasses.replace(config, num_embodiments=1))
  embodiment_modules = ("state_encoder", "action_in", "action_mix", "action_out", "decoder")
  for e in (0, 1):
    sliced = {"params": {
        k: (jax.tree.map(lambda w, e=e: w[e:e + 1], v) if k in embodiment_modules else v)
        for k, v in params["params"].items()}}
    np.testing.assert_allclose(_apply(single, sliced, inputs)[ids == e], out[ids == e], rtol=0,
                               atol=1e-6)
  with pytest.raises(ValueError, match="embodiment_id"):
    _apply(model, params, inputs)


def test_dropout_is_active_only_when_not_deterministic():
  config = _config(dropout=0.5)
  inputs = _inputs(config)
  model, _, params = _init(config, inputs)
  a = _apply(model, params, inputs)
  b = _apply(model, params, inputs, deterministic=False, dropout_rng=jax.random.key(1))
  c = _apply(model, params, inputs, deterministic=False, dropout_rng=jax.random.key(2))
  np.testing.assert_array_equal(a, _apply(model, params, inputs))
  assert np.abs(np.asarray(a - b)).max() > 1e-3 and np.abs(np.asarray(b - c)).max() > 1e-3


def test_bad_inputs_raise_clear_errors():
  config = _config()
  inputs = _inputs(config)
  model, _, params = _init(config, inputs)
  with pytest.raises(ValueError, match="context_dim"):
    _apply(model, params, dict(inputs, context=inputs["context"][..., :4]))
  with pytest.raises(ValueError, match="state must be"):
    model.apply(params, inputs["noisy_actions"], inputs["t"], context=inputs["context"])
  with pytest.raises(ValueError, match="exactly one of"):
    model.apply(params, inputs["noisy_actions"], inputs["t"], state=inputs["state"])
  with pytest.raises(ValueError, match="action_horizon"):
    _apply(model, params, dict(inputs, noisy_actions=jnp.zeros((BATCH, 9, 3))))
  with pytest.raises(ValueError, match="context_mask"):
    _apply(model, params, inputs, context_mask=jnp.ones((BATCH, 2), bool))
  with pytest.raises(ValueError, match="num_heads"):
    ActionExpertConfig(num_heads=0)
  with pytest.raises(ValueError, match=r"ActionExpertConfig.remat_policy=True is not a remat policy"):
    ActionExpertConfig(remat_policy=True)


def test_config_from_config_dict():
  import ml_collections
  config = ActionExpertConfig.from_config_dict(
      ml_collections.ConfigDict(dict(num_layers=4, num_heads=4, head_dim=64, context_dim=512)))
  assert config.width == 256 and config.num_cross_blocks == 2
  with pytest.raises(ValueError, match="Unknown action expert config key"):
    ActionExpertConfig.from_config_dict(dict(num_layer=4))


@pytest.mark.parametrize("overrides", [{}, dict(state_dim=0, num_future_tokens=0),
                                       dict(interleave_self_attention=False, num_layers=2)])
def test_analytic_flops_match_the_traced_matmuls(overrides):
  """`action_expert_flops` equals the dot_general FLOPs of the traced forward, exactly."""
  config = _config(**overrides)
  inputs = _inputs(config)
  model, _, params = _init(config, inputs)
  traced = jax.make_jaxpr(lambda p, x: model.apply(
      p, x["noisy_actions"], x["t"], context=x["context"], state=x["state"]))(params, inputs)
  assert action_expert_flops(config, BATCH, CONTEXT_LEN) == dot_general_flops(traced.jaxpr)

  kv = model.apply(params, inputs["context"], method=ActionExpert.context_kv)
  cached = jax.make_jaxpr(lambda p, kv, x: model.apply(
      p, x["noisy_actions"], x["t"], context_kv=kv, state=x["state"]))(params, kv, inputs)
  assert (action_expert_flops(config, BATCH, CONTEXT_LEN, include_context_kv=False)
          == dot_general_flops(cached.jaxpr))


def test_tiny_expert_overfits_a_fixed_batch_and_samples_its_actions():
  """Flow loss on 4 fixed (context, state, actions) examples drops >= 10x in 600 Adam steps,
  and 4-step Euler samples from the trained expert land on the batch's actions.

  Tolerances (actions uniform in [-1, 1]): mean |error| < 0.08 and max |error| < 0.35 (seen:
  0.032 and 0.25; the loss fell 61x); an untrained sampler misses by ~0.9 on average.
  """
  config = _config(num_layers=2, num_heads=2, head_dim=16, context_dim=8, hidden_dim=32,
                   timestep_embed_dim=32)
  batch, repeats, steps = 4, 8, 600
  rng = np.random.default_rng(0)
  actions = jnp.asarray(rng.uniform(-1, 1, (batch, 4, 3)), jnp.float32)
  context = jnp.asarray(rng.normal(size=(batch, 3, 8)), jnp.float32)
  state = jnp.asarray(rng.normal(size=(batch, 2)), jnp.float32)
  model = ActionExpert(config)
  params = nn.unbox(model.init(jax.random.key(0), actions, jnp.zeros(batch), context=context,
                               state=state))

  def loss_fn(params, rng):
    # The context runs once; its K/V are tiled for the R noise draws.
    kv = model.apply(params, context, method=ActionExpert.context_kv)
    kv_r, state_r = fm.repeat_batch((kv, state), repeats)
    velocity_fn = lambda x, t: model.apply(params, x, t, context_kv=kv_r, state=state_r)
    return fm.flow_loss(velocity_fn, rng, actions, num_repeats=repeats)

  optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, steps))

  @jax.jit
  def train(params, rngs):
    def step(carry, rng):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, rng)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), rngs)
    return params, losses

  # Evaluate on the same 8 fixed draws before and after, to compare like with like.
  eval_rngs = jax.random.split(jax.random.key(123), 8)
  evaluate = jax.jit(lambda p: jax.vmap(lambda r: loss_fn(p, r))(eval_rngs).mean())

  @jax.jit
  def sample(params, rng):
    kv = model.apply(params, context, method=ActionExpert.context_kv)
    velocity_fn = lambda x, t: model.apply(params, x, t, context_kv=kv, state=state)
    return fm.sample_actions(velocity_fn, rng, actions.shape, num_steps=4)

  loss_before = float(evaluate(params))
  error_before = np.abs(np.asarray(sample(params, jax.random.key(5)) - actions))
  params, losses = train(params, jax.random.split(jax.random.key(1), steps))
  loss_after = float(evaluate(params))
  assert np.isfinite(np.asarray(losses)).all()
  assert loss_after < loss_before / 10, (loss_before, loss_after)

  error = np.abs(np.asarray(sample(params, jax.random.key(5)) - actions))
  assert error.mean() < 0.08 and error.max() < 0.35, (error.mean(), error.max())
  assert error_before.mean() > 3 * error.mean()
