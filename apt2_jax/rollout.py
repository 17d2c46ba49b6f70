"""The generator step and the `lax.scan` rollout: inference and student forcing share them.

Per step i (block i generates latent frame i + 1):
    v_i, cache = G.step(noise_i, recycled_i, control_i, t=1, cache)
    x_{i+1} = noise_i - v_i              (one forward pass from pure noise: 1 NFE)
    recycled_{i+1} = stop_gradient(x_{i+1})   (configurable)
The KV cache carries every earlier frame's keys/values into later steps, so in student forcing the
gradient of a late frame's loss reaches earlier frames through the cache (unless `detach_cache`).

For the diffusion baseline (stage-1 model) the same rollout runs a multi-step Euler sampler per
block (`num_steps > 1`); the cache is then written by one extra pass on the clean result, as the
public peers do (num_steps + 1 forward passes per block), or by the first pass (`cache_from`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from apt2_jax.models.dit import REMAT_POLICIES, CausalDiT


@dataclasses.dataclass(frozen=True)
class RolloutOptions:
  """Static options of a rollout; every paper choice and ablation is a field."""
  detach_recycled: bool = True   # the recycled input is stop_gradient-ed (paper)
  detach_cache: bool = False     # Self-Forcing-style ablation: no gradient through the KV cache
  recycle: bool = True           # False: the no-recycling ablation (recycled input zero after frame 0)
  num_steps: int = 1             # Euler steps per block; 1 = the one-step AAPT generator
  shift: float = 1.0             # time shift s * t / (1 + (s - 1) t) of the Euler schedule
  cache_from: str = "first"      # multi-step only: "first" pass or an extra "clean" pass writes the cache
  remat: str = "none"            # remat policy of the scanned step (see dit.REMAT_POLICIES)

  def __post_init__(self):
    if self.num_steps < 1:
      raise ValueError(f"rollout.num_steps={self.num_steps} must be >= 1")
    if self.cache_from not in ("first", "clean"):
      raise ValueError(f"rollout.cache_from={self.cache_from!r} must be 'first' or 'clean'")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"rollout.remat={self.remat!r} is not one of {sorted(REMAT_POLICIES)}")


def shifted_schedule(num_steps: int, shift: float):
  """Decreasing flow times `[num_steps + 1]` from 1 to 0, shifted as `s t / (1 + (s - 1) t)`."""
  t = jnp.linspace(1.0, 0.0, num_steps + 1)
  return shift * t / (1.0 + (shift - 1.0) * t)


def generator_step(model: CausalDiT, params, cache, text_kv, noise, recycled, control,
                   options: RolloutOptions = RolloutOptions()):
  """One autoregressive step: `(x [B, 1, h, w, C], new cache)`.

  Args:
    noise: [B, 1, h, w, C] fresh noise eps_i; recycled: [B, 1, h, w, C]; control: [B, 1, h, w, Cc]
    or None.
  """
  b = noise.shape[0]
  apply = lambda x, t, c: model.apply({"params": params}, x, recycled, control,
                                      jnp.full((b,), t, jnp.float32), c, text_kv, method=CausalDiT.step)
  if options.num_steps == 1:
    v, new_cache = apply(noise, 1.0, cache)
    return noise - v, new_cache
  times = shifted_schedule(options.num_steps, options.shift)
  x, new_cache = noise, None
  for k in range(options.num_steps):
    v, c = apply(x, times[k], cache)
    if k == 0:
      new_cache = c
    x = x + (times[k + 1] - times[k]) * v  # Euler step of dx/dt = v
  if options.cache_from == "clean":
    _, new_cache = apply(x, 0.0, cache)
  return x, new_cache


def rollout(model: CausalDiT, params, first_frame, text_kv, noise, controls=None, *, cache,
            options: RolloutOptions = RolloutOptions()):
  """Generates `S` latent frames after `first_frame`, one cached step each, as a `lax.scan`.

  Args:
    first_frame: [B, 1, h, w, C] the encoded first frame (recycled input of block 0).
    text_kv: `model.encode_text(...)` of the prompt.
    noise: [B, S, h, w, C] fresh noise per step (the only randomness).
    controls: [B, S, h, w, Cc] control of each generated frame, or None.
    cache: the KV cache to continue from (`kv_cache.init_cache` for a new stream, or the cache of
      a previous segment in long-video training).
  Returns:
    (frames [B, S, h, w, C], final cache).
  """
  if first_frame.shape[1] != 1:
    raise ValueError(f"first_frame must be [B, 1, h, w, C], got {first_frame.shape}")
  xs = (jnp.moveaxis(noise, 1, 0)[:, :, None],
        None if controls is None else jnp.moveaxis(controls, 1, 0)[:, :, None])

  def body(carry, inputs):
    cache, recycled = carry
    eps, control = inputs
    x, cache = generator_step(model, params, cache, text_kv, eps, recycled, control, options)
    if options.detach_cache:
      cache = jax.lax.stop_gradient(cache)
    nxt = jax.lax.stop_gradient(x) if options.detach_recycled else x
    if not options.recycle:
      nxt = jnp.zeros_like(nxt)
    return (cache, nxt), x[:, 0]

  if options.remat != "none":
    body = jax.checkpoint(body, policy=REMAT_POLICIES[options.remat], prevent_cse=False)
  (cache, _), frames = jax.lax.scan(body, (cache, first_frame.astype(noise.dtype)), xs)
  return jnp.moveaxis(frames, 0, 1), cache
