"""The train state and its sharded initialisation.

    state = TrainState(step, params={right, state_encoder, action_expert}, frozen={left},
                       opt_state, rng)                                        (TwinBrain)
    state = TrainState(step, params={right: adapters, state_encoder, action_expert},
                       frozen={left, right: base weights}, opt_state, rng)   (TwinBrain, LoRA)
    state = TrainState(step, params={planner, plan_head, refiner},
                       frozen={curriculum: {planner_passed}}, opt_state, rng)  (Libra)
    state = TrainState(step, params={backbone}, frozen={}, opt_state, rng)     (VLM)

The frozen left brain lives in `frozen`, outside the differentiated and optimised tree: it never
gets gradients or optimizer state, and is stored in `model.left_param_dtype` (bf16; int8
decoder kernels with `model.left_quantization="int8"`). With low-rank adapters
(`model.lora.rank > 0`) the right brain's base weights are frozen too (in
`model.lora.base_param_dtype`) and only its adapters train (`twinbrain.split_trainable`). Every leaf
of the state (optimizer moments included) carries the `NamedSharding` its logical axes map to, so
`jax.jit(init, out_shardings=...)` creates each shard directly on its device.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from twinbrain_jax import sharding as sharding_lib
from twinbrain_jax.config_lib import ConfigError
from twinbrain_jax.models import backbones, families, hf_loading, libra, siglip, vlm
from twinbrain_jax.models.layers import merge_trees
from twinbrain_jax.models.qwen25vl import init_params
from twinbrain_jax.models.twinbrain import (TwinBrainConfig, TwinBrainVLA, frozen_left_params,
                                            init_right_from_left, split_trainable,
                                            synthetic_observation)


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes.

  Attributes:
    step: int32 [] optimizer steps taken.
    params: trainable params `{right, state_encoder, action_expert}` (with low-rank adapters,
      `right` holds the adapters only).
    frozen: `{left}` for the twinbrain variant, `{}` for monolithic, plus `right` (the right
      brain's base weights) with low-rank adapters; never updated. Libra:
      `{curriculum: {planner_passed}}`, the dynamic curriculum's latch, set by the train step
      (never by the optimizer).
    opt_state: the optimizer's state of `params`.
    rng: uint32 [2] base key; step `s` draws from `fold_in(rng, s)`, so a resumed run draws
      the same noise as an uninterrupted one.
  """
  step: jax.Array
  params: Any
  frozen: Any
  opt_state: Any
  rng: jax.Array

  def all_params(self) -> dict[str, Any]:
    """The model's full `params` collection."""
    return merge_trees(self.frozen, self.params)


def model_config(config: ml_collections.ConfigDict) -> families.ModelConfig:
  return families.model_config(config)


def _init_inputs(model_config_: families.ModelConfig):
  """Smallest valid inputs for `model.init` (parameter shapes do not depend on them)."""
  if isinstance(model_config_, libra.LibraConfig):
    return libra.init_args(model_config_)
  if isinstance(model_config_, vlm.VlmConfig):
    return vlm.init_args(model_config_)
  obs, grid = synthetic_observation(model_config_, text_lengths=(3,), image_grid=(1, 8, 8))
  expert = model_config_.action_expert
  noisy = np.zeros((1, expert.action_horizon, expert.action_dim), np.float32)
  return obs, grid, noisy, np.zeros((1,), np.float32)


def _init_fn(model: TwinBrainVLA, tx: optax.GradientTransformation, seed: int):
  """rng-free init function returning a (logically boxed) `TrainState`."""
  args = _init_inputs(model.config)

  def init() -> TrainState:
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
    params = dict(model.init(init_rng, *args)["params"])
    if isinstance(model, libra.LibraVLA):
      frozen = libra.initial_frozen()
    elif isinstance(model, vlm.VisionLanguageModel):
      frozen = {}
    else:
      frozen, params = split_trainable(model.config, params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                      opt_state=tx.init(nn.unbox(params)), rng=train_rng)

  return init


