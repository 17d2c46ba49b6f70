"""The streaming KV cache: a fixed-shape pytree passed into and returned from every step.

Layout (L = layers, B = batch, N = window in latent frames, P = tokens per latent frame,
H = heads, D = head dim):

  sink_k, sink_v  [L, B, H, P, D]      keys/values of frame 0, the permanent attention sink
  ring_k, ring_v  [L, B, H, N, P, D]   the last N frames; frame j >= 1 lives in slot (j - 1) % N
  index           int32 []             the frame the next step generates (0 = nothing cached yet)

Heads-major: the layout the cached step's attention reads (`attention.cached_attention`: per head,
the ring's N * P keys are one contiguous [N * P, D] matrix), so no per-step transpose of the cache.
A step writes only the new frame (`write_frame`: one slot-sized `dynamic_update_slice` per entry
after the layer scan), so a donated cache is updated in place, never rewritten.

Keys are stored with their spatial RoPE rotation only; the temporal rotation is applied on read,
from positions relative to the query (`rope.causal_time_positions`), so positions stay bounded.

Worked example, N = 3, reading at index i = 6 (frames 0..5 cached):
  ring slots   0     1     2          slot of frame j = (j - 1) % 3
  frame held   4     5     3          (frame 1, 2 were overwritten by 4, 5)
  distance     2     1     3          i - j
  position     2     3     1          q_pos - distance, q_pos = min(6, N + 1) = 4
  sink: frame 0 at position 0 (true distance 6, kept at N + 1 = 4); self at position 4.

Text keys/values for cross-attention are separate (`text_kv`: `{'k', 'v'}: [L, B, T, H, D]`),
computed once per prompt and replaced by `set_text` without touching the visual cache.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Cache = dict[str, Any]

# Logical axis names of each cache entry, for `sharding.logical_to_sharding`.
CACHE_LOGICAL_AXES = {
    "sink_k": ("layers", "cache_batch", "cache_heads", "cache_length", "cache_kv"),
    "sink_v": ("layers", "cache_batch", "cache_heads", "cache_length", "cache_kv"),
    "ring_k": ("layers", "cache_batch", "cache_heads", "cache_frames", "cache_length", "cache_kv"),
    "ring_v": ("layers", "cache_batch", "cache_heads", "cache_frames", "cache_length", "cache_kv"),
    "index": (),
}
TEXT_KV_LOGICAL_AXES = {
    "k": ("layers", "cache_batch", None, "cache_heads", "cache_kv"),
    "v": ("layers", "cache_batch", None, "cache_heads", "cache_kv"),
}


def init_cache(config, batch: int, latent_height: int, latent_width: int, dtype=None) -> Cache:
  """An empty cache for `config` (a `DiTConfig`) and a `[latent_height, latent_width]` latent."""
  _, ph, pw = config.patch_size
  if latent_height % ph or latent_width % pw:
    raise ValueError(f"latent size {latent_height}x{latent_width} is not divisible by the patch {ph}x{pw}")
  tokens = (latent_height // ph) * (latent_width // pw)
  dtype = dtype or jnp.dtype(config.dtype)
  head_dim = config.dim // config.num_heads
  L, N, H = config.num_layers, config.window, config.num_heads
  sink = (L, batch, H, tokens, head_dim)
  ring = (L, batch, H, N, tokens, head_dim)
  # Separate buffers (not one shared zeros array) so that every entry can be donated.
  return {"sink_k": jnp.zeros(sink, dtype), "sink_v": jnp.zeros(sink, dtype),
          "ring_k": jnp.zeros(ring, dtype), "ring_v": jnp.zeros(ring, dtype),
          "index": jnp.zeros((), jnp.int32)}


def cache_bytes(config, batch: int, latent_height: int, latent_width: int, dtype=None) -> int:
  shapes = jax.eval_shape(lambda: init_cache(config, batch, latent_height, latent_width, dtype))
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes)))


def read_layout(index, window: int):
  """Temporal positions and valid length of the keys `[self | sink | ring slots 0..N-1]`.

  Args:
    index: int32 scalar, the query frame i.
  Returns:
    positions: int32 `[N + 2]`, temporal RoPE position of each key group.
    num_valid: int32 scalar, how many leading key groups are valid. Valid groups always form a
      prefix: self is always valid, the sink from i >= 1, ring slots fill in order before wrapping.
  """
  n = window
  q_pos = jnp.minimum(index, n + 1)
  last = index - 1  # newest frame in the ring
  slots = jnp.arange(n)
  held = last - jnp.mod(last - 1 - slots, n)  # frame held by each slot
  ring_pos = q_pos - (index - held)
  positions = jnp.concatenate([q_pos[None], jnp.zeros((1,), jnp.int32), ring_pos]).astype(jnp.int32)
  num_valid = 1 + (index >= 1).astype(jnp.int32) + jnp.clip(index - 1, 0, n)
  return positions, num_valid


def clip_layout(num_frames: int, window: int):
  """The whole-clip counterpart of `read_layout`, computed once per shape on the host.

  For each query frame i, key group s of `[self | sink | i-1 | i-2 | ... | i-S+2]` (S groups).

  Returns numpy arrays:
    frame_ids: int32 `[F, S]`, which frame fills each key group (clamped to >= 0 when invalid).
    positions: int32 `[F, S]`, temporal RoPE positions, as in `read_layout`.
    num_valid: int32 `[F]`, valid leading groups for each query frame.
  """
  f, n = num_frames, window
  groups = 2 + min(max(f - 2, 0), n)
  frame_ids = np.zeros((f, groups), np.int32)
  positions = np.zeros((f, groups), np.int32)
  num_valid = np.zeros((f,), np.int32)
  for i in range(f):
    q_pos = min(i, n + 1)
    frame_ids[i, 0], positions[i, 0] = i, q_pos
    frame_ids[i, 1], positions[i, 1] = 0, 0
    for m in range(1, groups - 1):
      j = i - m
      frame_ids[i, m + 1] = max(j, 0)
      positions[i, m + 1] = q_pos - m
    num_valid[i] = 1 + (i >= 1) + min(max(i - 1, 0), n)
  return frame_ids, positions, num_valid


def write_frame(cache: Cache, new: dict, window: int) -> Cache:
  """Writes one frame's keys and values of every layer into the cache; `index` is left as is.

  Args:
    cache: the KV cache (`init_cache`; its `index` is the frame being written).
    new: {"k", "v"}: `[L, B, H, P, D]`, the frame's keys (spatially rotated) and values.
  Returns:
    the cache with frame 0 in the sink, frame j >= 1 in ring slot (j - 1) % N. The ring gets one
    slot-sized `dynamic_update_slice`, so a donated ring is updated in place; the sink, 1 / N of
    the ring, is an elementwise select. Differentiable (rollouts train through the cache).
  """
  index = cache["index"]
  slot = jnp.mod(jnp.maximum(index - 1, 0), window)
  out = dict(cache)
  for name in ("k", "v"):
    sink, ring = cache[f"sink_{name}"], cache[f"ring_{name}"]
    frame = new[name].astype(ring.dtype)
    out[f"sink_{name}"] = jnp.where(index == 0, frame, sink)
    # A plain slot write, no select of the old slot, so the update is in place. Frame 0 also
    # lands in slot 0, where nothing reads it (`read_layout`: no ring slot is valid before
    # index 2) and frame 1 overwrites it.
    out[f"ring_{name}"] = jax.lax.dynamic_update_index_in_dim(ring, frame, slot, axis=3)
  return out
