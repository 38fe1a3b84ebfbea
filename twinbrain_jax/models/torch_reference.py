"""A PyTorch twin of TwinBrainVLA (Qwen2.5-VL backbone) for speed comparisons and parity tests.

Both brains are HF transformers' `Qwen2_5_VLModel`. The frozen left brain runs under
`torch.no_grad()` with `use_cache=True`, so it returns every layer's post-RoPE K/V; the
trainable right brain then runs with that cache as its `past_key_values`: at each layer HF
appends the right K/V to the left's and the right queries attend to
`[left K/V (no gradient) | right K/V]` under a causal mask offset by the left length. That is
AsyMoT in `mask_mode="all_left"` for unpadded prompts, built from the public model code the
way a PyTorch implementation would. The state encoder and the action expert (GR00T-N1's DiT,
`dit.py`) are written out below with the Flax modules' parameter layout, so `from_flax` can copy
a Flax model's weights.

torch and transformers are benchmark/test dependencies (`pyproject.toml`'s `test` extra), not
runtime ones: only `scripts/bench_twinbrain.py --torch` and the tests import this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import torch
import transformers
from torch import nn
from torch.nn import functional as F

from twinbrain_jax.models import backbones, hf_loading
from twinbrain_jax.models.dit import ActionExpertConfig
from twinbrain_jax.models.twinbrain import TwinBrainConfig

# Inputs the brains read, as produced by `twinbrain.synthetic_observation` / `inputs.ModelInputs`.
OBSERVATION_KEYS = ("left_input_ids", "left_position_ids", "right_input_ids",
                    "right_position_ids", "pixel_values", "state")


def _sinusoidal(t: torch.Tensor, dim: int, freq_shift: float = 0.0,
                cos_first: bool = False) -> torch.Tensor:
  """`dit.sinusoidal_embedding`: `t [...]` -> `[..., dim]` float32."""
  half = dim // 2
  exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - freq_shift)
  angles = t.float()[..., None] * torch.exp(exponent)
  sin, cos = torch.sin(angles), torch.cos(angles)
  return torch.cat([cos, sin] if cos_first else [sin, cos], dim=-1)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
  """`x [B, L, D] * (1 + scale [B, D]) + shift [B, D]`."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


class _MLP(nn.Module):
  """`dit.EmbodimentMLP` with one embodiment: Linear -> ReLU -> Linear."""

  def __init__(self, in_features: int, hidden: int, out_features: int):
    super().__init__()
    self.layer1 = nn.Linear(in_features, hidden)
    self.layer2 = nn.Linear(hidden, out_features)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.layer2(F.relu(self.layer1(x)))


