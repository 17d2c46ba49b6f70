"""Attention for the causal DiT: the kernels and the Wan2.1-layout attention modules.

Three ways to attend, all through `jax.nn.dot_product_attention` (cuDNN flash attention on GPUs
when `implementation="cudnn"`, the XLA path elsewhere):

* `full_attention`: every token sees every token (bidirectional pretraining, Wan parity).
* `block_causal_attention`: whole clip; frame i sees `[self | sink | i-1 .. i-N]`. Two kernels:
  - gathered (GPUs, long clips): no dense [tokens x tokens] mask is built: each query frame
    gathers its own contiguous key groups (laid out by `kv_cache.clip_layout`, computed once per
    shape) and valid groups form a prefix, so the mask is a per-row key length
    (`key_value_seq_lengths`), which flash kernels take natively. Query frames are processed in
    chunks of `query_chunk` frames to bound the gathered keys' memory.
  - dense (CPUs, clips of at most `2 (N + 2)` frames): heads-major einsums over the whole clip with
    a static block-causal mask (`_block_causal_dense`). No gather (whose gradient is a scatter) and
    no per-frame layout copies: the testbed's stage-1 step (64 tokens, 9 frames) 1.09 -> 0.86 s.
* `cached_attention`: one new frame against `[self | sink | ring]` of the KV cache, heads-major
  `[B, H, ., D]` as the cache is stored. Its kernel is chosen per platform (`step_implementation`):
  explicit einsums on CPUs (measured faster than `dot_product_attention` there), the XLA path or
  cuDNN (`attention_impl="cudnn"`) of `jax.nn.dot_product_attention` elsewhere.

Both causal paths apply the temporal RoPE rotation on read, with bounded positions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from jax import lax

from apt2_jax.models import kv_cache, rope


IMPLEMENTATIONS = (None, "xla", "cudnn", "einsum")


def step_implementation(implementation=None):
  """The cached step's attention kernel: `implementation`, or with None (auto) the fastest
  measured per platform: "einsum" (heads-major einsums, `_cached_einsum`) on CPUs, else the XLA
  path of `jax.nn.dot_product_attention` (select "cudnn" for cuDNN flash attention on GPUs)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
  if implementation is None:
    return "einsum" if jax.default_backend() == "cpu" else None
  return implementation


def _dpa_implementation(implementation):
  """`jax.nn.dot_product_attention`'s `implementation` ("einsum" is the step's own kernel; the
  whole-clip passes and cross-attention use the XLA path for it)."""
  return None if implementation == "einsum" else implementation


def _attend(q, k, v, kv_lengths=None, implementation=None):
  """q: [B, T, H, D]; k, v: [B, S, H, D]; kv_lengths: int32 [B] valid key prefix."""
  return jax.nn.dot_product_attention(
      q, k, v, key_value_seq_lengths=kv_lengths, implementation=_dpa_implementation(implementation))


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
  if use_dense_block_causal(f, window, implementation):
    return _block_causal_dense(q, k, v, window, head_dim, theta)
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


def use_dense_block_causal(num_frames: int, window: int, implementation=None) -> bool:
  """Whether the whole-clip block-causal pass takes the dense kernel: with the "einsum" kernel
  (`step_implementation`; auto on CPUs) and clips of at most twice the gathered key groups
  (`N + 2`), where the dense logits cost at most 2x the gathered ones."""
  return step_implementation(implementation) == "einsum" and num_frames <= 2 * (window + 2)


