"""The flow-matching action expert: the GR00T-N1 diffusion transformer (DiT).

    temb   = MLP(sinusoidal_256(int(t * 1000)))                          [B, D]
    tokens = [state token | F learned future tokens | action tokens]     [B, 1 + F + T, D]
             state token   = MLP(state)
             action tokens = W3 swish(W2 [W1 x_t | sinusoidal_D(int(t * 1000))]) + positions
    blocks: x += attn(AdaLN(x, temb)); x += FF(LN(x))  (even: cross-attention to the context,
            odd: self-attention; LN without affine; FF = GELU-tanh, 4x)
    out    = Linear(LN(x) * (1 + scale) + shift), (shift, scale) from temb
    v      = decoder MLP on the last T tokens                             [B, T, A]

D = num_heads * head_dim. The context `[B, Lc, Dc]` (e.g. the VLM's action-query states) enters
only through the cross-attention keys and values, which `ActionExpert.context_kv` computes once
per observation; the ODE sampler then reruns only the token stream per step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from twinbrain_jax import flow_matching
from twinbrain_jax.models.layers import (EinsumDense, check_remat_policy, dense,
                                         dot_product_attention, remat)

Dtype = Any
# One `(key, value)` pair per cross-attention block, each `[B, Lc, heads, head_dim]`.
ContextKV = tuple[tuple[jax.Array, jax.Array], ...]

_EMBED_INIT = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class ActionExpertConfig:
  """Sizes of the action expert. Defaults are GR00T-N1's head (16 x 12 x 64)."""
  num_layers: int = 16
  num_heads: int = 12
  head_dim: int = 64
  action_dim: int = 7
  action_horizon: int = 16
  # 0 drops the state token.
  state_dim: int = 7
  num_future_tokens: int = 32
  # Width of the context features, e.g. the VLM hidden size.
  context_dim: int = 2048
  timestep_embed_dim: int = 256
  # Hidden width of the state encoder and the action decoder MLPs; also the DiT output width.
  hidden_dim: int = 1024
  ff_multiplier: int = 4
  dropout: float = 0.2
  # Odd blocks self-attend when True; otherwise every block cross-attends.
  interleave_self_attention: bool = True
  attention_bias: bool = True
  num_timestep_buckets: int = 1000
  # >1 gives the state encoder, action encoder and decoder one weight set per embodiment.
  num_embodiments: int = 1
  norm_eps: float = 1e-5
  final_norm_eps: float = 1e-6
  # Rematerialise each block in the backward pass, keeping what the named policy allows
  # (`layers.REMAT_POLICIES`: "none", "dots" keeps the matmul outputs, "full" keeps nothing).
  remat_policy: str = "none"
  # One `nn.scan` over the blocks (a cross block and, interleaved, a self block per step), their
  # params stacked on a leading `layers` axis; False unrolls them (`block_{i}`).
  scan_layers: bool = True

  def __post_init__(self):
    positive = ("num_layers", "num_heads", "head_dim", "action_dim", "action_horizon",
                "context_dim", "timestep_embed_dim", "hidden_dim", "ff_multiplier",
                "num_timestep_buckets", "num_embodiments")
    for name in positive:
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"ActionExpertConfig.{name}={value!r} must be a positive int.")
    for name in ("state_dim", "num_future_tokens"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"ActionExpertConfig.{name}={value!r} must be a non-negative int.")
    if self.timestep_embed_dim % 2 or self.width % 2:
      raise ValueError(
          f"ActionExpertConfig: timestep_embed_dim ({self.timestep_embed_dim}) and the width "
          f"num_heads * head_dim ({self.width}) must be even for sinusoidal embeddings.")
    check_remat_policy(self.remat_policy, "ActionExpertConfig.remat_policy")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"ActionExpertConfig.dropout={self.dropout!r} must be in [0, 1).")

  @property
  def width(self) -> int:
    """D, the token width of the transformer."""
    return self.num_heads * self.head_dim

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the action tokens: the state token (if any) and the future tokens."""
    return int(self.state_dim > 0) + self.num_future_tokens

  def is_cross_block(self, index: int) -> bool:
    return not (self.interleave_self_attention and index % 2 == 1)

  @property
  def num_cross_blocks(self) -> int:
    return sum(self.is_cross_block(i) for i in range(self.num_layers))

  @property
  def blocks_per_group(self) -> int:
    """Blocks per scan step: (cross, self) when interleaved, else one cross block."""
    return 2 if self.interleave_self_attention else 1

  @property
  def num_groups(self) -> int:
    """Scan steps; an odd interleaved stack ends with one cross block outside the scan."""
    return self.num_layers // self.blocks_per_group

  @classmethod
  def from_config_dict(cls, config: Mapping[str, Any]) -> ActionExpertConfig:
    """Builds the config from an `ml_collections.ConfigDict` or a dict; unknown keys are errors."""
    items = dict(config.items())
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(items) - fields)
    if unknown:
      raise ValueError(
          f"Unknown action expert config key(s) {unknown}; the fields are {sorted(fields)}.")
    return cls(**items)


def sinusoidal_embedding(t: jax.Array, dim: int, *, max_period: float = 10000.0,
                         freq_shift: float = 0.0, cos_first: bool = False) -> jax.Array:
  """Sinusoidal features of scalar positions / timesteps, computed in float32.

  frequency_i = max_period ** (-i / (dim / 2 - freq_shift)), i = 0 .. dim / 2 - 1, and the result
  is `[sin(t f) | cos(t f)]` (or cos first). GR00T-N1 uses `freq_shift=1, cos_first=True` for the
  DiT timestep and the defaults for the action encoder.

  Args:
    t: `[...]` positions (any real values).
    dim: even output width.

  Returns:
    `[..., dim]` float32.
  """
  if dim % 2:
    raise ValueError(f"sinusoidal_embedding: dim={dim} must be even.")
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = t.astype(jnp.float32)[..., None] * jnp.exp(exponent)
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  return jnp.concatenate([cos, sin] if cos_first else [sin, cos], axis=-1)


def _dense(features: int, axes: tuple[str | None, str | None], name: str, dtype: Dtype,
           param_dtype: Dtype) -> nn.Dense:
  return dense(features, axes, kernel_init=nn.initializers.lecun_normal(), dtype=dtype,
               param_dtype=param_dtype, name=name)


class EmbodimentDense(nn.Module):
  """A dense layer with one weight set per embodiment (GR00T's category-specific linear).

  Attributes:
    features: output width.
    num_embodiments: number of weight sets; with 1, `embodiment_id` is ignored.
    axes: logical names of the (input, output) kernel axes.
  """
  features: int
  num_embodiments: int
  axes: tuple[str | None, str | None]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, embodiment_id: jax.Array | None) -> jax.Array:
    """`x [B, ..., I]`, `embodiment_id [B]` int -> `[B, ..., features]`."""
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(
            nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,)),
            (None,) + self.axes),
        (self.num_embodiments, x.shape[-1], self.features), self.param_dtype)
    bias = self.param(
        "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, self.axes[1])),
        (self.num_embodiments, self.features), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if self.num_embodiments == 1:
      return jnp.einsum("b...i,io->b...o", x, kernel[0]) + bias[0]
    if embodiment_id is None:
      raise ValueError(
          f"{self.name}: num_embodiments={self.num_embodiments}, so embodiment_id [B] is required.")
    kernel, bias = kernel[embodiment_id], bias[embodiment_id]
    bias = bias.reshape(bias.shape[:1] + (1,) * (x.ndim - 2) + bias.shape[1:])
    return jnp.einsum("b...i,bio->b...o", x, kernel) + bias


class EmbodimentMLP(nn.Module):
  """Two `EmbodimentDense` layers with a ReLU between them."""
  hidden_dim: int
  features: int
  num_embodiments: int
  axes: tuple[str, str, str]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, embodiment_id: jax.Array | None) -> jax.Array:
    kw = dict(num_embodiments=self.num_embodiments, dtype=self.dtype, param_dtype=self.param_dtype)
    x = EmbodimentDense(self.hidden_dim, axes=self.axes[:2], name="layer1", **kw)(x, embodiment_id)
    x = EmbodimentDense(self.features, axes=self.axes[1:], name="layer2", **kw)(
        nn.relu(x), embodiment_id)
    return x


class Attention(nn.Module):
  """Multi-head attention whose key/value projection can run ahead of time (cached context).

  Attributes:
    features: D, the width of the attending tokens (and of the output).
  """
  features: int
  num_heads: int
  head_dim: int
  kv_features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    heads = (self.num_heads, self.head_dim)
    to_heads = lambda features, name: EinsumDense(
        "bld,dhk->blhk", (features, *heads), ("embed", "heads", "kv"), name=name,
        kernel_init=nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)), **kw)
    self.query = to_heads(self.features, "query")
    self.key = to_heads(self.kv_features, "key")
    self.value = to_heads(self.kv_features, "value")
    self.out = EinsumDense("blhk,hkd->bld", (*heads, self.features), ("heads", "kv", "embed"),
                           contracted=2, name="out", **kw,
                           kernel_init=nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2))

  def key_value(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`x [B, S, Dkv]` -> `(k, v)`, each `[B, S, H, K]`."""
    names = ("batch", "length", "heads", "kv")
    return (nn.with_logical_constraint(self.key(x), names),
            nn.with_logical_constraint(self.value(x), names))

  def __call__(self, x: jax.Array, kv: tuple[jax.Array, jax.Array] | None = None,
               key_mask: jax.Array | None = None) -> jax.Array:
    """`x [B, L, D]` attends to `kv` (cross-attention) or to itself when `kv` is None."""
    key, value = self.key_value(x) if kv is None else kv
    query = self.query(x)
    mask = jnp.ones(query.shape[:2] + key.shape[1:2], bool)  # [B, L, S]
    if key_mask is not None:
      mask &= key_mask[:, None, :].astype(bool)
    return self.out(dot_product_attention(query, key, value, mask))


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """`x [B, L, D]` * (1 + scale [B, D]) + shift [B, D]."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
  """x += attn(AdaLN(x, temb)); x += FF(LN(x)). Cross-attends when `cross_attention`."""
  config: ActionExpertConfig
  cross_attention: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config
    self.attn = Attention(c.width, c.num_heads, c.head_dim,
                          kv_features=c.context_dim if self.cross_attention else c.width,
                          use_bias=c.attention_bias,
                          dtype=self.dtype, param_dtype=self.param_dtype, name="attn")

  def context_kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`context [B, Lc, Dc]` -> this block's `(k, v)`, each `[B, Lc, H, K]`."""
    return self.attn.key_value(context)

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, kv: tuple[jax.Array, jax.Array] | None,
               context_mask: jax.Array | None, deterministic: bool) -> jax.Array:
    """`x [B, L, D]`, `temb [B, D]`, `kv` the cached context K/V (cross blocks) -> `[B, L, D]`."""
    c, width = self.config, self.config.width
    dense = lambda n, axes, name: _dense(n, axes, name, self.dtype, self.param_dtype)
    layer_norm = lambda name: nn.LayerNorm(
        epsilon=c.norm_eps, use_bias=False, use_scale=False, dtype=self.dtype, name=name)
    scale, shift = jnp.split(dense(2 * width, ("embed", "mlp"), "adaln")(nn.silu(temb)), 2, -1)
    h = _modulate(layer_norm("attn_norm")(x), shift, scale)
    if self.cross_attention:
      h = self.attn(h, kv, context_mask)
    else:
      h = self.attn(h)
    x = x + nn.Dropout(c.dropout)(h, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    h = dense(c.ff_multiplier * width, ("embed", "mlp"), "ff_up")(layer_norm("ff_norm")(x))
    h = nn.Dropout(c.dropout)(nn.gelu(h, approximate=True), deterministic=deterministic)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = dense(width, ("mlp", "embed"), "ff_down")(h)
    x = x + nn.Dropout(c.dropout)(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class DiTBlockGroup(nn.Module):
  """One scan step of the block pattern: a cross-attention block, then (interleaved) a
  self-attention block. Params `cross_attention/...`, `self_attention/...`."""
  config: ActionExpertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.cross_attention = DiTBlock(self.config, True, **kw)
    if self.config.interleave_self_attention:
      self.self_attention = DiTBlock(self.config, False, **kw)

  def context_kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.cross_attention.context_kv(context)

  def __call__(self, x: jax.Array, kv: tuple[jax.Array, jax.Array], temb: jax.Array,
               context_mask: jax.Array | None, deterministic: bool) -> jax.Array:
    x = self.cross_attention(x, temb, kv, context_mask, deterministic)
    if self.config.interleave_self_attention:
      x = self.self_attention(x, temb, None, None, deterministic)
    return x


class ActionExpert(nn.Module):
  """GR00T-N1 flow-matching DiT: predicts the velocity of a noisy action chunk.

  Attributes:
    config: sizes, see `ActionExpertConfig`.
    dtype: compute dtype; norms, softmax and sinusoids run in float32 regardless.
    param_dtype: parameter storage dtype.
  """
  config: ActionExpertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    c, width = self.config, self.config.width
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # `deterministic` (argument 5, counting self) is a Python bool.
    block_cls = remat(DiTBlock, c.remat_policy, static_argnums=(5,))
    if c.scan_layers:
      # Only ever called through `_scan_groups` (params [num_groups, ...]).
      self.groups = DiTBlockGroup(c, name="blocks", **kw)
      first_unscanned = c.num_groups * c.blocks_per_group
    else:
      first_unscanned = 0
    self.blocks = [block_cls(c, c.is_cross_block(i), name=f"block_{i}", **kw)
                   for i in range(first_unscanned, c.num_layers)]
    self.time_in = _dense(width, (None, "embed"), "time_in", **kw)
    self.time_out = _dense(width, ("embed", "mlp"), "time_out", **kw)
    emb = dict(num_embodiments=c.num_embodiments, **kw)
    if c.state_dim:
      self.state_encoder = EmbodimentMLP(c.hidden_dim, width, axes=("state", "mlp", "embed"),
                                         name="state_encoder", **emb)
    self.action_in = EmbodimentDense(width, axes=("action", "embed"), name="action_in", **emb)
    self.action_mix = EmbodimentDense(width, axes=("mlp", "embed"), name="action_mix", **emb)
    self.action_out = EmbodimentDense(width, axes=("embed", "mlp"), name="action_out", **emb)
    self.action_positions = self.param(
        "action_positions", nn.with_logical_partitioning(_EMBED_INIT, ("length", "embed")),
        (c.action_horizon, width), self.param_dtype)
    if c.num_future_tokens:
      self.future_tokens = self.param(
          "future_tokens", nn.with_logical_partitioning(_EMBED_INIT, ("length", "embed")),
          (c.num_future_tokens, width), self.param_dtype)
    self.final_modulation = _dense(2 * width, ("embed", "mlp"), "final_modulation", **kw)
    self.final_norm = nn.LayerNorm(epsilon=c.final_norm_eps, use_bias=False, use_scale=False,
                                   dtype=self.dtype, name="final_norm")
    self.proj_out = _dense(c.hidden_dim, ("embed", "mlp"), "proj_out", **kw)
    self.decoder = EmbodimentMLP(c.hidden_dim, c.action_dim, axes=("embed", "mlp", "action"),
                                 name="decoder", **emb)

  def context_kv(self, context: jax.Array) -> ContextKV:
    """The cross-attention keys/values of `context [B, Lc, Dc]`, one pair per cross block.

    Depends only on the context, so it runs once per observation and is reused across ODE steps
    and noise draws (see `flow_matching.repeat_batch`).
    """
    c = self.config
    if context.ndim != 3 or context.shape[-1] != c.context_dim:
      raise ValueError(
          f"ActionExpert: context must be [B, Lc, {c.context_dim}] (context_dim); got shape "
          f"{context.shape}. Set ActionExpertConfig.context_dim to the conditioning width.")
    context = nn.with_logical_constraint(context, ("batch", "length", "embed"))
    scanned = ()
    if c.scan_layers:
      body = lambda group, carry, _: (carry, group.context_kv(context))  # noqa: E731
      _, (keys, values) = self._scan_groups(body, None, None)
      scanned = tuple((keys[i], values[i]) for i in range(c.num_groups))
    return scanned + tuple(block.context_kv(context) for block in self.blocks
                           if block.cross_attention)

  def _scan_groups(self, body, carry, xs, remat_policy: str = "none"):
    """`nn.scan` of `body(group, carry, x)` over the stacked block groups."""
    body = remat(body, remat_policy, prevent_cse=False)
    scan = nn.scan(body, variable_axes={"params": 0},
                   split_rngs={"params": True, "dropout": True}, length=self.config.num_groups,
                   metadata_params={nn.PARTITION_NAME: "layers"})
    return scan(self.groups, carry, xs)

  def timestep_embedding(self, t: jax.Array) -> jax.Array:
    """`t [B]` float in [0, 1] -> temb `[B, D]` of the discretised timestep."""
    c = self.config
    steps = flow_matching.discretize_timestep(t, c.num_timestep_buckets)
    freqs = sinusoidal_embedding(steps, c.timestep_embed_dim, freq_shift=1.0, cos_first=True)
    hidden = nn.with_logical_constraint(nn.silu(self.time_in(freqs.astype(self.dtype))),
                                        ("batch", "embed"))
    return nn.with_logical_constraint(self.time_out(hidden), ("batch", "embed"))

  def encode_actions(self, noisy_actions: jax.Array, t: jax.Array,
                     embodiment_id: jax.Array | None) -> jax.Array:
    """`x_t [B, T, A]`, `t [B]` -> action tokens `[B, T, D]`."""
    c = self.config
    horizon = noisy_actions.shape[1]
    steps = flow_matching.discretize_timestep(t, c.num_timestep_buckets)
    time_features = sinusoidal_embedding(steps, c.width).astype(self.dtype)      # [B, D]
    time_features = jnp.broadcast_to(time_features[:, None, :],
                                     (noisy_actions.shape[0], horizon, c.width))
    # Named so that the batch, not the fsdp-sharded kernels' feature axis, decides the sharding.
    names = ("batch", "length", "embed")
    x = nn.with_logical_constraint(self.action_in(noisy_actions, embodiment_id), names)
    x = jnp.concatenate([x, time_features], -1)
    x = nn.with_logical_constraint(nn.swish(self.action_mix(x, embodiment_id)), names)
    x = nn.with_logical_constraint(self.action_out(x, embodiment_id), names)
    return x + self.action_positions[:horizon].astype(x.dtype)

  def __call__(self, noisy_actions: jax.Array, t: jax.Array, *,
               context: jax.Array | None = None, context_kv: ContextKV | None = None,
               context_mask: jax.Array | None = None, state: jax.Array | None = None,
               embodiment_id: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    """Predicts the flow velocity.

    Args:
      noisy_actions: `[B, T, A]` x_t, T <= action_horizon.
      t: `[B]` float times in [0, 1] (1 = clean).
      context: `[B, Lc, Dc]` conditioning features; give this or `context_kv`.
      context_kv: the output of `context_kv(context)`, reused across calls.
      context_mask: `[B, Lc]` bool, False for padded context tokens; None = all valid.
      state: `[B, state_dim]` proprioception (required when `config.state_dim > 0`).
      embodiment_id: `[B]` int, required when `config.num_embodiments > 1`.
      deterministic: False applies dropout (needs the `dropout` rng).

    Returns:
      Velocity `[B, T, A]` in the compute dtype.
    """
    c = self.config
    batch = self._check_inputs(noisy_actions, t, context, context_kv, context_mask, state)
    if context_kv is None:
      context_kv = self.context_kv(context)
    temb = self.timestep_embedding(t)                                              # [B, D]

    tokens = []
    if c.state_dim:
      tokens.append(self.state_encoder(state, embodiment_id)[:, None, :])         # [B, 1, D]
    if c.num_future_tokens:
      tokens.append(jnp.broadcast_to(self.future_tokens.astype(self.dtype),
                                     (batch,) + self.future_tokens.shape))         # [B, F, D]
    tokens.append(self.encode_actions(noisy_actions, t, embodiment_id))           # [B, T, D]
    x = jnp.concatenate([tok.astype(self.dtype) for tok in tokens], axis=1)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    cross_kv = iter(context_kv)
    if c.scan_layers:
      group_kv = [next(cross_kv) for _ in range(c.num_groups)]
      stacked_kv = tuple(jnp.stack(part) for part in zip(*group_kv))  # ([G, B, Lc, H, K],) * 2

      def body(group, x, kv):
        return group(x, kv, temb, context_mask, deterministic), None

      x, _ = self._scan_groups(body, x, stacked_kv, c.remat_policy)
    for block in self.blocks:
      kv = next(cross_kv) if block.cross_attention else None
      x = block(x, temb, kv, context_mask, deterministic)

    # Only the action tokens are decoded; the rest of the sequence is conditioning.
    x = x[:, -noisy_actions.shape[1]:]
    shift, scale = jnp.split(self.final_modulation(nn.silu(temb)), 2, axis=-1)
    x = self.proj_out(_modulate(self.final_norm(x), shift, scale))
    return self.decoder(x, embodiment_id)                                          # [B, T, A]

  def _check_inputs(self, noisy_actions, t, context, context_kv, context_mask, state) -> int:
    c = self.config
    if noisy_actions.ndim != 3 or noisy_actions.shape[-1] != c.action_dim:
      raise ValueError(f"ActionExpert: noisy_actions must be [B, T, {c.action_dim}] "
                       f"(action_dim); got shape {noisy_actions.shape}.")
    batch, horizon = noisy_actions.shape[:2]
    if horizon > c.action_horizon:
      raise ValueError(f"ActionExpert: the chunk has {horizon} steps but action_horizon is "
                       f"{c.action_horizon}; raise ActionExpertConfig.action_horizon.")
    if t.shape != (batch,):
      raise ValueError(f"ActionExpert: t must be [B] = ({batch},) float times; got {t.shape}.")
    if (context is None) == (context_kv is None):
      raise ValueError("ActionExpert: pass exactly one of `context` [B, Lc, Dc] or `context_kv` "
                       "(from ActionExpert.context_kv).")
    if context_kv is not None and len(context_kv) != c.num_cross_blocks:
      raise ValueError(f"ActionExpert: context_kv has {len(context_kv)} entries but the model "
                       f"has {c.num_cross_blocks} cross-attention blocks.")
    context_len = (context if context is not None else context_kv[0][0]).shape[:2]
    if context_mask is not None and context_mask.shape != context_len:
      raise ValueError(f"ActionExpert: context_mask must be [B, Lc] = {context_len}; got "
                       f"{context_mask.shape}.")
    if c.state_dim and (state is None or state.shape != (batch, c.state_dim)):
      raise ValueError(
          f"ActionExpert: state must be [B, {c.state_dim}] = ({batch}, {c.state_dim}); got "
          f"{None if state is None else state.shape}. Set state_dim=0 to drop the state token.")
    return batch


def scanned_expert_params(params: Mapping[str, Any], config: ActionExpertConfig
                          ) -> dict[str, Any]:
  """Unrolled expert params (`block_{i}`) in the scanned layout: blocks `kg` .. `kg + k - 1`
  (k = `blocks_per_group`) -> `blocks/cross_attention` (/ `blocks/self_attention`), stacked over
  g; a trailing unpaired block keeps its name."""
  params, per_group = dict(params), config.blocks_per_group
  roles = ("cross_attention", "self_attention")[:per_group]
  groups = [{role: params.pop(f"block_{g * per_group + j}") for j, role in enumerate(roles)}
            for g in range(config.num_groups)]
  params["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *groups)
  return params


def action_expert_flops(config: ActionExpertConfig, batch: int, context_len: int,
                        include_context_kv: bool = True) -> int:
  """Forward matmul FLOPs (2 * m * n * k) of one `ActionExpert` call on a full chunk.

  Counts every dense layer and the two attention matmuls; norms, activations and softmax are
  ignored. `include_context_kv=False` drops the cross-attention K/V projections of the
  context, i.e. the per-ODE-step cost when the context K/V are cached. A training step costs
  about 3x the forward.
  """
  c, d = config, config.width
  horizon, tokens = c.action_horizon, c.num_prefix_tokens + c.action_horizon
  per_example = 0
  per_example += c.timestep_embed_dim * d + d * d                    # timestep MLP
  per_example += c.num_layers * d * 2 * d + d * 2 * d                # AdaLN modulations
  if c.state_dim:
    per_example += c.state_dim * c.hidden_dim + c.hidden_dim * d     # state encoder
  per_example += horizon * (c.action_dim * d + 2 * d * d + d * d)    # action encoder
  for i in range(c.num_layers):
    ff = 2 * tokens * d * c.ff_multiplier * d
    if c.is_cross_block(i):
      kv = 2 * context_len * c.context_dim * d if include_context_kv else 0
      per_example += 2 * tokens * d * d + kv + 2 * tokens * context_len * d + ff
    else:
      per_example += 4 * tokens * d * d + 2 * tokens * tokens * d + ff
  per_example += horizon * (d * c.hidden_dim + c.hidden_dim * c.hidden_dim
                            + c.hidden_dim * c.action_dim)           # output proj + decoder
  return 2 * batch * per_example