class _Attention(nn.Module):
  """`dit.Attention`: multi-head attention whose K/V projection can run ahead of time."""

  def __init__(self, width: int, num_heads: int, head_dim: int, kv_width: int, bias: bool):
    super().__init__()
    self.num_heads, self.head_dim = num_heads, head_dim
    inner = num_heads * head_dim
    self.query = nn.Linear(width, inner, bias=bias)
    self.key = nn.Linear(kv_width, inner, bias=bias)
    self.value = nn.Linear(kv_width, inner, bias=bias)
    self.out = nn.Linear(inner, width, bias=bias)

  def _heads(self, x: torch.Tensor) -> torch.Tensor:
    """`[B, L, H * K]` -> `[B, H, L, K]`."""
    return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

  def key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [B, S, Dkv]` -> `(k, v)`, each `[B, H, S, K]`."""
    return self._heads(self.key(x)), self._heads(self.value(x))

  def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
              key_mask: torch.Tensor | None = None) -> torch.Tensor:
    key, value = self.key_value(x) if kv is None else kv
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(self._heads(self.query(x)), key, value, attn_mask=mask)
    return self.out(out.transpose(1, 2).flatten(2))


class _DiTBlock(nn.Module):
  """`dit.DiTBlock`: x += attn(AdaLN(x, temb)); x += FF(LN(x))."""

  def __init__(self, config: ActionExpertConfig, cross_attention: bool):
    super().__init__()
    width = config.width
    self.cross_attention, self.eps = cross_attention, config.norm_eps
    self.adaln = nn.Linear(width, 2 * width)
    self.attn = _Attention(width, config.num_heads, config.head_dim,
                           config.context_dim if cross_attention else width,
                           config.attention_bias)
    self.ff_up = nn.Linear(width, config.ff_multiplier * width)
    self.ff_down = nn.Linear(config.ff_multiplier * width, width)

  def forward(self, x: torch.Tensor, temb: torch.Tensor,
              kv: tuple[torch.Tensor, torch.Tensor] | None,
              context_mask: torch.Tensor | None) -> torch.Tensor:
    width = x.shape[-1]
    scale, shift = self.adaln(F.silu(temb)).chunk(2, dim=-1)
    h = _modulate(F.layer_norm(x, (width,), eps=self.eps), shift, scale)
    x = x + (self.attn(h, kv, context_mask) if self.cross_attention else self.attn(h))
    h = F.gelu(self.ff_up(F.layer_norm(x, (width,), eps=self.eps)), approximate="tanh")
    return x + self.ff_down(h)


class ActionExpert(nn.Module):
  """`dit.ActionExpert` (one embodiment, no dropout): the velocity of a noisy action chunk."""

  def __init__(self, config: ActionExpertConfig):
    super().__init__()
    if config.num_embodiments != 1:
      raise ValueError(f"torch_reference.ActionExpert supports num_embodiments=1; got "
                       f"{config.num_embodiments}.")
    c, width = config, config.width
    self.config = c
    self.blocks = nn.ModuleList([_DiTBlock(c, c.is_cross_block(i)) for i in range(c.num_layers)])
    self.time_in = nn.Linear(c.timestep_embed_dim, width)
    self.time_out = nn.Linear(width, width)
    if c.state_dim:
      self.state_encoder = _MLP(c.state_dim, c.hidden_dim, width)
    self.action_in = nn.Linear(c.action_dim, width)
    self.action_mix = nn.Linear(2 * width, width)
    self.action_out = nn.Linear(width, width)
    self.action_positions = nn.Parameter(0.02 * torch.randn(c.action_horizon, width))
    if c.num_future_tokens:
      self.future_tokens = nn.Parameter(0.02 * torch.randn(c.num_future_tokens, width))
    self.final_modulation = nn.Linear(width, 2 * width)
    self.proj_out = nn.Linear(width, c.hidden_dim)
    self.decoder = _MLP(width, c.hidden_dim, c.action_dim)

  def context_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`context [B, Lc, Dc]` -> one `(k, v)` pair `[B, H, Lc, K]` per cross-attention block."""
    return [block.attn.key_value(context) for block in self.blocks if block.cross_attention]

  def forward(self, noisy_actions: torch.Tensor, t: torch.Tensor,
              context_kv: list[tuple[torch.Tensor, torch.Tensor]],
              context_mask: torch.Tensor | None, state: torch.Tensor | None) -> torch.Tensor:
    """`x_t [B, T, A]`, `t [B]` (1 = clean) -> velocity `[B, T, A]`."""
    c = self.config
    batch, horizon = noisy_actions.shape[:2]
    steps = torch.clamp(torch.floor(t * c.num_timestep_buckets), 0, c.num_timestep_buckets)
    temb = self.time_out(F.silu(self.time_in(
        _sinusoidal(steps, c.timestep_embed_dim, freq_shift=1.0, cos_first=True))))  # [B, D]
    tokens = []
    if c.state_dim:
      tokens.append(self.state_encoder(state)[:, None, :])
    if c.num_future_tokens:
      tokens.append(self.future_tokens.expand(batch, -1, -1))
    time_features = _sinusoidal(steps, c.width)[:, None, :].expand(batch, horizon, c.width)
    x = F.silu(self.action_mix(torch.cat([self.action_in(noisy_actions), time_features], -1)))
    tokens.append(self.action_out(x) + self.action_positions[:horizon])
    x = torch.cat(tokens, dim=1)
    cross_kv = iter(context_kv)
    for block in self.blocks:
      x = block(x, temb, next(cross_kv) if block.cross_attention else None, context_mask)
    shift, scale = self.final_modulation(F.silu(temb)).chunk(2, dim=-1)
    x = _modulate(F.layer_norm(x[:, -horizon:], (c.width,), eps=c.final_norm_eps), shift, scale)
    return self.decoder(self.proj_out(x))


def hf_backbone(config: TwinBrainConfig, seed: int = 0
                ) -> transformers.Qwen2_5_VLForConditionalGeneration:
  """A randomly initialised fp32 HF model of `config.backbone`; `.model` is a brain and
  `save_pretrained` writes a checkpoint `hf_loading.load_params` reads."""
  torch.manual_seed(seed)
  hf_config = transformers.Qwen2_5_VLConfig(**hf_loading.hf_config_kwargs(config.backbone))
  return transformers.Qwen2_5_VLForConditionalGeneration(hf_config).float()


class TwinBrainVLA(nn.Module):
  """The dual-brain policy: frozen `left`, trainable `right` (HF models), state encoder, expert.

  Supports what the Flax model's defaults describe: Qwen2.5-VL backbones, `variant="twinbrain"`,
  `mask_mode="all_left"`, `conditioning="action_queries"`, one embodiment, prompts without
  padding (every row of a batch the same length).
  """

  def __init__(self, config: TwinBrainConfig, left: transformers.Qwen2_5_VLModel,
               right: transformers.Qwen2_5_VLModel):
    super().__init__()
    unsupported = {name: value for name, value, wanted in (
        ("backbone.family", config.backbone.family, backbones.DEFAULT_FAMILY),
        ("variant", config.variant, "twinbrain"), ("mask_mode", config.mask_mode, "all_left"),
        ("conditioning", config.conditioning, "action_queries"),
        ("num_embodiments", config.num_embodiments, 1)) if value != wanted}
    if unsupported:
      raise ValueError(f"torch_reference.TwinBrainVLA does not support {unsupported}.")
    self.config = config
    self.left = left.eval().requires_grad_(False)
    self.right = right
    self.state_encoder = _MLP(config.state_dim, config.state_hidden_dim,
                              config.backbone.text.hidden_size)
    self.action_expert = ActionExpert(config.action_expert)

  def trainable_parameters(self) -> list[nn.Parameter]:
    return [p for p in self.parameters() if p.requires_grad]

  def encode(self, obs: Mapping[str, torch.Tensor], image_grid_thw: torch.Tensor
             ) -> torch.Tensor:
    """Both brains -> the right brain's final-norm states at the action queries `[B, N, E]`."""
    c = self.config
    with torch.no_grad():
      left = self.left(input_ids=obs["left_input_ids"], pixel_values=obs["pixel_values"],
                       image_grid_thw=image_grid_thw, position_ids=obs["left_position_ids"],
                       use_cache=True)
    ids = obs["right_input_ids"]
    embeds = self.right.get_input_embeddings()(ids)
    state = self.state_encoder(obs["state"])
    embeds = torch.where((ids == c.propri_token_id)[..., None], state[:, None, :], embeds)
    hidden = self.right(input_ids=ids, inputs_embeds=embeds, pixel_values=obs["pixel_values"],
                        image_grid_thw=image_grid_thw, position_ids=obs["right_position_ids"],
                        past_key_values=left.past_key_values).last_hidden_state
    return hidden[ids == c.action_token_id].unflatten(0, (ids.shape[0], c.num_action_queries))

  def flow_loss(self, obs: Mapping[str, torch.Tensor], image_grid_thw: torch.Tensor,
                actions: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`flow_matching.flow_loss` on R = len(t) / B draws (row `b * R + r` is
    sample `b`), every action valid.

    Args:
      actions: `[B, T, A]` clean actions.
      noise: `[R * B, T, A]` standard normal draws.
      t: `[R * B]` times (1 = clean).
    """
    num_repeats = t.shape[0] // actions.shape[0]
    context_kv = self.action_expert.context_kv(self.encode(obs, image_grid_thw))
    repeated_kv = [(k.repeat_interleave(num_repeats, 0), v.repeat_interleave(num_repeats, 0))
                   for k, v in context_kv]
    actions = actions.repeat_interleave(num_repeats, 0)
    x_t = (1 - t[:, None, None]) * noise + t[:, None, None] * actions
    velocity = self.action_expert(x_t, t, repeated_kv, None,
                                  obs["state"].repeat_interleave(num_repeats, 0))
    return torch.mean(torch.square(velocity - (actions - noise)))

  @torch.no_grad()
  def sample_actions(self, obs: Mapping[str, torch.Tensor], image_grid_thw: torch.Tensor,
                     noise: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Euler integration from `noise [B, T, A]` (t = 0) to t = 1; the brains run once."""
    context_kv = self.action_expert.context_kv(self.encode(obs, image_grid_thw))
    x = noise
    for k in range(num_steps):
      t = torch.full((x.shape[0],), k / num_steps)
      x = x + self.action_expert(x, t, context_kv, None, obs["state"]) / num_steps
    return x


def draw_noise_and_time(batch: int, num_repeats: int, chunk_shape: tuple[int, int],
                        generator: torch.Generator, alpha: float = 1.5, s: float = 0.999
                        ) -> tuple[torch.Tensor, torch.Tensor]:
  """Noise `[R * B, T, A]` and times `[R * B]`, `t = (s - u ** (1 / alpha)) / s` as in
  `flow_matching.sample_time` (Beta(alpha, 1) by its inverse CDF)."""
  rows = batch * num_repeats
  noise = torch.randn((rows,) + tuple(chunk_shape), generator=generator)
  tau = torch.rand((rows,), generator=generator) ** (1.0 / alpha)
  return noise, (s - tau) / s


def observation_to_torch(obs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
  """The brains' inputs (numpy/JAX arrays) as torch tensors (ids and positions int64); padded
  prompts are refused."""
  missing = [key for key in OBSERVATION_KEYS if key not in obs]
  if missing:
    raise KeyError(f"observation_to_torch: the observation lacks {missing}.")
  for key in ("left_attention_mask", "right_attention_mask"):
    if key in obs and not np.all(np.asarray(obs[key])):
      raise ValueError(f"observation_to_torch: {key} has padding; the PyTorch twin takes "
                       "unpadded prompts only (give every row of the batch the same length).")
  out = {}
  for key in OBSERVATION_KEYS:
    value = np.asarray(obs[key])
    out[key] = torch.from_numpy(value.astype(np.int64 if "ids" in key else np.float32))
  return out


# ---------------------------------------------------------------------------------------------
# Weights from the Flax model.

def _linear_from(linear: nn.Linear, params: Mapping[str, Any]) -> None:
  """Copies a Flax dense/einsum-dense `{kernel [I..., O...], bias [O...]}` into `linear`.

  The kernel's leading axes up to `linear.in_features` are the inputs (an `EmbodimentDense`
  kernel `[1, I, O]` drops its embodiment axis first).
  """
  kernel, bias = np.asarray(params["kernel"], np.float32), np.asarray(params["bias"], np.float32)
  if kernel.ndim == 3 and kernel.shape[0] == 1 and bias.ndim == 2:  # EmbodimentDense
    kernel, bias = kernel[0], bias[0]
  kernel = kernel.reshape(linear.in_features, linear.out_features)
  with torch.no_grad():
    linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
    linear.bias.copy_(torch.from_numpy(bias.reshape(-1).copy()))


def _block_params(params: Mapping[str, Any], config: ActionExpertConfig, index: int) -> Any:
  """Flax params of DiT block `index`, from the scanned (`blocks/...`) or unrolled layout."""
  if f"block_{index}" in params:
    return params[f"block_{index}"]
  group, role = divmod(index, config.blocks_per_group)
  stacked = params["blocks"][("cross_attention", "self_attention")[role]]
  return jax.tree.map(lambda x: np.asarray(x)[group], stacked)


def load_flax_expert(expert: ActionExpert, params: Mapping[str, Any]) -> None:
  """Copies the Flax `ActionExpert` params (scanned or unrolled) into `expert`."""
  c = expert.config
  for name in ("time_in", "time_out", "action_in", "action_mix", "action_out",
               "final_modulation", "proj_out"):
    _linear_from(getattr(expert, name), params[name])
  for name in ("decoder",) + (("state_encoder",) if c.state_dim else ()):
    for layer in ("layer1", "layer2"):
      _linear_from(getattr(getattr(expert, name), layer), params[name][layer])
  with torch.no_grad():
    expert.action_positions.copy_(torch.from_numpy(np.array(params["action_positions"])))
    if c.num_future_tokens:
      expert.future_tokens.copy_(torch.from_numpy(np.array(params["future_tokens"])))
  for i, block in enumerate(expert.blocks):
    block_params = _block_params(params, c, i)
    for name in ("adaln", "ff_up", "ff_down"):
      _linear_from(getattr(block, name), block_params[name])
    for name in ("query", "key", "value", "out"):
      _linear_from(getattr(block.attn, name), block_params["attn"][name])


def load_flax_heads(model: TwinBrainVLA, params: Mapping[str, Any]) -> None:
  """Copies the Flax state encoder and action expert into `model` (the brains come from HF)."""
  for layer in ("layer1", "layer2"):
    _linear_from(getattr(model.state_encoder, layer), params["state_encoder"][layer])
  load_flax_expert(model.action_expert, params["action_expert"])
