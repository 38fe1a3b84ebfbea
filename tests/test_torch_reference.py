"""The PyTorch twin of TwinBrainVLA (`models/torch_reference.py`) computes what the Flax model
computes, so `scripts/bench_twinbrain.py --torch` compares equal work.

Both models get the same weights: the brains as HF checkpoints read by `hf_loading.load_params`,
the state encoder and expert copied from the Flax params into the torch modules.
"""

import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fixtures_backbone import _perturb_norms_and_biases
from fixtures_twinbrain import make_obs, tiny_config
from twinbrain_jax.models import hf_loading, torch_reference
from twinbrain_jax.models.twinbrain import TwinBrainVLA

NUM_REPEATS = 3


def _flax_params_with_hf_brains(config, obs, grid, brains):
  model = TwinBrainVLA(config)
  expert = config.action_expert
  batch = obs["state"].shape[0]
  noisy = jnp.zeros((batch, expert.action_horizon, expert.action_dim))
  params = nn.unbox(jax.jit(lambda r: model.init(r, obs, grid, noisy, jnp.zeros(batch)))(
      jax.random.key(0))["params"])
  for side, hf_model in brains.items():
    with tempfile.TemporaryDirectory() as directory:
      hf_model.save_pretrained(directory)
      loaded = hf_loading.load_params(directory, config.backbone, scan_layers=config.scan_layers)
    assert jax.tree.structure(loaded) == jax.tree.structure(params[side])
    params[side] = loaded
  return model, params


@pytest.fixture(scope="module", params=[True, False], ids=["scanned", "unrolled"])
def twins(request):
  config = tiny_config(scan_layers=request.param)  # the expert follows the brains' layout
  assert config.action_expert.scan_layers == request.param
  obs, grid = make_obs(config, text_lengths=(7, 7))  # no padding: the twin's precondition
  brains = {side: _perturb_norms_and_biases(torch_reference.hf_backbone(config, seed))
            for side, seed in (("left", 0), ("right", 1))}
  model, params = _flax_params_with_hf_brains(config, obs, grid, brains)
  twin = torch_reference.TwinBrainVLA(config, brains["left"].model, brains["right"].model)
  torch_reference.load_flax_heads(twin, params)
  return config, model, params, twin, obs, grid


def _flax_loss(model, params, obs, grid, actions, noise, t):
  """`compute_loss` with the noise and times given (all actions valid)."""
  variables = {"params": params}
  context, mask = model.apply(variables, obs, grid, method=TwinBrainVLA.encode)
  kv = model.apply(variables, context, method=TwinBrainVLA.context_kv)
  repeat = lambda x: jnp.repeat(x, NUM_REPEATS, axis=0)  # noqa: E731
  actions = repeat(actions)
  x_t = (1 - t[:, None, None]) * noise + t[:, None, None] * actions
  velocity = model.apply(variables, x_t, t, jax.tree.map(repeat, kv), repeat(mask),
                         repeat(obs["state"]), method=TwinBrainVLA.velocity)
  return jnp.mean(jnp.square(velocity - (actions - noise)))


def test_context_matches_flax(twins):
  _, model, params, twin, obs, grid = twins
  context, _ = jax.jit(lambda p: model.apply({"params": p}, obs, grid,
                                             method=TwinBrainVLA.encode))(params)
  with torch.no_grad():
    torch_context = twin.encode(torch_reference.observation_to_torch(obs),
                                torch.as_tensor(np.asarray(grid, np.int64))).numpy()
  assert torch_context.shape == context.shape
  # fp32 through 2 x 2 decoder layers and the vision towers; |context| is O(1).
  np.testing.assert_allclose(torch_context, np.asarray(context), atol=2e-5, rtol=0)


def test_loss_and_gradients_match_flax(twins):
  config, model, params, twin, obs, grid = twins
  expert = config.action_expert
  generator = torch.Generator().manual_seed(0)
  batch = obs["state"].shape[0]
  actions = 2 * torch.rand((batch, expert.action_horizon, expert.action_dim),
                           generator=generator) - 1
  noise, t = torch_reference.draw_noise_and_time(batch, NUM_REPEATS, actions.shape[1:], generator)
  twin.zero_grad(set_to_none=True)
  torch_loss = twin.flow_loss(torch_reference.observation_to_torch(obs),
                              torch.as_tensor(np.asarray(grid, np.int64)), actions, noise, t)
  torch_loss.backward()
  flax_inputs = [jnp.asarray(x.numpy()) for x in (actions, noise, t)]
  loss, grads = jax.jit(jax.value_and_grad(
      lambda p: _flax_loss(model, p, obs, grid, *flax_inputs)))(params)
  np.testing.assert_allclose(torch_loss.item(), float(loss), rtol=1e-5)

  # The frozen left brain gets no gradient in either; the trainable parts the same gradients.
  assert all(p.grad is None for p in twin.left.parameters())
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["left"]))
  torch_parts = dict(right=twin.right, state_encoder=twin.state_encoder,
                     action_expert=twin.action_expert)
  for name, module in torch_parts.items():
    torch_norm = float(sum(torch.sum(p.grad ** 2) for p in module.parameters()
                           if p.grad is not None))
    flax_norm = float(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads[name])))
    assert flax_norm > 0, name
    np.testing.assert_allclose(torch_norm, flax_norm, rtol=1e-4, err_msg=name)
  # One leaf elementwise: Flax kernels are [in, out], torch weights [out, in].
  np.testing.assert_allclose(twin.action_expert.time_in.weight.grad.numpy().T,
                             np.asarray(grads["action_expert"]["time_in"]["kernel"]),
                             rtol=1e-4, atol=1e-5)  # entries are O(1e-2)


def test_sampled_chunk_matches_flax_euler(twins):
  config, model, params, twin, obs, grid = twins
  expert = config.action_expert
  noise = np.random.default_rng(1).standard_normal(
      (obs["state"].shape[0], expert.action_horizon, expert.action_dim)).astype(np.float32)

  @jax.jit
  def euler(params, x):
    variables = {"params": params}
    context, mask = model.apply(variables, obs, grid, method=TwinBrainVLA.encode)
    kv = model.apply(variables, context, method=TwinBrainVLA.context_kv)
    for k in range(4):
      t = jnp.full((x.shape[0],), k / 4)
      x = x + model.apply(variables, x, t, kv, mask, obs["state"],
                          method=TwinBrainVLA.velocity) / 4
    return x

  x = euler(params, jnp.asarray(noise))
  chunk = twin.sample_actions(torch_reference.observation_to_torch(obs),
                              torch.as_tensor(np.asarray(grid, np.int64)), torch.from_numpy(noise),
                              num_steps=4)
  np.testing.assert_allclose(chunk.numpy(), np.asarray(x), atol=1e-4, rtol=0)


def test_unsupported_config_is_named():
  config = tiny_config(variant="monolithic")
  brain = torch_reference.hf_backbone(config).model
  with pytest.raises(ValueError, match="variant"):
    torch_reference.TwinBrainVLA(config, brain, brain)


def test_observation_missing_a_key_is_named():
  config = tiny_config()
  obs, _ = make_obs(config)
  del obs["state"]
  with pytest.raises(KeyError, match="state"):
    torch_reference.observation_to_torch(obs)


def test_padded_prompts_are_refused():
  config = tiny_config()
  obs, _ = make_obs(config, text_lengths=(5, 9))  # the shorter row is padded
  with pytest.raises(ValueError, match="attention_mask has padding"):
    torch_reference.observation_to_torch(obs)
