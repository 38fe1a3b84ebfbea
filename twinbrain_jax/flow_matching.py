"""Flow matching for action chunks: time sampling, the training loss and the ODE sampler.

GR00T-N1 convention: t = 0 is pure noise, t = 1 is clean data.

    x_t = (1 - t) * noise + t * actions          target velocity  v = actions - noise

so integrating dx/dt = v(x, t) from t = 0 to 1 carries N(0, I) onto the action distribution.
Training times are skewed toward noise: tau ~ Beta(1.5, 1), t = (s - tau) / s with s = 0.999.
The network sees the timestep discretised into 1000 buckets, `int(t * 1000)`.

Everything here is a pure function of explicit rngs and of a `velocity_fn(x_t, t) -> v` with
`x_t [B, T, A]`, `t [B]` float in [0, 1] and `v [B, T, A]`. The caller closes `velocity_fn` over
the model params and the observation's cached context, so the loss can draw R noise samples per
observation and the sampler can run only the action expert per ODE step:

    kv = model.apply(params, context, method=ActionExpert.context_kv)   # once per observation
    kv_r = repeat_batch(kv, R)                                           # R noise draws
    velocity_fn = lambda x, t: model.apply(params, x, t, context_kv=kv_r, ...)
    loss = flow_loss(velocity_fn, rng, actions, action_mask, num_repeats=R)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]

SAMPLER_METHODS = ("euler", "heun")


def sample_time(rng: jax.Array, shape: tuple[int, ...], alpha: float = 1.5, beta: float = 1.0,
                s: float = 0.999, dtype: Any = jnp.float32) -> jax.Array:
  """Training times `t = (s - tau) / s`, `tau ~ Beta(alpha, beta)`; t = 1 is clean data.

  With the defaults most mass lies near t = 0 (noisy inputs), and t ranges over
  `((s - 1) / s, 1]`, i.e. it can dip 0.1 % below zero as in GR00T-N1.
  """
  if beta == 1.0:
    # Beta(alpha, 1) has CDF u**alpha: inverting it is exact and compiles to a handful of
    # kernels, where jax.random.beta's gamma rejection loops compile to ~150.
    tau = jax.random.uniform(rng, shape, dtype=dtype) ** (1.0 / alpha)
  else:
    tau = jax.random.beta(rng, alpha, beta, shape, dtype=dtype)
  return (s - tau) / s


def interpolate(noise: jax.Array, actions: jax.Array,
                t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The point on the straight noise-to-data path and its velocity.

  Args:
    noise: `[B, ...]` standard normal draws.
    actions: `[B, ...]` clean actions, same shape as `noise`.
    t: `[B]` times in [0, 1] (1 = clean).

  Returns:
    `(x_t, target)`: `x_t = (1 - t) * noise + t * actions` and `target = actions - noise`,
    both shaped like `actions`.
  """
  if noise.shape != actions.shape:
    raise ValueError(f"interpolate: noise {noise.shape} and actions {actions.shape} must have the "
                     "same shape.")
  if t.shape != actions.shape[:1]:
    raise ValueError(f"interpolate: t has shape {t.shape}; expected one time per example, "
                     f"{actions.shape[:1]}.")
  t = t.reshape(t.shape + (1,) * (actions.ndim - 1)).astype(actions.dtype)
  return (1 - t) * noise + t * actions, actions - noise


def discretize_timestep(t: jax.Array, buckets: int = 1000) -> jax.Array:
  """`int(t * buckets)` clipped to `[0, buckets]`: the timestep index the network is fed."""
  return jnp.clip(jnp.floor(t * buckets), 0, buckets).astype(jnp.int32)


def repeat_batch(tree: Any, num_repeats: int) -> Any:
  """Repeats every row of every array of `tree` `num_repeats` times along axis 0.

  Row `b * R + r` of the result is row `b` of the input (sample-major), the order `flow_loss`
  uses for its R noise draws; use it on the cached context (K/V, masks, state) closed over by
  `velocity_fn`. Sample-major keeps a batch-sharded axis sharded: each device repeats its own
  rows (repeat-major rows `r * B + b` would need every device's rows on every device).
  """
  if num_repeats < 1:
    raise ValueError(f"repeat_batch: num_repeats={num_repeats} must be >= 1.")
  if num_repeats == 1:
    return tree
  return jax.tree.map(lambda x: jnp.repeat(x, num_repeats, axis=0), tree)


def _broadcast_action_mask(action_mask: jax.Array | None, actions: jax.Array) -> jax.Array:
  """`[B, T]` or `[B, T, A]` (bool or float) -> float `[B, T, A]`; None means all valid."""
  if action_mask is None:
    return jnp.ones(actions.shape, jnp.float32)
  if action_mask.shape == actions.shape[:2]:
    action_mask = action_mask[..., None]
  elif action_mask.shape != actions.shape:
    raise ValueError(
        f"flow_loss: action_mask has shape {action_mask.shape}; expected {actions.shape[:2]} "
        f"(per step) or {actions.shape} (per dimension) for actions {actions.shape}.")
  return jnp.broadcast_to(action_mask.astype(jnp.float32), actions.shape)


