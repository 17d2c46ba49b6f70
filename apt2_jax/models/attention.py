"""Attention for the causal DiT: the kernels and the Wan2.1-layout attention modules.

Three ways to attend, all through `jax.nn.dot_product_attention` (cuDNN flash attention on GPUs
when `implementation="cudnn"`, the XLA path elsewhere):

* `full_attention`: every token sees every token (bidirectional pretraining, Wan parity).
* `block_causal_attention`: whole clip; frame i sees `[self | sink | i-1 .. i-N]`. No dense
  [tokens x tokens] mask is built: each query frame gathers its own contiguous key groups (laid out
  by `kv_cache.clip_layout`, computed once per shape) and valid groups form a prefix, so the mask is
  a per-row key length (`key_value_seq_lengths`), which flash kernels take natively. Query frames
  are processed in chunks of `query_chunk` frames to bound the gathered keys' memory.
* `cached_attention`: one new frame against `[self | sink | ring]` of the KV cache.

Both causal paths apply the temporal RoPE rotation on read, with bounded positions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from apt2_jax.models import kv_cache, rope


def _attend(q, k, v, kv_lengths=None, implementation=None):
  """q: [B, T, H, D]; k, v: [B, S, H, D]; kv_lengths: int32 [B] valid key prefix."""
  return jax.nn.dot_product_attention(
      q, k, v, key_value_seq_lengths=kv_lengths, implementation=implementation)


def full_attention(q, k, v, implementation=None):
  """q, k, v: [B, F, P, H, D], spatially and temporally rotated. Returns [B, F, P, H, D]."""
  b, f, p, h, d = q.shape
  out = _attend(q.reshape(b, f * p, h, d), k.reshape(b, f * p, h, d), v.reshape(b, f * p, h, d),
                implementation=implementation)
  return out.reshape(b, f, p, h, d)


def block_causal_attention(q, k, v, *, window: int, head_dim: int, theta: float,
                           query_chunk: int = 0, implementation=None):
  """Whole-clip block-causal attention with the sink and a window of `window` frames.

  Args:
    q, k, v: [B, F, P, H, D]; q and k carry their spatial RoPE rotation only.
    query_chunk: query frames per chunk (0: all frames at once).
  Returns:
    [B, F, P, H, D].
  """
  b, f, p, h, d = q.shape
  frame_ids, positions, num_valid = kv_cache.clip_layout(f, window)
  s = frame_ids.shape[1]
  q = rope.apply_rope(q, rope.time_angles(positions[:, 0], head_dim, theta)[None, :, None, None])

  def chunk_attention(q_c, ids_c, pos_c, valid_c):
    # q_c: [B, C, P, H, D]; ids_c, pos_c: [C, S]; valid_c: [C].
    c = q_c.shape[1]
    k_c = jnp.take(k, ids_c.reshape(-1), axis=1).reshape(b, c, s, p, h, d)
    v_c = jnp.take(v, ids_c.reshape(-1), axis=1).reshape(b, c, s, p, h, d)
    k_c = rope.apply_rope(k_c, rope.time_angles(pos_c, head_dim, theta)[None, :, :, None, None])
    lengths = jnp.broadcast_to(valid_c[None] * p, (b, c)).reshape(b * c).astype(jnp.int32)
    out = _attend(q_c.reshape(b * c, p, h, d), k_c.reshape(b * c, s * p, h, d),
                  v_c.reshape(b * c, s * p, h, d), lengths, implementation)
    return out.reshape(b, c, p, h, d)

  if not query_chunk or query_chunk >= f:
    return chunk_attention(q, jnp.asarray(frame_ids), jnp.asarray(positions), jnp.asarray(num_valid))
  if f % query_chunk:
    raise ValueError(f"query_chunk={query_chunk} must divide the number of frames {f}")
  n = f // query_chunk
  qs = jnp.moveaxis(q.reshape(b, n, query_chunk, p, h, d), 1, 0)
  xs = (qs, jnp.asarray(frame_ids).reshape(n, query_chunk, s),
        jnp.asarray(positions).reshape(n, query_chunk, s), jnp.asarray(num_valid).reshape(n, query_chunk))
  out = jax.lax.map(lambda a: chunk_attention(*a), xs)
  return jnp.moveaxis(out, 0, 1).reshape(b, f, p, h, d)


def cached_attention(q, k, v, layer_cache, index, *, window: int, head_dim: int, theta: float,
                     implementation=None):
  """One frame attends to `[self | sink | ring]` of one layer's cache.

  Args:
    q, k, v: [B, 1, P, H, D], spatially rotated.
    layer_cache: dict with sink_k/sink_v [B, P, H, D] and ring_k/ring_v [B, N, P, H, D].
    index: int32 scalar, this frame's index.
  Returns:
    [B, 1, P, H, D].
  """
  b, _, p, h, d = q.shape
  positions, num_valid = kv_cache.read_layout(index, window)
  angles = rope.time_angles(positions, head_dim, theta)  # [N + 2, D/2]
  q = rope.apply_rope(q, angles[0])
  keys = jnp.concatenate([k, layer_cache["sink_k"][:, None].astype(k.dtype),
                          layer_cache["ring_k"].astype(k.dtype)], axis=1)  # [B, N+2, P, H, D]
  values = jnp.concatenate([v, layer_cache["sink_v"][:, None].astype(v.dtype),
                            layer_cache["ring_v"].astype(v.dtype)], axis=1)
  keys = rope.apply_rope(keys, angles[None, :, None, None])
  s = keys.shape[1]
  lengths = jnp.full((b,), num_valid * p, jnp.int32)
  out = _attend(q.reshape(b, p, h, d), keys.reshape(b, s * p, h, d), values.reshape(b, s * p, h, d),
                lengths, implementation)
  return out.reshape(b, 1, p, h, d)


def dense(features, logical_axes, name, config, use_bias=True):
  return nn.Dense(
      features, use_bias=use_bias, dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype),
      kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), logical_axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (logical_axes[-1],)),
      name=name)


class RMSNorm(nn.Module):
  """RMSNorm with a learned scale (torch.nn.RMSNorm), computed in float32."""
  eps: float = 1e-6
  logical_axis: str = "heads"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.logical_axis,)),
                       (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(x.dtype)


class _Projections(nn.Module):
  """Wan2.1 attention parameters: to_q/to_k/to_v/to_out and RMSNorm of q and k across heads."""
  config: object

  def setup(self):
    c = self.config
    self.to_q = dense(c.dim, ("embed", "heads"), "to_q", c)
    self.to_k = dense(c.dim, ("embed", "heads"), "to_k", c)
    self.to_v = dense(c.dim, ("embed", "heads"), "to_v", c)
    self.to_out = dense(c.dim, ("heads", "embed"), "to_out", c)
    self.norm_q = RMSNorm(c.eps)
    self.norm_k = RMSNorm(c.eps)


class SelfAttention(_Projections):
  """Wan2.1 self-attention (attn1): q/k/v projections, QK-RMSNorm across heads, 3D RoPE."""

  def __call__(self, x, spatial, *, mode: str, layer_cache=None, index=None, full_positions=None):
    """x: [B, F, P, dim]; spatial: [P, head_dim/2] spatial RoPE angles.

    mode: "full" (bidirectional; `full_positions` [F] temporal positions), "block_causal" or "step".
    Returns (out [B, F, P, dim], new layer cache or None).
    """
    c = self.config
    b, f, p, _ = x.shape
    hd = c.dim // c.num_heads
    split = lambda t: t.reshape(b, f, p, c.num_heads, hd)
    q = split(self.norm_q(self.to_q(x)))
    k = split(self.norm_k(self.to_k(x)))
    v = split(self.to_v(x))
    q = rope.apply_rope(q, spatial[None, None, :, None])
    k = rope.apply_rope(k, spatial[None, None, :, None])
    q = nn.with_logical_constraint(q, ("activation_batch", None, "activation_length", "activation_heads", None))
    k = nn.with_logical_constraint(k, ("activation_batch", None, "activation_length", "activation_heads", None))
    impl = c.attention_impl
    new_cache = None
    if mode == "full":
      t_ang = rope.time_angles(full_positions, hd, c.rope_theta)[None, :, None, None]
      out = full_attention(rope.apply_rope(q, t_ang), rope.apply_rope(k, t_ang), v, impl)
    elif mode == "block_causal":
      out = block_causal_attention(q, k, v, window=c.window, head_dim=hd, theta=c.rope_theta,
                                   query_chunk=c.query_chunk, implementation=impl)
    elif mode == "step":
      out = cached_attention(q, k, v, layer_cache, index, window=c.window, head_dim=hd,
                             theta=c.rope_theta, implementation=impl)
      sink_k, ring_k = kv_cache.write(layer_cache["sink_k"], layer_cache["ring_k"], k[:, 0], index, c.window)
      sink_v, ring_v = kv_cache.write(layer_cache["sink_v"], layer_cache["ring_v"], v[:, 0], index, c.window)
      new_cache = {"sink_k": sink_k, "sink_v": sink_v, "ring_k": ring_k, "ring_v": ring_v}
    else:
      raise ValueError(f"unknown attention mode {mode!r}")
    out = self.to_out(out.reshape(b, f, p, c.dim))
    return out, new_cache


class CrossAttention(_Projections):
  """Wan2.1 cross-attention (attn2) from video tokens to text tokens; text never sees video."""

  def text_kv(self, text):
    """text: [B, T, dim] (projected). Returns {'k', 'v'}: [B, T, H, D]."""
    c = self.config
    b, t, _ = text.shape
    hd = c.dim // c.num_heads
    k = self.norm_k(self.to_k(text)).reshape(b, t, c.num_heads, hd)
    v = self.to_v(text).reshape(b, t, c.num_heads, hd)
    return {"k": k, "v": v}

  def __call__(self, x, kv):
    c = self.config
    b, f, p, _ = x.shape
    hd = c.dim // c.num_heads
    q = self.norm_q(self.to_q(x)).reshape(b, f * p, c.num_heads, hd)
    out = _attend(q, kv["k"].astype(q.dtype), kv["v"].astype(q.dtype), implementation=c.attention_impl)
    return self.to_out(out.reshape(b, f, p, c.dim))
