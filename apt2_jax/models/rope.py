"""3D rotary position embedding (Wan2.1 layout) with a separable time axis.

The head dimension is split into a time, a height and a width section (Wan2.1: height and width
get `2 * (head_dim // 6)` channels each, time the rest). Each section rotates interleaved channel
pairs `(2k, 2k+1)` by `position * theta**(-2k / section_dim)`, exactly as diffusers'
`WanRotaryPosEmbed` with `repeat_interleave_real=True`.

The sections act on disjoint channel pairs, so the spatial and the temporal rotations commute and
can be applied at different times. We use that: keys enter the KV cache with their spatial rotation
only, and the temporal rotation is applied when they are read, from positions relative to the
current query frame. That keeps every temporal position in `[0, window + 1]` however long the
stream runs (see `causal_time_positions`).
"""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp


def section_dims(head_dim: int) -> tuple[int, int, int]:
  """Channels of the (time, height, width) sections for a head of `head_dim` channels."""
  hw = 2 * (head_dim // 6)
  t = head_dim - 2 * hw
  if t <= 0 or t % 2 or hw % 2:
    raise ValueError(f"head_dim={head_dim} cannot be split into even t/h/w RoPE sections")
  return t, hw, hw


def _inv_freq(dim: int, theta: float) -> np.ndarray:
  return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def time_angles(positions, head_dim: int, theta: float = 10000.0):
  """Rotation angles that move only the time section.

  Args:
    positions: any shape `[...]`, temporal positions (int or float).
  Returns:
    float32 `[..., head_dim // 2]`, zero outside the time section.
  """
  t, h, w = section_dims(head_dim)
  inv = jnp.asarray(_inv_freq(t, theta), jnp.float32)
  positions = jnp.asarray(positions, jnp.float32)
  ang = positions[..., None] * inv
  zeros = jnp.zeros(positions.shape + ((h + w) // 2,), jnp.float32)
  return jnp.concatenate([ang, zeros], axis=-1)


def spatial_angles(height: int, width: int, head_dim: int, theta: float = 10000.0) -> np.ndarray:
  """Rotation angles of the height/width sections for a `[height, width]` token grid.

  Returns:
    float32 numpy `[height * width, head_dim // 2]`, zero in the time section (row-major tokens).
  """
  t, h, w = section_dims(head_dim)
  hh, ww = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  ang_h = hh.reshape(-1, 1) * _inv_freq(h, theta)[None]
  ang_w = ww.reshape(-1, 1) * _inv_freq(w, theta)[None]
  ang_t = np.zeros((height * width, t // 2))
  return np.concatenate([ang_t, ang_h, ang_w], axis=-1).astype(np.float32)


def apply_rope(x, angles):
  """Rotates interleaved channel pairs of `x` by `angles`.

  Args:
    x: `[..., head_dim]`.
    angles: broadcastable to `[..., head_dim // 2]`.
  Returns:
    `x` rotated, same shape and dtype.
  """
  dtype = x.dtype
  x = x.astype(jnp.float32)
  x1, x2 = x[..., 0::2], x[..., 1::2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.reshape(x.shape).astype(dtype)


def causal_time_positions(frame_index, window: int):
  """Temporal RoPE position of the query frame `frame_index` under bounded positions.

  Frame i sees the sink (frame 0), frames `max(1, i - window) .. i - 1` and itself. Until the window
  is full, positions are the frame indices. Afterwards the query sits at `window + 1` and every key
  keeps its true distance to the query, except the sink, which stays at position 0, i.e. at a fixed
  distance of `window + 1`. A frame at index 10,000 therefore sees exactly the positions that frame
  `window + 1` saw.
  """
  return jnp.minimum(frame_index, window + 1)