def _path_keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def optimizer_shardings(opt_state: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings of the optimizer state: a leaf that mirrors a parameter (Adam's moments, whose
  key path ends with the parameter's path and whose shape equals it) takes its sharding; the
  rest (step counts) is replicated."""
  by_path = {}
  for (path, leaf), s in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                             jax.tree.leaves(param_shardings)):
    by_path[_path_keys(path)] = (leaf.shape, s)
  replicated = NamedSharding(mesh, PartitionSpec())

  def leaf_sharding(path, leaf):
    keys = _path_keys(path)
    for start in range(len(keys)):
      match = by_path.get(keys[start:])
      if match is not None and tuple(match[0]) == tuple(leaf.shape):
        return match[1]
    return replicated

  return jax.tree_util.tree_map_with_path(leaf_sharding, opt_state)


def abstract_state(model: TwinBrainVLA, tx: optax.GradientTransformation, mesh: Mesh,
                   rules: sharding_lib.LogicalRules, seed: int = 0
                   ) -> tuple[TrainState, TrainState]:
  """(abstract state of `jax.ShapeDtypeStruct`s with shardings, the `NamedSharding` tree).

  Nothing is allocated: use it for restoring checkpoints and for the memory plan.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(_init_fn(model, tx, seed))
  shardings = sharding_lib.logical_shardings(boxed.replace(opt_state=None), mesh, rules)
  unboxed = nn.unbox(boxed)
  shardings = shardings.replace(opt_state=optimizer_shardings(
      unboxed.opt_state, unboxed.params, shardings.params, mesh))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          unboxed, shardings)
  return abstract, shardings


def create_train_state(model: TwinBrainVLA, tx: optax.GradientTransformation, mesh: Mesh,
                       rules: sharding_lib.LogicalRules, seed: int = 0,
                       shardings: TrainState | None = None) -> TrainState:
  """A randomly initialised state, each shard created on its device."""
  if shardings is None:
    _, shardings = abstract_state(model, tx, mesh, rules, seed)
  init = _init_fn(model, tx, seed)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return jax.jit(lambda: nn.unbox(init()), out_shardings=shardings)()


def load_pretrained_backbones(state: TrainState, shardings: TrainState, model_cfg: TwinBrainConfig,
                              hf_checkpoint: str, mesh: Mesh,
                              rules: sharding_lib.LogicalRules) -> TrainState:
  """Replaces both brains by a Hugging Face Qwen2.5-VL / Qwen3-VL checkpoint (left and right
  alike), as `with_backbone` places them."""
  hf_config = hf_loading.load_config(hf_checkpoint)
  if hf_config != model_cfg.backbone:
    raise ConfigError(
        f"init.hf_checkpoint={hf_checkpoint} has backbone config {hf_config}, which differs from "
        f"config.model.backbone {model_cfg.backbone}. Choose the preset of that checkpoint.")
  # Read once in the trainable dtype: the right brain gets the checkpoint's values (not a copy
  # of the bf16-rounded left brain), the left brain their cast to its storage dtype.
  loaded = hf_loading.load_params(hf_checkpoint, hf_config,
                                  param_dtype=jnp.dtype(model_cfg.param_dtype), mesh=mesh,
                                  rules=rules)
  return with_backbone(state, shardings, model_cfg, loaded, mesh)


def load_vlm_backbones(state: TrainState, shardings: TrainState, model_cfg: TwinBrainConfig,
                       vlm_checkpoint: str, mesh: Mesh) -> TrainState:
  """Replaces both brains by the backbone of a VLM training run (`config.family="vlm"`, its
  latest whole checkpoint), as `with_backbone` places them: exactly as an HF checkpoint."""
  loaded = read_vlm_backbone(vlm_checkpoint, model_cfg.backbone)
  return with_backbone(state, shardings, model_cfg, loaded, mesh)


def with_backbone(state: TrainState, shardings: TrainState, model_cfg: TwinBrainConfig,
                  loaded: Any, mesh: Mesh) -> TrainState:
  """Both brains set to one backbone's params `loaded` (left and right alike).

  The right brain holds the values in `model_cfg.param_dtype` (with low-rank adapters: in
  `model_cfg.lora.base_param_dtype`, frozen, the adapters left as initialised), the frozen left
  brain their cast to `model_cfg.left_param_dtype` (int8 kernels with
  `left_quantization="int8"`); all carry the shardings of `shardings`.
  The right brain's `<|action|>` / `<|propri|>` rows start at the mean of the real token
  embeddings; the real tokens are the ids below the first of the two (the released tokenizer
  has 151665 tokens, and the tiny presets reserve the last rows). Parts of `loaded` that the
  brains do not have (an `lm_head` the VLA never created) are left out.
  """
  lora = model_cfg.lora.enabled
  target = (shardings.frozen if lora else shardings.params)["right"]
  loaded = {k: v for k, v in dict(loaded).items() if k in target}
  num_real = min(model_cfg.action_token_id, model_cfg.propri_token_id)
  right_dtype = jnp.dtype(model_cfg.lora.base_param_dtype if lora else model_cfg.param_dtype)
  with jax.set_mesh(mesh):
    right = jax.jit(functools.partial(init_right_from_left, config=model_cfg,
                                      num_real_tokens=num_real, param_dtype=right_dtype),
                    out_shardings=target)(loaded)
    frozen, params = dict(state.frozen), dict(state.params)
    if lora:
      frozen["right"] = right
    else:
      params["right"] = right
    if "left" in frozen:
      left_target = shardings.frozen["left"]
      frozen["left"] = jax.jit(
          functools.partial(frozen_left_params, model_cfg),
          out_shardings=left_target)({k: v for k, v in loaded.items() if k in left_target})
  del loaded
  return state.replace(params=params, frozen=frozen)


def _describe_backbone(config: backbones.BackboneConfig) -> str:
  text = config.text
  return (f"{config.family} (hidden {text.hidden_size}, {text.num_hidden_layers} layers, vocab "
          f"{text.vocab_size}, vision width {config.vision.hidden_size} x depth "
          f"{config.vision.depth}, patch {config.vision.patch_size})")


def _param_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {"/".join(_path_keys(path)): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def backbone_param_shapes(config: backbones.BackboneConfig) -> dict[str, tuple[int, ...]]:
  """Path -> shape of every param of one backbone of `config` (nothing is allocated)."""
  model = backbones.model_class(config)(config)
  return _param_shapes(nn.unbox(jax.eval_shape(functools.partial(init_params, model),
                                               jax.random.PRNGKey(0))))


def read_vlm_backbone(vlm_checkpoint: str, backbone: backbones.BackboneConfig) -> Any:
  """The `backbone` params of a VLM run's latest whole checkpoint, checked against `backbone`
  (`ConfigError` naming both sizes and the first param whose shapes differ)."""
  # The checkpoint reader lives with the exporter (it restores any family's train state).
  from twinbrain_jax.training import export  # pylint: disable=g-import-not-at-top
  params, config_json, _ = export.restore_checkpoint(vlm_checkpoint)
  found = families.family(config_json)
  if found != "vlm":
    raise ConfigError(f"init.vlm_checkpoint={vlm_checkpoint} is a {found!r} run; it must be a "
                      "VLM run (config.family='vlm', configs/vlm.py).")
  saved = backbones.config_from_dict(ml_collections.ConfigDict(config_json["model"]["backbone"]))
  loaded = params["backbone"]
  if saved != backbone:
    got, want = _param_shapes(loaded), backbone_param_shapes(backbone)
    differing = [p for p in sorted(set(got) | set(want)) if got.get(p) != want.get(p)]
    shapes = (f" Param {differing[0]} has shape {got.get(differing[0])} there but "
              f"{want.get(differing[0])} in this model." if differing else
              " The param shapes agree, but other fields differ.")
    raise ConfigError(
        f"init.vlm_checkpoint={vlm_checkpoint} holds the backbone {_describe_backbone(saved)}, "
        f"but config.model.backbone is {_describe_backbone(backbone)}.{shapes} Train the VLM "
        "with the same backbone preset (configs/vlm.py) or choose that preset here.")
  return loaded


def load_pretrained_libra(state: TrainState, shardings: TrainState, model_cfg: libra.LibraConfig,
                          hf_checkpoint: str | None, siglip_checkpoint: str | None,
                          vlm_checkpoint: str | None = None) -> TrainState:
  """Replaces Libra's planner VLM by a Hugging Face Qwen2.5-VL checkpoint or a VLM run's
  backbone (`vlm_checkpoint`), and/or the refiner's encoder by a HF `SiglipVisionModel`
  checkpoint, each on the shardings of `shardings`."""
  params = dict(state.params)
  dtype = jnp.dtype(model_cfg.param_dtype)
  if vlm_checkpoint:
    target = shardings.params["planner"]
    loaded = read_vlm_backbone(vlm_checkpoint, model_cfg.backbone)
    params["planner"] = jax.device_put(
        {k: jax.tree.map(lambda x: jnp.asarray(x, dtype), v) for k, v in loaded.items()
         if k in target}, target)
  if hf_checkpoint:
    hf_config = hf_loading.load_config(hf_checkpoint)
    if hf_config != model_cfg.backbone:
      raise ConfigError(f"init.hf_checkpoint={hf_checkpoint} has backbone config {hf_config}, "
                        f"which differs from config.model.backbone {model_cfg.backbone}.")
    params["planner"] = jax.device_put(hf_loading.load_params(hf_checkpoint, hf_config,
                                                              param_dtype=dtype),
                                       shardings.params["planner"])
  if siglip_checkpoint:
    vision_config = siglip.load_config(siglip_checkpoint)
    if vision_config != model_cfg.siglip:
      raise ConfigError(f"init.siglip_checkpoint={siglip_checkpoint} has config {vision_config}, "
                        f"which differs from config.model.siglip {model_cfg.siglip}.")
    refiner = dict(params["refiner"])
    refiner["encoder"] = jax.device_put(siglip.load_params(siglip_checkpoint, vision_config,
                                                           param_dtype=dtype),
                                        shardings.params["refiner"]["encoder"])
    params["refiner"] = refiner
  return state.replace(params=params)


def count_params(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def tree_bytes_per_device(abstract: Any) -> int:
  """Bytes one device holds of an abstract (sharded) tree: the largest shard of each leaf."""
  total = 0
  for leaf in jax.tree.leaves(abstract):
    shape = leaf.shape
    if getattr(leaf, "sharding", None) is not None:
      shape = leaf.sharding.shard_shape(shape)
    total += int(np.prod(shape)) * jnp.dtype(leaf.dtype).itemsize
  return total