def _block_causal_dense(q, k, v, window, head_dim, theta):
  """Block-causal attention over the whole clip as dense heads-major einsums.

  Same keys and temporal positions as the gathered kernel (`kv_cache.clip_layout`): with RoPE a
  logit depends only on the query-key distance, so queries and window keys are rotated by their
  frame indices (distance i - j, as in the window). The sink (frame 0) sits at distance
  min(i, N + 1) from query frame i (`read_layout`): its logits use a second rotation of the
  queries, by min(i, N + 1), against the sink's keys at position 0. The static mask keeps, for
  query frame i, the sink and frames j >= 1 with 0 <= i - j <= N. Numerics as the cached einsum
  kernel (float32 logits and softmax, probabilities in the values' dtype).

  Args:
    q, k, v: [B, F, P, H, D]; q and k carry their spatial RoPE rotation only.
  Returns:
    [B, F, P, H, D].
  """
  b, f, p, h, d = q.shape
  frames = np.arange(f)
  angles = lambda pos: rope.time_angles(pos, head_dim, theta)[None, :, None, None]
  heads_major = lambda x: jnp.moveaxis(x, 3, 1).reshape(b, h, f * p, d)  # [B, H, F * P, D]
  precision = lax.DotAlgorithmPreset.BF16_BF16_F32 if q.dtype == jnp.bfloat16 else None
  logits = lambda a, c: jnp.einsum("bhqd,bhkd->bhqk", a, c, precision=precision,
                                   preferred_element_type=jnp.float32)
  keys = heads_major(rope.apply_rope(k, angles(frames)))  # frame 0's rotation is the identity
  q_sink = heads_major(rope.apply_rope(q, angles(np.minimum(frames, window + 1))))
  q_window = heads_major(rope.apply_rope(q, angles(frames)))
  # Key frame 0 is the sink for every query frame (for frame 0, itself); frames >= 1 the window.
  scores = jnp.concatenate([logits(q_sink, keys[:, :, :p]), logits(q_window, keys[:, :, p:])], axis=-1)
  scores = scores * jnp.float32(1.0 / np.sqrt(d))
  qf, kf = np.repeat(frames, p)[:, None], np.repeat(frames, p)[None, :]
  mask = (kf == 0) | ((kf >= 1) & (qf - kf >= 0) & (qf - kf <= window))
  scores = jnp.where(mask, scores, jnp.float32(-0.7 * np.finfo(np.float32).max))
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bhqk,bhkd->bhqd", probs, heads_major(v), precision=precision,
                   preferred_element_type=jnp.float32).astype(q.dtype)
  return jnp.moveaxis(out.reshape(b, h, f, p, d), 1, 3)


def cached_attention(q, k, v, layer_cache, index, *, window: int, head_dim: int, theta: float,
                     implementation=None):
  """One frame attends to `[self | sink | ring]` of one layer's cache.

  Args:
    q, k, v: [B, H, P, D] (heads-major), spatially rotated: the new frame.
    layer_cache: dict with sink_k/sink_v [B, H, P, D] and ring_k/ring_v [B, H, N, P, D].
    index: int32 scalar, this frame's index.
    implementation: `step_implementation`'s choices (None: per platform).
  Returns:
    [B, H, P, D].
  """
  with jax.named_scope("cached_attention"):  # the benchmark's step breakdown finds it by this name
    return _cached_attention(q, k, v, layer_cache, index, window, head_dim, theta, implementation)


def _cached_attention(q, k, v, layer_cache, index, window, head_dim, theta, implementation):
  positions, num_valid = kv_cache.read_layout(index, window)
  angles = rope.time_angles(positions, head_dim, theta)  # [N + 2, D/2]
  q = rope.apply_rope(q, angles[0])
  k = rope.apply_rope(k, angles[0])
  # The sink sits at temporal position 0 (`read_layout`): its rotation is the identity.
  sink_k, sink_v = layer_cache["sink_k"].astype(k.dtype), layer_cache["sink_v"].astype(v.dtype)
  ring_k = rope.apply_rope(layer_cache["ring_k"].astype(k.dtype), angles[2:, None])  # [B, H, N, P, D]
  ring_v = layer_cache["ring_v"].astype(v.dtype)
  implementation = step_implementation(implementation)
  if implementation == "einsum":
    return _cached_einsum(q, jnp.stack([k, sink_k], axis=2), jnp.stack([v, sink_v], axis=2), ring_k, ring_v,
                          num_valid)
  b, h, p, d = q.shape
  to_bshd = lambda x: jnp.moveaxis(x.reshape(b, h, -1, d), 1, 2)  # [B, H, S, D] -> [B, S, H, D]
  keys = jnp.concatenate([k[:, :, None], sink_k[:, :, None], ring_k], axis=2)  # [B, H, N+2, P, D]
  values = jnp.concatenate([v[:, :, None], sink_v[:, :, None], ring_v], axis=2)
  lengths = jnp.full((b,), num_valid * p, jnp.int32)
  out = _attend(jnp.moveaxis(q, 1, 2), to_bshd(keys), to_bshd(values), lengths, implementation)
  return jnp.moveaxis(out, 2, 1)


