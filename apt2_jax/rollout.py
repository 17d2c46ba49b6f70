"""The generator step and the `lax.scan` rollout: inference and student forcing share them.

Per step i (block i generates latent frame i + 1):
    v_i, cache = G.step(noise_i, recycled_i, control_i, t=1, cache)
    x_{i+1} = noise_i - v_i              (one forward pass from pure noise: 1 NFE)
    recycled_{i+1} = stop_gradient(x_{i+1})   (configurable)
The KV cache carries every earlier frame's keys/values into later steps, so in student forcing the
gradient of a late frame's loss reaches earlier frames through the cache (unless `detach_cache`).

Backward pass (`backward`): "ring" (default) is a custom VJP over the scan. The forward keeps only
the ring slot each step overwrites (its evicted keys/values, 1 / (N + 1) of the cache) and the
final cache; the backward is a reverse scan that puts each evicted slot back (and frame 0's sink
at step 0), which rebuilds every step's input cache exactly, and takes that step's VJP. "scan" is
autodiff of the scan itself: with `remat` != "none" each step's residual is its whole input cache.

For the diffusion baseline (stage-1 model) the same rollout runs a multi-step Euler sampler per
block (`num_steps = K > 1`). Where the context's keys/values come from is `cache_from`:
  "matched"  the way stage 1 trained (one t per clip: every context frame noised to the SAME t as
             the block being denoised): one KV cache per schedule time t_k, stacked `[K, ...]`
             (`empty_cache`); step k of block i attends to cache k, and once the block is done its
             clean result, re-noised to t_k with fresh noise (`matched_noise`), is written into
             cache k for every k. Cost: 2K forward passes per frame (K denoising + K cache writes,
             the writes batched as one pass over K x B rows) and K caches of memory.
  "first"    the cache written by the first (t = 1) pass: K passes per frame.
  "clean"    one extra pass on the clean result at t = 0, as the public peers do: K + 1 passes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apt2_jax.models import kv_cache
from apt2_jax.models.dit import REMAT_POLICIES, CausalDiT

CACHE_FROM = ("first", "clean", "matched")
BACKWARDS = ("ring", "scan")
MATCHED_NOISE_SEED = 0x6D617463  # the re-noising key's root (see `matched_noise`)


@dataclasses.dataclass(frozen=True)
class RolloutOptions:
  """Static options of a rollout; every paper choice and ablation is a field."""
  detach_recycled: bool = True   # the recycled input is stop_gradient-ed (paper)
  detach_cache: bool = False     # Self-Forcing-style ablation: no gradient through the KV cache
  recycle: bool = True           # False: the no-recycling ablation (recycled input zero after frame 0)
  num_steps: int = 1             # Euler steps per block; 1 = the one-step AAPT generator
  shift: float = 1.0             # time shift s * t / (1 + (s - 1) t) of the Euler schedule
  cache_from: str = "first"      # multi-step only: "first" pass, an extra "clean" pass, or "matched" caches
  remat: str = "none"            # backward="scan" only: remat policy of the scanned step (dit.REMAT_POLICIES)
  backward: str = "ring"         # "ring": custom VJP over the ring cache; "scan": autodiff of the scan

  def __post_init__(self):
    if self.num_steps < 1:
      raise ValueError(f"rollout.num_steps={self.num_steps} must be >= 1")
    if self.cache_from not in CACHE_FROM:
      raise ValueError(f"rollout.cache_from={self.cache_from!r} is not one of {CACHE_FROM}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"rollout.remat={self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
    if self.backward not in BACKWARDS:
      raise ValueError(f"rollout.backward={self.backward!r} is not one of {BACKWARDS}")

  @property
  def matched(self) -> bool:
    """True when the cache is one per schedule time, stacked `[num_steps, ...]`."""
    return self.num_steps > 1 and self.cache_from == "matched"

  @property
  def forward_passes(self) -> int:
    """Forward passes of the DiT per generated frame (per cache batch row)."""
    k = int(self.num_steps)
    if k == 1:
      return 1
    return {"first": k, "clean": k + 1, "matched": 2 * k}[self.cache_from]


def empty_cache(config, batch: int, latent_height: int, latent_width: int,
                options: RolloutOptions = RolloutOptions()):
  """The empty cache a rollout under `options` starts from: `kv_cache.init_cache`, or for the
  matched sampler one such cache per schedule time, every entry stacked on a leading `[K]` axis
  (the index too: all K advance together)."""
  if not options.matched:
    return kv_cache.init_cache(config, batch, latent_height, latent_width)
  shapes = jax.eval_shape(lambda: kv_cache.init_cache(config, batch, latent_height, latent_width))
  return {k: jnp.zeros((options.num_steps,) + s.shape, s.dtype) for k, s in shapes.items()}


def shifted_schedule(num_steps: int, shift: float):
  """Decreasing flow times `[num_steps + 1]` from 1 to 0, shifted as `s t / (1 + (s - 1) t)`."""
  t = jnp.linspace(1.0, 0.0, num_steps + 1)
  return shift * t / (1.0 + (shift - 1.0) * t)


def matched_noise(noise, num_steps: int):
  """The fresh noise `[K, B, 1, h, w, C]` that re-noises a finished block into the K matched caches.

  Drawn from a key per sample hashed from that sample's own step noise `noise` [B, 1, h, w, C]:
  as reproducible as the step noise itself (a chunked stream equals a step-by-step one; rows are
  independent), with no key to thread through the rollout, and independent of `noise` in
  distribution (the clean result depends on `noise`; the context noise must not).
  """
  b = noise.shape[0]
  bits = jax.lax.bitcast_convert_type(noise.astype(jnp.float32), jnp.uint32).reshape(b, -1)
  seeds = jnp.sum(bits, axis=1, dtype=jnp.uint32)
  root = jax.random.key(MATCHED_NOISE_SEED)
  draw = lambda s: jax.random.normal(jax.random.fold_in(root, s), (num_steps,) + noise.shape[1:], jnp.float32)
  return jnp.moveaxis(jax.vmap(draw)(seeds), 1, 0)


def generator_step(model: CausalDiT, params, cache, text_kv, noise, recycled, control,
                   options: RolloutOptions = RolloutOptions()):
  """One autoregressive step: `(x [B, 1, h, w, C], new cache)`.

  Args:
    noise: [B, 1, h, w, C] fresh noise eps_i; recycled: [B, 1, h, w, C]; control: [B, 1, h, w, Cc]
    or None; cache: `empty_cache(..., options)`'s layout (stacked `[K, ...]` when `options.matched`).
  """
  b = noise.shape[0]
  apply = lambda x, t, c: model.apply({"params": params}, x, recycled, control,
                                      jnp.full((b,), t, jnp.float32), c, text_kv, method=CausalDiT.step)
  if options.num_steps == 1:
    v, new_cache = apply(noise, 1.0, cache)
    return noise - v, new_cache
  times = shifted_schedule(options.num_steps, options.shift)
  if options.matched:
    return _matched_step(apply, cache, noise, times)
  x, new_cache = noise, None
  for k in range(options.num_steps):
    v, c = apply(x, times[k], cache)
    if k == 0:
      new_cache = c
    x = x + (times[k + 1] - times[k]) * v  # Euler step of dx/dt = v
  if options.cache_from == "clean":
    _, new_cache = apply(x, 0.0, cache)
  return x, new_cache


def _matched_step(apply, caches, noise, times):
  """K Euler steps, step k against cache k; then the clean result re-noised to each t_k is written
  into cache k (one pass over the K caches, vmapped). 2K forward passes."""
  k_steps = times.shape[0] - 1
  x = noise
  for k in range(k_steps):
    v, _ = apply(x, times[k], jax.tree.map(lambda c, k=k: c[k], caches))
    x = x + (times[k + 1] - times[k]) * v
  t = times[:k_steps].reshape((k_steps,) + (1,) * x.ndim)
  noised = (1.0 - t) * x[None] + t * matched_noise(noise, k_steps)
  _, caches = jax.vmap(apply)(noised, times[:k_steps], caches)
  return x, caches


def rollout(model: CausalDiT, params, first_frame, text_kv, noise, controls=None, *, cache,
            options: RolloutOptions = RolloutOptions(), gather=None):
  """Generates `S` latent frames after `first_frame`, one cached step each, as a `lax.scan`.

  Args:
    first_frame: [B, 1, h, w, C] the encoded first frame (recycled input of block 0).
    text_kv: `model.encode_text(...)` of the prompt.
    noise: [B, S, h, w, C] fresh noise per step (the only randomness).
    controls: [B, S, h, w, Cc] control of each generated frame, or None.
    cache: the KV cache to continue from (`empty_cache(..., options)` for a new stream, or the
      cache of a previous segment in long-video training).
    gather: ZeRO-2 (`sharding.gather_whole`): a function from the stored, sharded parameters to
      the whole copy every step uses, applied once. The ring-cache backward pass pulls each step's
      parameter gradient back through it (onto the shards, in the stored dtype) before summing, so
      neither the sum nor its precision is the whole copy's.
  Returns:
    (frames [B, S, h, w, C], final cache).
  """
  if first_frame.shape[1] != 1:
    raise ValueError(f"first_frame must be [B, 1, h, w, C], got {first_frame.shape}")
  xs = (jnp.moveaxis(noise, 1, 0)[:, :, None],
        None if controls is None else jnp.moveaxis(controls, 1, 0)[:, :, None])
  recycled = first_frame.astype(noise.dtype)
  if options.backward == "scan":
    params = params if gather is None else gather(params)
    frames, cache = _scan(model, options, params, text_kv, recycled, xs, cache, remat=True)
  else:
    frames, cache = _ring_rollout(model, options, gather)(params, text_kv, recycled, xs, cache)
  return jnp.moveaxis(frames, 0, 1), cache


def _next_recycled(x, options: RolloutOptions):
  nxt = jax.lax.stop_gradient(x) if options.detach_recycled else x
  return nxt if options.recycle else jnp.zeros_like(nxt)


def _scan(model, options, params, text_kv, recycled, xs, cache, remat: bool, evicted: bool = False):
  """The rollout's `lax.scan`: (frames [S, B, h, w, C], final cache[, evicted ring slots per step])."""
  window = model.config.window

  def body(carry, inputs):
    cache, recycled = carry
    eps, control = inputs
    out = _ring_slot(cache, window) if evicted else None
    x, cache = generator_step(model, params, cache, text_kv, eps, recycled, control, options)
    if options.detach_cache:
      cache = jax.lax.stop_gradient(cache)
    return (cache, _next_recycled(x, options)), (x[:, 0], out)

  if remat and options.remat != "none":
    body = jax.checkpoint(body, policy=REMAT_POLICIES[options.remat], prevent_cse=False)
  (cache, _), (frames, slots) = jax.lax.scan(body, (cache, recycled), xs)
  return (frames, cache, slots) if evicted else (frames, cache)


