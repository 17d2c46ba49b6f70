"""Rectified flow: time shift, noising, velocity target, teacher-forced loss, Euler schedule.

Convention (the AAPT paper's rectified flow): `x_t = (1 - t) x_0 + t eps`, the model predicts `v = eps - x_0`,
so `dx_t/dt = v`, t = 1 is pure noise and `x_0 = x_t - t v`. Sampling integrates from t = 1 to 0.

Teacher forcing with recycled frames. A clip of F latent frames `x_0 .. x_{F-1}` gives F - 1
blocks; block s sees, per pixel, `[noise slot | recycled | control]` with
  noise slot  `(1 - t) x_{s+1} + t eps_s`
  recycled    `x_s` (clean ground truth)
  control     the control of frame s + 1
and predicts `v_s = eps_s - x_{s+1}`: the target is shifted by one frame, so all blocks train in
parallel under the block-causal mask. One t per clip (paper), shifted by `s t / (1 + (s - 1) t)`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def shift_time(t, shift: float):
  """`s t / (1 + (s - 1) t)`: moves mass towards t = 1 (more noise) for s > 1; s = 1 is identity."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def sample_time(rng, batch: int, shift: float):
  """One shifted flow time per clip: float32 `[batch]` in (0, 1)."""
  return shift_time(jax.random.uniform(rng, (batch,), jnp.float32), shift)


def loss_weight(t, weight_t: float):
  """Per-clip weight `min(1, (t / weight_t)^2)` of the velocity MSE (`weight_t` 0: all ones).

  The velocity error of a prediction is its clean-latent error over t (`x0 = x_t - t v`), so the
  plain velocity MSE weighs the clean-latent error by 1 / t^2: a clip at t = 0.05 counts 400x one at
  t = 1. `weight_t` caps that weight at 1 / weight_t^2; `weight_t = 1` gives the clean-latent MSE."""
  if not weight_t:
    return jnp.ones_like(t)
  return jnp.minimum(1.0, jnp.square(t / weight_t))


def noisy(x0, eps, t):
  """`x_t = (1 - t) x_0 + t eps`; t `[B]` broadcasts over `[B, ...]`."""
  t = t.reshape(t.shape + (1,) * (x0.ndim - t.ndim))
  return (1.0 - t) * x0 + t * eps


def velocity_target(x0, eps):
  return eps - x0


def teacher_forcing_inputs(latents, controls=None, recycle: bool = True):
  """Splits a clip into teacher-forced blocks.

  Args:
    latents: [B, F, h, w, C] clean latents of the clip.
    controls: [B, F, h, w, Cc] per-latent-frame controls, or None.
    recycle: False for the no-recycling ablation: block 0 still sees frame 0 (the user's image),
      every later block a zero recycled input, as the rollout with `recycle=False` feeds it.
  Returns:
    (recycled [B, F-1, ...] = frames 0..F-2, clean targets [B, F-1, ...] = frames 1..F-1,
     controls of frames 1..F-1 or None).
  """
  if latents.ndim != 5 or latents.shape[1] < 2:
    raise ValueError(f"latents must be [batch, frames >= 2, h, w, C], got {latents.shape}")
  recycled = latents[:, :-1]
  if not recycle:
    recycled = jnp.concatenate([recycled[:, :1], jnp.zeros_like(recycled[:, 1:])], axis=1)
  return recycled, latents[:, 1:], None if controls is None else controls[:, 1:]


def mse(a, b, weights=None):
  """Mean squared error over everything but the batch: `[B]`. `weights`: per-channel weights of
  the last axis (`vae.latent_loss_weights`), None for ones."""
  d = jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32))
  if weights is not None:
    d = d * weights
  return jnp.mean(d.reshape(d.shape[0], -1), axis=-1)


def euler_schedule(num_steps: int, shift: float):
  """Decreasing flow times `[num_steps + 1]` from 1 to 0 (the rollout's schedule)."""
  return shift_time(jnp.linspace(1.0, 0.0, num_steps + 1), shift)
