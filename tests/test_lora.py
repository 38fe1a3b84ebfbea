"""Low-rank adapters on the right brain and a cheaper frozen left brain (bf16 compute, int8
weight-only kernels): exact no-op at step 0, frozen weights bit-identical through training,
merged export, the int8 error bound, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixtures_training
from tests.fixtures_backbone import tiny_hf_checkpoint  # noqa: F401  (a fixture)
from fixtures_twinbrain import init_model, make_obs, tiny_config
from twinbrain_jax.models.tokenizer import write_synthetic_tokenizer
from twinbrain_jax.models.layers import (ADAPTER, KERNEL_SCALE, LoraConfig,
                                         dequantize_kernels, merge_adapters, merge_trees,
                                         split_adapters)
from twinbrain_jax.models.twinbrain import (TwinBrainVLA, left_keys_values,
                                            merged_adapter_params, observation_context,
                                            sample_actions, split_trainable)
from twinbrain_jax.training import checkpoint as checkpoint_lib
from twinbrain_jax.training import export, state as state_lib

# The int8 left brain's documented error bounds against the bf16 one (docs/training.md), on the
# tiny fixtures: largest |difference| of any left key/value (of the action context), as a
# fraction of the largest |key/value| (|context value|).
INT8_KV_BOUND = 0.05
INT8_CONTEXT_BOUND = 0.05
# Merged adapters against separate ones, float32 kernels: the same sums in another order.
MERGE_ATOL = 1e-5


def _perturbed_adapters(params, seed=1):
  """`params` with every adapter factor random (at init B is 0, which makes merging trivial)."""
  base, adapters = split_adapters(params["right"])
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [np.asarray(0.05 * jax.random.normal(k, x.shape)) for k, x in zip(keys, leaves)]
  return dict(params, right=merge_trees(base, jax.tree.unflatten(treedef, noisy)))


@pytest.fixture(scope="module")
def lora_tiny():
  """The tiny preset with rank-4 adapters (alpha 8): (config, obs, grid, model, params at init,
  the same params with random adapters)."""
  config = tiny_config(lora=dict(rank=4, alpha=8.0))
  obs, grid = make_obs(config)
  model, params = init_model(config, obs, grid)
  return config, obs, grid, model, params, _perturbed_adapters(params)


@pytest.mark.parametrize("preset", [
    "tiny", pytest.param("qwen3vl_tiny", marks=pytest.mark.slow)])
def test_a_new_adapter_is_an_exact_no_op(preset, lora_tiny):
  if preset == "tiny":
    config, obs, grid, model, params, _ = lora_tiny
  else:
    config = tiny_config(preset, lora=dict(rank=4))
    obs, grid = make_obs(config)
    model, params = init_model(config, obs, grid)
  base_params, adapters = split_adapters(params["right"])
  # Every decoder projection of the right brain has one; the left brain has none.
  layer = adapters["model"]["layers"]
  assert sorted(layer["self_attn"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
  assert sorted(layer["mlp"]) == ["down_proj", "gate_proj", "up_proj"]
  assert not split_adapters(params["left"])[1]
  base_model = TwinBrainVLA(dataclasses.replace(config, lora=LoraConfig()))
  without = dict(params, right=base_params)
  context, _ = observation_context(model, params, obs, grid)
  base_context, _ = observation_context(base_model, without, obs, grid)
  np.testing.assert_array_equal(np.asarray(context[0]), np.asarray(base_context[0]))
  rng = jax.random.key(3)
  np.testing.assert_array_equal(np.asarray(sample_actions(model, params, obs, grid, rng)),
                                np.asarray(sample_actions(base_model, without, obs, grid, rng)))


def test_adapter_factors_carry_the_projection_axis_names():
  config = tiny_config(lora=dict(rank=4))
  obs, grid = make_obs(config)
  model = TwinBrainVLA(config)
  expert = config.action_expert
  boxed = jax.eval_shape(lambda: model.init(
      jax.random.key(0), obs, grid, jnp.zeros((2, expert.action_horizon, expert.action_dim)),
      jnp.zeros((2,)))["params"])
  layer = boxed["right"]["model"]["layers"]
  q, o = layer["self_attn"]["q_proj"][ADAPTER], layer["self_attn"]["o_proj"][ADAPTER]
  assert q["a"].names == ("layers", "embed", None) and q["b"].names == ("layers", None, "heads",
                                                                         "kv")
  assert o["a"].names == ("layers", "heads", "kv", None) and o["b"].names == ("layers", None,
                                                                              "embed")
  down = layer["mlp"]["down_proj"][ADAPTER]
  assert down["a"].names == ("layers", "mlp", None) and down["b"].names == ("layers", None, "embed")


def test_merged_adapters_give_the_unmerged_models_actions(lora_tiny):
  config, obs, grid, model, _, params = lora_tiny
  merged = merged_adapter_params(config, params)
  assert not split_adapters(merged["right"])[1]
  base_model = TwinBrainVLA(dataclasses.replace(config, lora=LoraConfig()))
  rng = jax.random.key(5)
  got = np.asarray(sample_actions(base_model, merged, obs, grid, rng))
  want = np.asarray(sample_actions(model, params, obs, grid, rng))
  np.testing.assert_allclose(got, want, atol=MERGE_ATOL, rtol=0)
  # The adapters matter: without them the actions are far from these.
  without = dict(params, right=split_adapters(params["right"])[0])
  plain = np.asarray(sample_actions(base_model, without, obs, grid, rng))
  assert np.abs(plain - want).max() > 100 * MERGE_ATOL


def test_merge_folds_a_stacked_adapter_into_its_kernel():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(3, 5, 2, 4)).astype(np.float32)  # [layers, embed, heads, kv]
  a, b = rng.normal(size=(3, 5, 2)), rng.normal(size=(3, 2, 2, 4))  # rank 2
  merged = merge_adapters({"q": {"kernel": kernel, ADAPTER: {"a": a, "b": b}}}, 0.5)["q"]
  assert set(merged) == {"kernel"}
  np.testing.assert_allclose(merged["kernel"], kernel + 0.5 * np.einsum("lei,lihd->lehd", a, b),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # A minute on 2 loaded cores.
def test_exported_bundle_of_a_lora_run_has_no_adapters_and_samples_the_same(lora_tiny, tmp_path):
  """What `scripts/export.py` writes for a LoRA run: a plain bundle (float32, merged)."""
  model_config, obs, grid, model, _, params = lora_tiny
  config = fixtures_training.tiny_config((1, 1, 1))
  config.model.lora.update(rank=4, alpha=8.0)
  config.model.left_param_dtype = config.model.left_dtype = "float32"
  assert state_lib.model_config(config) == model_config
  tokenizer = tmp_path / "tokenizer"
  write_synthetic_tokenizer(tokenizer, model_config.backbone, ["pick up the block"],
                            (model_config.action_token_id, model_config.propri_token_id))
  config_json = checkpoint_lib.config_to_json(config)
  out = export.export_bundle(params, config_json, {}, tokenizer, tmp_path / "bundle",
                             dtype="float32")
  assert config_json["model"]["lora"]["rank"] == 4  # The caller's config is left as it was.
  bundle = export.load_bundle(out)
  assert bundle.config.model.lora.rank == 0 and bundle.config.export.merged_lora.rank == 4
  assert not split_adapters(bundle.params["right"])[1]
  rng = jax.random.key(2)
  np.testing.assert_allclose(np.asarray(sample_actions(bundle.model, bundle.params, obs, grid,
                                                       rng)),
                             np.asarray(sample_actions(model, params, obs, grid, rng)),
                             atol=MERGE_ATOL, rtol=0)
  # Kept apart (`--nomerge_lora`), the adapters load and sample as trained.
  apart = export.load_bundle(export.export_bundle(params, config_json, {}, tokenizer,
                                                  tmp_path / "apart", dtype="float32",
                                                  merge_lora=False))
  assert apart.config.model.lora.rank == 4 and split_adapters(apart.params["right"])[1]
  np.testing.assert_allclose(np.asarray(sample_actions(apart.model, apart.params, obs, grid,
                                                       rng)),
                             np.asarray(sample_actions(model, params, obs, grid, rng)),
                             atol=1e-6, rtol=0)


@pytest.mark.slow  # A minute on 2 loaded cores.
def test_training_moves_the_adapters_and_never_the_frozen_weights():
  config = fixtures_training.tiny_config((1, 1, 1))
  config.model.lora.update(rank=4, alpha=8.0)
  batch, grid = fixtures_training.synthetic_batch(config, batch_size=2)
  trainer = fixtures_training.Trainer(config, grid, devices=jax.devices()[:1])
  state = trainer.init()
  # Trainable: the right brain's adapters only (plus the state encoder and expert).
  for path, _ in jax.tree_util.tree_flatten_with_path(state.params["right"])[0]:
    assert ADAPTER in [getattr(k, "key", None) for k in path]
  assert set(state.frozen) == {"left", "right"}
  assert {x.dtype for x in jax.tree.leaves(state.frozen)} == {jnp.dtype(jnp.bfloat16)}
  frozen0 = jax.tree.map(np.array, state.frozen)
  params0 = jax.tree.map(np.array, state.params)
  for _ in range(2):
    state, metrics = trainer.step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  for got, want in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(frozen0)):
    np.testing.assert_array_equal(np.asarray(got), want)
  b = state.params["right"]["model"]["layers"]["self_attn"]["q_proj"][ADAPTER]["b"]
  assert np.abs(np.asarray(b)).max() > 0  # B started at 0 and has learned.
  for part in ("state_encoder", "action_expert"):
    assert any(not np.array_equal(np.asarray(x), y) for x, y in
               zip(jax.tree.leaves(state.params[part]), jax.tree.leaves(params0[part])))
  # Adam's moments cover the trainable tree only: two per trainable param, plus step counts.
  opt_size = state_lib.count_params(state.opt_state)
  assert 2 * state_lib.count_params(state.params) <= opt_size < 2 * state_lib.count_params(
      state.params) + 100


@pytest.mark.slow  # A minute on 2 loaded cores.
def test_adapter_dropout_runs_only_with_a_dropout_rng(lora_tiny):
  config, obs, grid, _, _, params = lora_tiny
  model = TwinBrainVLA(dataclasses.replace(config,
                                           lora=dataclasses.replace(config.lora, dropout=0.5)))
  encode = lambda **kw: np.asarray(model.apply({"params": params}, obs, grid,
                                               method=TwinBrainVLA.encode, **kw)[0])
  np.testing.assert_array_equal(encode(), encode())
  dropped = encode(rngs={"dropout": jax.random.key(0)})
  assert np.abs(dropped - encode()).max() > 1e-3
  np.testing.assert_array_equal(dropped, encode(rngs={"dropout": jax.random.key(0)}))


@pytest.mark.parametrize("preset", [
    "tiny", pytest.param("qwen3vl_tiny", marks=pytest.mark.slow)])  # ~45 s on a loaded machine
def test_int8_left_brain_error_is_within_its_bound(preset):
  bf16 = tiny_config(preset, left_param_dtype="bfloat16", left_dtype="bfloat16")
  int8 = dataclasses.replace(bf16, left_quantization="int8")
  obs, grid = make_obs(bf16)
  _, params = init_model(bf16, obs, grid)
  frozen_bf16, trainable = split_trainable(bf16, params)
  frozen_int8, _ = split_trainable(int8, params)
  layers = frozen_int8["left"]["model"]["layers"]
  assert layers["self_attn"]["q_proj"]["kernel"].dtype == jnp.int8
  assert layers["mlp"]["down_proj"][KERNEL_SCALE].shape == (
      bf16.backbone.text.num_hidden_layers, 1, bf16.backbone.text.hidden_size)
  assert (state_lib.tree_bytes_per_device(frozen_int8["left"]["model"]["layers"])
          < 0.6 * state_lib.tree_bytes_per_device(frozen_bf16["left"]["model"]["layers"]))

  kv = jax.jit(lambda config, left: left_keys_values(config, left, obs, grid), static_argnums=0)
  keys, values = kv(bf16, frozen_bf16["left"])
  keys8, values8 = kv(int8, frozen_int8["left"])
  valid = np.asarray(obs["left_attention_mask"], bool)[None, :, :, None, None]
  kv_error = max(np.abs(np.where(valid, a - b, 0)).max() for a, b in
                 ((keys8, keys), (values8, values)))
  kv_scale = max(np.abs(np.where(valid, x, 0)).max() for x in (keys, values))
  context = jax.jit(lambda config, p: TwinBrainVLA(config).apply(
      {"params": p}, obs, grid, method=TwinBrainVLA.encode)[0], static_argnums=0)
  want = context(bf16, merge_trees(frozen_bf16, trainable))
  got = context(int8, merge_trees(frozen_int8, trainable))
  context_error, context_scale = float(jnp.abs(got - want).max()), float(jnp.abs(want).max())
  # The joint scan dequantizes layer by layer exactly as the materialized int8 weights.
  materialized = dict(frozen_int8, left=dict(frozen_int8["left"], model=dequantize_kernels(
      frozen_int8["left"]["model"], jnp.bfloat16)))
  np.testing.assert_array_equal(np.asarray(context(bf16, merge_trees(materialized, trainable))),
                                np.asarray(got))
  print(f"{preset}: int8 vs bf16 left brain: K/V max |error| {kv_error:.3e} of max |K/V| "
        f"{kv_scale:.3e}; action context max |error| {context_error:.3e} of max "
        f"{context_scale:.3e}")
  assert 0 < kv_error <= INT8_KV_BOUND * kv_scale
  assert 0 < context_error <= INT8_CONTEXT_BOUND * context_scale


def test_bad_adapter_and_quantization_configs_are_named():
  with pytest.raises(ValueError, match=r"'qproj' matches no projection.*self_attn/q_proj"):
    tiny_config(lora=dict(rank=4, targets=("qproj",)))
  # tiny: k/v project 64 -> 2 heads x 16 = 32.
  with pytest.raises(ValueError, match=r"rank=33 is larger than the smaller side of "
                                       r"self_attn/k_proj \(64 x 32\)"):
    tiny_config(lora=dict(rank=33))
  tiny_config(lora=dict(rank=33, targets=("q_proj", "mlp/*")))  # k/v left out: fine.
  with pytest.raises(ValueError, match=r"Unknown config.model.lora key\(s\) \['ranks'\]"):
    tiny_config(lora=dict(ranks=4))
  with pytest.raises(ValueError, match=r"left_quantization='int8' needs .*scan_layers=True"):
    tiny_config(left_quantization="int8", scan_layers=False)


def test_resuming_across_full_and_adapter_fine_tuning_is_named():
  full = checkpoint_lib.config_to_json(fixtures_training.tiny_config())
  lora = checkpoint_lib.config_to_json(fixtures_training.tiny_config())
  lora["model"]["lora"]["rank"] = 8
  for saved, current, there, now in ((full, lora, 0, 8), (lora, full, 8, 0)):
    with pytest.raises(checkpoint_lib.IncompatibleCheckpointError,
                       match=rf"config.model.lora.rank is {there} there but {now} now. A full "
                             r"fine-tuning checkpoint cannot resume as a low-rank adapter run"):
      checkpoint_lib.check_compatible(saved, current, "ckpt/3")
  # A run written before adapters and the left brain's dtype fields existed resumes as full
  # fine-tuning with the left brain computed in the model's dtype.
  legacy = checkpoint_lib.config_to_json(fixtures_training.tiny_config())
  for key in ("lora", "left_quantization", "left_dtype"):
    del legacy["model"][key]
  current = checkpoint_lib.config_to_json(fixtures_training.tiny_config())
  current["model"]["left_dtype"] = current["model"]["dtype"]
  current["model"]["lora"]["alpha"] = 3.0  # Irrelevant at rank 0.
  checkpoint_lib.check_compatible(legacy, current, "ckpt/3")


@pytest.mark.slow
def test_a_lora_run_resumes_exactly_and_exports_merged(tmp_path):
  """The training loop on generated data with adapters: stop at 2, resume to 4 (the losses and
  every array of the uninterrupted run), a full fine-tuning config refused on that checkpoint,
  and the exported bundle's actions against the checkpoint's."""
  import absl.flags
  from twinbrain_jax.training import demo_data, loop
  absl.flags.FLAGS.mark_as_parsed()  # grain reads absl flags.
  config = demo_data.prepare(fixtures_training.tiny_config((8, 1, 1)), str(tmp_path / "data"),
                             num_episodes=4, num_eval_episodes=2)
  config.train.update(num_steps=4, log_every=1, progress_bar=False, eval_data_dir=None)
  config.checkpoint.update(every=2, keep_last=5)
  config.model.lora.update(rank=4, alpha=8.0)
  uninterrupted = loop.train(config, str(tmp_path / "a"))
  first = loop.train(config, str(tmp_path / "b"), stop_after=2)
  resumed = loop.train(config, str(tmp_path / "b"))
  assert first.final_step == 2 and resumed.start_step == 2 and resumed.final_step == 4
  assert resumed.losses == {s: uninterrupted.losses[s] for s in (3, 4)}
  for got, want in zip(jax.tree.leaves((resumed.state.params, resumed.state.frozen,
                                        resumed.state.opt_state)),
                       jax.tree.leaves((uninterrupted.state.params, uninterrupted.state.frozen,
                                        uninterrupted.state.opt_state))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

  full = config.copy_and_resolve_references()
  full.model.lora.rank = 0
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError,
                     match="config.model.lora.rank is 4 there but 0 now"):
    loop.train(full, str(tmp_path / "b"))

  checkpoints = tmp_path / "b" / config.checkpoint.dir
  bundle = export.load_bundle(export.export_checkpoint(checkpoints, tmp_path / "bundle",
                                                       dtype="float32"))
  trained = export.bundle_from_checkpoint(checkpoints)
  assert bundle.config.model.lora.rank == 0 and trained.config.model.lora.rank == 4
  model_config = state_lib.model_config(config)
  obs, grid = make_obs(model_config)
  rng = jax.random.key(4)
  np.testing.assert_allclose(
      np.asarray(sample_actions(bundle.model, bundle.params, obs, grid, rng)),
      np.asarray(sample_actions(trained.model, trained.params, obs, grid, rng)),
      atol=MERGE_ATOL, rtol=0)


@pytest.mark.slow  # A minute on 2 loaded cores.
def test_pretrained_weights_fill_the_frozen_base_and_keep_the_new_adapters(tiny_hf_checkpoint):
  """`init.hf_checkpoint` with adapters and an int8 left brain: the right base is the checkpoint
  in bf16 (frozen), the adapters stay as initialised (B = 0), the left kernels are the
  checkpoint's int8 with per-channel scales."""
  from twinbrain_jax.models import hf_loading
  config = fixtures_training.tiny_config((1, 1, 1))
  config.model.lora.update(rank=4, alpha=8.0)
  config.model.left_quantization = "int8"
  _, grid = fixtures_training.synthetic_batch(config, batch_size=2)
  trainer = fixtures_training.Trainer(config, grid, devices=jax.devices()[:1])
  initial = trainer.init()
  adapters = jax.tree.map(np.array, initial.params["right"])
  state = state_lib.load_pretrained_backbones(
      initial, trainer.shardings, state_lib.model_config(config), str(tiny_hf_checkpoint),
      trainer.mesh, trainer.rules)
  hf = jax.tree.map(np.asarray, hf_loading.load_params(tiny_hf_checkpoint,
                                                       param_dtype=np.float32))
  right_q = np.asarray(state.frozen["right"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"])
  want_q = hf["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert right_q.dtype == jnp.bfloat16
  np.testing.assert_array_equal(right_q, want_q.astype(jnp.bfloat16))
  for got, want in zip(jax.tree.leaves(state.params["right"]), jax.tree.leaves(adapters)):
    np.testing.assert_array_equal(np.asarray(got), want)
  left_q = state.frozen["left"]["model"]["layers"]["self_attn"]["q_proj"]
  dequantized = np.asarray(left_q["kernel"], np.float32) * np.asarray(left_q[KERNEL_SCALE])
  reference = want_q.astype(jnp.bfloat16).astype(np.float32)
  # Per output channel, the rounding error is at most half a quantization step.
  assert (np.abs(dequantized - reference) <= np.asarray(left_q[KERNEL_SCALE]) / 2 + 1e-7).all()


def test_memory_plan_of_a_lora_run_counts_the_base_as_frozen():
  """The abstract state of the plan (nothing compiled): the right base joins the frozen bytes
  in bf16, and Adam covers the adapters, the state encoder and the expert only."""
  from twinbrain_jax.training import memory
  full = fixtures_training.tiny_config((8, 1, 1))  # All devices; replicated params.
  lora = fixtures_training.tiny_config((8, 1, 1))
  lora.model.lora.update(rank=4, alpha=8.0)
  full_plan = memory.memory_plan(full, batch_size=8, compile_step=False)
  lora_plan = memory.memory_plan(lora, batch_size=8, compile_step=False)
  right = full_plan.trainable_params - (lora_plan.trainable_params
                                        - _adapter_params(state_lib.model_config(lora)))
  assert lora_plan.frozen_params == full_plan.frozen_params + right
  assert lora_plan.frozen_bytes == full_plan.frozen_bytes + 2 * right  # bf16
  assert lora_plan.optimizer_bytes == 2 * lora_plan.params_bytes + (
      full_plan.optimizer_bytes - 2 * full_plan.params_bytes)  # Moments + the same step counts.


def _adapter_params(config):
  """Adapter parameters: rank x (inputs + outputs) per targeted matrix and layer."""
  from twinbrain_jax.models.qwen25vl import decoder_projection_shapes
  text = config.backbone.text
  return text.num_hidden_layers * sum(config.lora.rank * (i + o) for i, o in
                                      decoder_projection_shapes(text).values())