# ---------------------------------------------------------------------------------------------
# The ring-cache VJP
# ---------------------------------------------------------------------------------------------
_SINK, _RING = ("sink_k", "sink_v"), ("ring_k", "ring_v")


def _slot_of(cache, window: int):
  """The ring slot the step at `cache["index"]` writes (`kv_cache.write_frame`); a stacked
  (matched) cache advances all its K caches together, so its first index speaks for all."""
  index = cache["index"].reshape(-1)[0]
  return jnp.mod(jnp.maximum(index - 1, 0), window)


def _ring_slot(cache, window: int):
  """The keys/values in the ring slot the next step overwrites: {ring_k, ring_v} `[..., P, D]`."""
  slot = _slot_of(cache, window)
  return {k: jax.lax.dynamic_index_in_dim(cache[k], slot, cache[k].ndim - 3, keepdims=False) for k in _RING}


def _restore(cache_out, evicted, sink0, first, window: int):
  """A step's input cache from its output: index - 1, the evicted slot put back, and (at the
  rollout's first step, the only one that can write the sink) the sink it started from."""
  cache = dict(cache_out, index=cache_out["index"] - 1)
  slot = _slot_of(cache, window)
  for k in _RING:
    cache[k] = jax.lax.dynamic_update_index_in_dim(cache_out[k], evicted[k].astype(cache_out[k].dtype), slot,
                                                   cache_out[k].ndim - 3)
  for k in _SINK:
    cache[k] = jnp.where(first, sink0[k], cache_out[k])
  return cache