def _cached_einsum(q, fresh_k, fresh_v, ring_k, ring_v, num_valid):
  """The cached step's attention as explicit heads-major einsums (the fastest form on CPUs).

  The key groups `[self | sink]` (fresh_k/v [B, H, 2, P, D]) and `[ring slots]` (ring_k/v
  [B, H, N, P, D], read where they lie: neither is concatenated) share one softmax over their
  valid groups (the first `num_valid` of `[self | sink | slot 0 .. N-1]`). Numerics follow the XLA
  path of `jax.nn.dot_product_attention` (float32 logits scaled after the product, float32
  softmax, probabilities in the values' dtype) except that the softmax is normalised after the
  product with the values (equal up to rounding).
  """
  b, h, p, d = q.shape
  # One contracting dimension per product ([B, H, S, D] keys, S = groups x tokens): with two
  # (group, token), XLA transposes the probabilities and the ring's values before each product.
  fresh_k, fresh_v = fresh_k.reshape(b, h, -1, d), fresh_v.reshape(b, h, -1, d)
  ring_k, ring_v = ring_k.reshape(b, h, -1, d), ring_v.reshape(b, h, -1, d)
  precision = lax.DotAlgorithmPreset.BF16_BF16_F32 if q.dtype == jnp.bfloat16 else None
  logits = lambda keys: jnp.einsum("bhqd,bhsd->bhqs", q, keys, precision=precision,
                                   preferred_element_type=jnp.float32) * jnp.float32(1.0 / np.sqrt(d))
  lf, lr = logits(fresh_k), logits(ring_k)  # [B, H, P, 2P], [B, H, P, NP]
  big_neg = jnp.float32(-0.7 * np.finfo(np.float32).max)
  valid_f = jnp.arange(lf.shape[-1]) // p < num_valid
  valid_r = jnp.arange(lr.shape[-1]) // p + 2 < num_valid
  m = jnp.maximum(jnp.where(valid_f, lf, big_neg).max(axis=-1, keepdims=True),
                  jnp.where(valid_r, lr, big_neg).max(axis=-1, keepdims=True))
  # Unnormalised probabilities, cast once; the row sums divide the [P, D] output, not the
  # [P, S] probabilities (one pass over the logits fewer; the mask is fused into the exp).
  pf = jnp.where(valid_f, jnp.exp(lf - m), 0.0).astype(fresh_v.dtype)
  pr = jnp.where(valid_r, jnp.exp(lr - m), 0.0).astype(ring_v.dtype)
  denom = (pf.astype(jnp.float32).sum(axis=-1, keepdims=True)
           + pr.astype(jnp.float32).sum(axis=-1, keepdims=True))
  out = (jnp.einsum("bhqs,bhsd->bhqd", pf, fresh_v, preferred_element_type=jnp.float32)
         + jnp.einsum("bhqs,bhsd->bhqd", pr, ring_v, preferred_element_type=jnp.float32)) / denom
  return out.astype(q.dtype)


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
    Returns (out [B, F, P, dim], None, or in mode "step" this frame's keys (spatially rotated) and
    values {"k", "v"}: [B, H, P, D], for `kv_cache.write_frame`).
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
    elif mode == "step":  # heads-major, the cache's layout: [B, 1, P, H, D] -> [B, H, P, D]
      hm = lambda t: jnp.moveaxis(t[:, 0], 2, 1)
      k, v = hm(k), hm(v)
      out = cached_attention(hm(q), k, v, layer_cache, index, window=c.window, head_dim=hd,
                             theta=c.rope_theta, implementation=impl)
      out = jnp.moveaxis(out, 1, 2)[:, None]  # [B, 1, P, H, D]
      new_cache = {"k": k, "v": v}  # this frame only: `kv_cache.write_frame` after the layer scan
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
    with jax.named_scope("cross_attention"):
      out = _attend(q, kv["k"].astype(q.dtype), kv["v"].astype(q.dtype), implementation=c.attention_impl)
    return self.to_out(out.reshape(b, f, p, c.dim))