def flow_loss(velocity_fn: VelocityFn, rng: jax.Array, actions: jax.Array,
              action_mask: jax.Array | None = None, num_repeats: int = 1,
              time_alpha: float = 1.5, time_beta: float = 1.0, time_s: float = 0.999) -> jax.Array:
  """Masked flow-matching MSE with `num_repeats` noise/time draws per example.

  The draws are stacked along the batch sample by sample (row `b * R + r` is example `b`),
  so `velocity_fn` is called once on `[R * B, T, A]` and must close over a context tiled the same
  way (`repeat_batch`). The expensive context is computed once for all R draws.

  Args:
    velocity_fn: `(x_t [R*B, T, A], t [R*B]) -> v [R*B, T, A]`.
    rng: key for the noise and the times.
    actions: `[B, T, A]` clean (normalised) action chunks.
    action_mask: `[B, T]` or `[B, T, A]`, true/1 where the action is real (not padding);
      None for all valid.
    num_repeats: R, the noise draws per example.
    time_alpha, time_beta, time_s: the time distribution, see `sample_time`.

  Returns:
    Scalar float32 loss: the sum of masked squared errors over the number of valid elements
    (counted over all R draws), i.e. the mean over valid action elements.
  """
  if actions.ndim != 3:
    raise ValueError(f"flow_loss: actions must be [B, T, A]; got shape {actions.shape}.")
  mask = _broadcast_action_mask(action_mask, actions)
  actions_r = repeat_batch(actions, num_repeats)
  mask_r = repeat_batch(mask, num_repeats)
  noise_rng, time_rng = jax.random.split(rng)
  noise = jax.random.normal(noise_rng, actions_r.shape, actions_r.dtype)
  t = sample_time(time_rng, actions_r.shape[:1], time_alpha, time_beta, time_s)
  x_t, target = interpolate(noise, actions_r, t)
  velocity = velocity_fn(x_t, t)
  if velocity.shape != target.shape:
    raise ValueError(f"flow_loss: velocity_fn returned shape {velocity.shape}; expected "
                     f"{target.shape} (the repeated batch of {num_repeats} x {actions.shape}).")
  squared_error = jnp.square(velocity.astype(jnp.float32) - target.astype(jnp.float32))
  return jnp.sum(squared_error * mask_r) / jnp.maximum(jnp.sum(mask_r), 1.0)


def integrate(velocity_fn: VelocityFn, x0: jax.Array, num_steps: int = 4,
              method: str = "euler") -> jax.Array:
  """Integrates `dx/dt = velocity_fn(x, t)` from t = 0 to t = 1 with fixed steps.

  Euler evaluates at t = k / num_steps, k = 0 .. num_steps - 1 (t = 0, .25, .5, .75 for four
  steps). Heun (explicit trapezoid) adds a corrector evaluation at t + dt, two network calls
  per step, and is second-order accurate.

  Args:
    velocity_fn: `(x [B, ...], t [B]) -> v [B, ...]`.
    x0: `[B, ...]` the state at t = 0 (noise).
    num_steps: number of steps (static).
    method: "euler" or "heun" (static).

  Returns:
    x at t = 1, shaped like `x0`.
  """
  if method not in SAMPLER_METHODS:
    raise ValueError(f"Unknown ODE method {method!r}; choose one of {SAMPLER_METHODS}.")
  if not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps={num_steps!r} must be a positive Python int.")
  dt = 1.0 / num_steps
  batch = x0.shape[:1]

  def step(k, x):
    t = jnp.full(batch, k, jnp.float32) / num_steps
    v = velocity_fn(x, t).astype(x.dtype)
    if method == "euler":
      return x + dt * v
    t_next = jnp.full(batch, k + 1, jnp.float32) / num_steps
    v_next = velocity_fn(x + dt * v, t_next).astype(x.dtype)
    return x + (0.5 * dt) * (v + v_next)

  return jax.lax.fori_loop(0, num_steps, step, x0)


def sample_actions(velocity_fn: VelocityFn, rng: jax.Array, shape: tuple[int, ...],
                   num_steps: int = 4, method: str = "euler",
                   dtype: Any = jnp.float32) -> jax.Array:
  """Draws action chunks: noise `x0 ~ N(0, I)` of `shape` (`[B, T, A]`) integrated to t = 1.

  Deterministic for a given `rng`. See `integrate` for `num_steps` and `method`.
  """
  x0 = jax.random.normal(rng, shape, dtype)
  return integrate(velocity_fn, x0, num_steps=num_steps, method=method)
