"""Optimisers, gradient accumulation and EMA: the helpers every stage's step is built from."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(opt, num_steps: int):
  """`opt.learning_rate` with linear warmup, then constant or cosine to `end_factor`."""
  lr, warmup = float(opt.learning_rate), int(opt.get("warmup_steps", 0))
  kind = opt.get("schedule", "constant")
  end = lr * float(opt.get("end_factor", 1.0 if kind == "constant" else 0.1))
  if kind == "constant":
    main = optax.constant_schedule(lr)
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(lr, max(num_steps - warmup, 1), alpha=end / lr if lr else 0.0)
  elif kind == "linear":
    main = optax.linear_schedule(lr, end, max(num_steps - warmup, 1))
  else:
    raise ValueError(f"optimizer.schedule={kind!r} is not one of constant, cosine, linear")
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])
  return main


def make_optimizer(opt, num_steps: int):
  """optax chain from a config block: clip by global norm, then adamw / adam / rmsprop / sgd.

  Fields: name, learning_rate, schedule, warmup_steps, end_factor, b1, b2, eps, weight_decay,
  grad_clip (0 = off). RMSProp with alpha = 0.9 (stage 3) is `name="adam", b1=0, b2=0.9`.
  """
  schedule = learning_rate_schedule(opt, num_steps)
  name = opt.get("name", "adamw")
  b1, b2, eps = float(opt.get("b1", 0.9)), float(opt.get("b2", 0.999)), float(opt.get("eps", 1e-8))
  wd = float(opt.get("weight_decay", 0.0))
  if name == "adamw":
    core = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd)
  elif name == "adam":
    core = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
  elif name == "rmsprop":
    core = optax.rmsprop(schedule, decay=b2, eps=eps)
  elif name == "sgd":
    core = optax.sgd(schedule, momentum=b1 or None)
  else:
    raise ValueError(f"optimizer.name={name!r} is not one of adamw, adam, rmsprop, sgd")
  clip = float(opt.get("grad_clip", 0.0))
  return optax.chain(optax.clip_by_global_norm(clip), core) if clip > 0 else core


def split_microbatches(batch, num_microbatches: int):
  """`[B, ...]` -> `[M, B / M, ...]` with microbatch i = samples i, i + M, i + 2M, ...

  Strided (not contiguous) so that each device's shard of the batch contributes to every
  microbatch: every microbatch stays spread over all data-parallel devices.
  """
  def one(x):
    b = x.shape[0]
    if b % num_microbatches:
      raise ValueError(f"batch {b} is not divisible by config.microbatches={num_microbatches}")
    return jnp.swapaxes(x.reshape((b // num_microbatches, num_microbatches) + x.shape[1:]), 0, 1)
  return jax.tree.map(one, batch)


def accumulate_gradients(loss_fn: Callable, params, batch, num_microbatches: int = 1):
  """Mean gradients and metrics of `loss_fn(params, microbatch) -> (loss, metrics)`.

  `batch` must already hold all randomness of the step (noise, times, dropout masks) so that M
  microbatches give the gradient of the whole batch. A `lax.scan` keeps one microbatch's
  activations alive at a time. Returns (grads, metrics) with `metrics['loss']`.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_microbatches == 1:
    (loss, metrics), grads = grad_fn(params, batch)
    return grads, dict(metrics, loss=loss)
  micro = split_microbatches(batch, num_microbatches)

  def body(acc, mb):
    (loss, metrics), grads = grad_fn(params, mb)
    metrics = dict(metrics, loss=loss)
    return jax.tree.map(jnp.add, acc, (grads, metrics)), None

  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
      lambda: (params, dict(grad_fn(params, jax.tree.map(lambda x: x[0], micro))[0][1], loss=0.0))))
  zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), zeros[1])
  (grads, metrics), _ = jax.lax.scan(body, zeros, micro)
  scale = 1.0 / num_microbatches
  grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, params)
  return grads, jax.tree.map(lambda m: m * scale, metrics)


def unalias(state):
  """Copies every leaf that is the same array as an earlier leaf (e.g. `ema_params = params` after
  loading a checkpoint): the step donates the state, and XLA refuses to donate one buffer twice."""
  seen = set()

  def fresh(x):
    if isinstance(x, jax.Array) and id(x) in seen:
      return jnp.copy(x)
    seen.add(id(x))
    return x

  return jax.tree.map(fresh, state)


def ema_update(ema, params, decay: float):
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)


def apply_gradients(tx, params, opt_state, grads):
  """One optimiser update: (new params, new opt_state, {'grad_norm'})."""
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, {"grad_norm": optax.global_norm(grads)}