def _floats(cache):
  return {k: v for k, v in cache.items() if k != "index"}


def _ring_rollout(model, options: RolloutOptions, gather=None):
  """`_scan` as a custom VJP whose residuals are each step's evicted ring slot and the final cache
  (not each step's whole input cache). Exact: the backward rebuilds every step's input cache
  bit for bit and differentiates the same step function. `gather`: see `rollout`."""
  window = model.config.window
  whole = gather or (lambda p: p)

  @jax.custom_vjp
  def run(params, text_kv, recycled, xs, cache):
    return _scan(model, options, whole(params), text_kv, recycled, xs, cache, remat=False)

  def fwd(params, text_kv, recycled, xs, cache):
    params_whole = whole(params)
    frames, final, evicted = _scan(model, options, params_whole, text_kv, recycled, xs, cache, remat=False,
                                   evicted=True)
    sink0 = {k: cache[k] for k in _SINK}
    return (frames, final), (params, params_whole, text_kv, recycled, xs, sink0, evicted, frames, final)

  def bwd(res, cts):
    stored, params, text_kv, recycled0, xs, sink0, evicted, frames, final = res
    ct_frames, ct_final = cts
    steps = frames.shape[0]
    # The gather's pullback (linear: a cast and a sharding constraint; its forward is dead code).
    to_stored = (lambda d: d) if gather is None else (lambda d: jax.vjp(gather, stored)[1](d)[0])

    def recycled_in(i):
      """Step i's recycled input: the first frame, then the previous output (or zeros)."""
      if not options.recycle:
        return jnp.where(i == 0, recycled0, jnp.zeros_like(recycled0))
      prev = jax.lax.dynamic_index_in_dim(frames, jnp.maximum(i - 1, 0), 0, keepdims=False)[:, None]
      return jnp.where(i == 0, recycled0, prev.astype(recycled0.dtype))

    through_recycled = options.recycle and not options.detach_recycled
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    ct_cache0 = zeros(_floats(final)) if options.detach_cache else _floats(ct_final)

    def body(carry, inputs):
      cache_out, ct_cache, ct_next, ct_params, ct_text = carry
      i, (eps, control), slot, ct_frame = inputs
      cache, recycled = _restore(cache_out, slot, sink0, i == 0, window), recycled_in(i)
      index = cache["index"]

      def step(p, t, c, e, r, ctl):
        x, new = generator_step(model, p, dict(c, index=index), t, e, r, ctl, options)
        return x, _floats(new)

      (x, _), pullback = jax.vjp(step, params, text_kv, _floats(cache), eps, recycled, control)
      ct_x = ct_frame[:, None].astype(x.dtype)
      if through_recycled:
        ct_x = ct_x + ct_next.astype(x.dtype)
      ct_out = zeros(ct_cache) if options.detach_cache else ct_cache
      d_params, d_text, d_cache, d_eps, d_recycled, d_control = pullback((ct_x, ct_out))
      d_params = to_stored(d_params)
      add = lambda a, b: jax.tree.map(jnp.add, a, b)
      return (cache, d_cache, d_recycled, add(ct_params, d_params), add(ct_text, d_text)), (d_eps, d_control)

    init = (final, ct_cache0, jnp.zeros_like(recycled0), zeros(stored), zeros(text_kv))
    (_, ct_cache, ct_recycled, ct_params, ct_text), ct_xs = jax.lax.scan(
        body, init, (jnp.arange(steps), xs, evicted, ct_frames), reverse=True)
    index = final["index"]
    ct_cache = dict(ct_cache, index=np.zeros(index.shape, jax.dtypes.float0))
    return ct_params, ct_text, ct_recycled, ct_xs, ct_cache

  run.defvjp(fwd, bwd)
  return run
