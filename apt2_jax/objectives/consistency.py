"""Consistency distillation to one step (stage 2), teacher forced, no CFG, no EMA target.

The consistency function of a velocity model is its one-step estimate of the clean frame,
`f(x_t, t) = x_t - t v(x_t, t)`; it equals `x_t` at t = 0 by construction (the boundary condition)
and at t = 1 it is the 1-NFE generator `x = eps - v(eps, 1)`.

On the N-step schedule `t_0 = 1 > t_1 > ... > t_N = 0` (shifted with s = 24), one index n per clip:
  x_n      = (1 - t_n) x_0 + t_n eps
  x_{n+1}  = x_n + (t_{n+1} - t_n) v_teacher(x_n, t_n)              one Euler step of the teacher
  loss     = || f_student(x_n, t_n) - stop_gradient(f_student(x_{n+1}, t_{n+1})) ||^2
The target uses the online student itself (paper: no EMA), under `stop_gradient`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from apt2_jax.objectives import flow


def consistency_fn(x_t, t, v):
  """`x_t - t v`: the clean-frame estimate; t `[B]`."""
  return x_t - t.reshape(t.shape + (1,) * (x_t.ndim - 1)) * v


def sample_interval(rng, batch: int, num_steps: int, shift: float):
  """Adjacent schedule points per clip: (t_n, t_{n+1}) float32 `[batch]` each, t_n > t_{n+1}."""
  times = flow.euler_schedule(num_steps, shift)
  n = jax.random.randint(rng, (batch,), 0, num_steps)
  return times[n], times[n + 1]


def teacher_euler_step(x_t, t, t_next, v_teacher):
  """`x_t + (t_next - t) v`: one Euler step of dx/dt = v from t to t_next."""
  dt = (t_next - t).reshape(t.shape + (1,) * (x_t.ndim - 1))
  return x_t + dt * v_teacher
