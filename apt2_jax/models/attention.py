"""Attention for the causal DiT: the kernels and the Wan2.1-layout attention modules.

Whole-clip passes (stage 1, the discriminator, teacher forcing) and the cross-attention pick a
kernel per shape, dtype, platform and mesh (`block_causal_kernel`, `cross_kernel`):

* `full_attention`: every token sees every token (bidirectional pretraining, Wan parity).
* `block_causal_attention`: whole clip; frame i sees `[self | sink | i-1 .. i-N]`. Four kernels:
  - dense (CPUs, small clips): heads-major einsums over the whole clip with a static block-causal
    mask (`_block_causal_dense`). No gather (whose gradient is a scatter) and no per-frame layout
    copies: the testbed's stage-1 step (64 tokens, 9 frames) 1.09 -> 0.86 s.
  - gathered: each query frame gathers its own contiguous key groups (`kv_cache.clip_layout`);
    valid groups form a prefix, so the mask is a per-row key length (`key_value_seq_lengths`).
    Through `jax.nn.dot_product_attention`: its XLA path ("xla"; materialises each chunk's
    logits), or cuDNN flash attention ("cudnn", the default on GPUs for bf16/fp16).
  - chunked (`_block_causal_chunked`): an online softmax over query-frame chunks x key-frame
    chunks with per-chunk `jax.checkpoint`, so neither pass keeps [tokens x tokens] logits. The
    default wherever the others do not apply at a size (CPUs above `DENSE_MAX_LOGITS`, GPUs with
    sequence-sharded queries or float32), and what the AOT rows compile on CPU devices to measure
    what a flash kernel needs.
* `cross_attention`: video tokens to text tokens; `jax.nn.dot_product_attention` per frame for
  small shapes, cuDNN on GPUs, else chunked (`_cross_chunked`). Queries stay `[B, F, P, H, D]`:
  merging F and a sequence-sharded P would replicate them.
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


IMPLEMENTATIONS = (None, "xla", "cudnn", "einsum", "chunked")

# Above this many logits per batch row and head, the whole-clip passes leave the kernels that
# materialise them (dense, gathered XLA, per-frame cross-attention) for the chunked one: 4M float32
# logits are 16 MB per row and head (dense self-attention over 2048 tokens).
DENSE_MAX_LOGITS = 1 << 22
# Tokens per chunk of the chunked kernels where `query_chunk` / `key_chunk` are 0, in whole frames
# (at least one): one frame each at 736x416 (1196 tokens).
CHUNK_TOKENS = 1024
# Gathered keys per query chunk of the cuDNN kernel where `query_chunk` is 0.
GATHER_TOKENS = 1 << 16
_BIG_NEG = -0.7 * float(np.finfo(np.float32).max)
# Heads-major [B, H, F, P, D]: queries keep their tokens split over `sequence`; keys and values of
# the chunked kernels are gathered whole once (every query frame reads its keys from all tokens).
_QUERY_AXES = ("activation_batch", "activation_heads", None, "activation_length", None)
_WHOLE_AXES = ("activation_batch", "activation_heads", None, None, None)


def _check(implementation):
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
  return implementation


def step_implementation(implementation=None):
  """The cached step's attention kernel: `implementation`, or with None (auto) the fastest
  measured per platform: "einsum" (heads-major einsums, `_cached_einsum`) on CPUs, else the XLA
  path of `jax.nn.dot_product_attention` (select "cudnn" for cuDNN flash attention on GPUs).
  "chunked" selects the whole-clip kernel only; the step then takes the auto choice."""
  if _check(implementation) in (None, "chunked"):
    return "einsum" if jax.default_backend() == "cpu" else None
  return implementation


def _sequence_sharded() -> bool:
  """Whether the mesh in context (`jax.set_mesh`) splits tokens over `sequence`."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and dict(mesh.shape).get("sequence", 1) > 1


def _cudnn_supports(dtype, head_dim: int) -> bool:
  """cuDNN flash attention's limits on every GPU generation: bf16/fp16, head_dim a multiple of 8
  up to 128 (the auto choice must not pick a call that fails)."""
  return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim % 8 == 0 \
      and head_dim <= 128


def _flash(implementation, dtype, head_dim):
  """For "cudnn" and the GPU default (auto off CPUs): True where cuDNN flash attention takes the
  call, False where it cannot; None for the other implementations.

  cuDNN's partitioner refuses a sharded sequence dimension (it shards batch and heads only), and
  the heads do not divide an 8-way Ulysses all-to-all at our sizes (12 heads at `wan_1_3b`, 28 at
  `apt2_8b`), so sequence-sharded queries fall back (to the chunked kernel at size)."""
  if implementation == "cudnn" or (implementation is None and jax.default_backend() != "cpu"):
    return not _sequence_sharded() and (implementation == "cudnn" or _cudnn_supports(dtype, head_dim))
  return None


def block_causal_kernel(num_frames: int, window: int, implementation=None, tokens_per_frame: int = 0,
                        dtype=jnp.float32, head_dim: int = 128) -> str:
  """The whole-clip block-causal kernel: "dense", "gathered" (XLA), "cudnn" (gathered, cuDNN flash
  attention) or "chunked".

  "xla" selects the gathered kernel, "chunked" the chunked one. "cudnn" and GPUs (auto) take cuDNN
  where it runs (`_flash`), else the chunked kernel (on auto, small shapes: the gathered one).
  CPUs ("einsum" or auto) take the dense kernel for clips of at most `2 (N + 2)` frames (where the
  dense logits cost at most 2x the gathered ones) of at most `DENSE_MAX_LOGITS` logits per batch
  row and head, else the gathered one up to that size, else the chunked one.
  `tokens_per_frame=0`: sizes are not considered.
  """
  _check(implementation)
  if implementation in ("xla", "chunked"):
    return "gathered" if implementation == "xla" else "chunked"
  p = tokens_per_frame
  small_gathered = num_frames * p * (2 + min(max(num_frames - 2, 0), window)) * p <= DENSE_MAX_LOGITS
  flash = _flash(implementation, dtype, head_dim)
  if flash is not None:
    return "cudnn" if flash else ("gathered" if implementation is None and small_gathered else "chunked")
  if num_frames <= 2 * (window + 2) and (num_frames * p) ** 2 <= DENSE_MAX_LOGITS:
    return "dense"
  return "gathered" if small_gathered else "chunked"


def use_dense_block_causal(num_frames: int, window: int, implementation=None, tokens_per_frame: int = 0) -> bool:
  """Whether the whole-clip block-causal pass takes the dense kernel (`block_causal_kernel`)."""
  return block_causal_kernel(num_frames, window, implementation, tokens_per_frame) == "dense"


def cross_kernel(num_queries: int, num_keys: int, implementation=None, dtype=jnp.float32,
                 head_dim: int = 128) -> str:
  """The cross-attention's kernel: "xla" (`jax.nn.dot_product_attention` per frame), "cudnn" or
  "chunked". As `block_causal_kernel`, with "xla" standing for the dense and gathered kernels."""
  _check(implementation)
  if implementation in ("xla", "chunked"):
    return implementation
  small = num_queries * num_keys <= DENSE_MAX_LOGITS
  flash = _flash(implementation, dtype, head_dim)
  if flash is not None:
    return "cudnn" if flash else ("xla" if implementation is None and small else "chunked")
  return "xla" if small else "chunked"


def _dpa_implementation(implementation):
  """`jax.nn.dot_product_attention`'s `implementation` ("einsum" is the step's own kernel; the
  whole-clip passes and cross-attention use the XLA path for it)."""
  return None if implementation in ("einsum", "chunked") else implementation


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
                           query_chunk: int = 0, key_chunk: int = 0, implementation=None):
  """Whole-clip block-causal attention with the sink and a window of `window` frames.

  Args:
    q, k, v: [B, F, P, H, D]; q and k carry their spatial RoPE rotation only.
    query_chunk: query frames per chunk of the gathered and chunked kernels (0: the gathered XLA
      kernel takes all frames at once, the others choose).
    key_chunk: key frames per chunk of the chunked kernel (0: `CHUNK_TOKENS`).
    implementation: `IMPLEMENTATIONS`; the kernel is `block_causal_kernel`'s choice.
  Returns:
    [B, F, P, H, D].
  """
  b, f, p, h, d = q.shape
  kernel = block_causal_kernel(f, window, implementation, p, q.dtype, d)
  if kernel == "dense":
    return _block_causal_dense(q, k, v, window, head_dim, theta)
  if kernel == "chunked":
    return _block_causal_chunked(q, k, v, window, head_dim, theta, query_chunk, key_chunk)
  frame_ids, positions, num_valid = kv_cache.clip_layout(f, window)
  s = frame_ids.shape[1]
  if kernel == "cudnn" and not query_chunk:  # bound the gathered keys: the largest divisor that fits
    query_chunk = max(c for c in range(1, f + 1) if f % c == 0 and (c == 1 or c * s * p <= GATHER_TOKENS))
  impl = "cudnn" if kernel == "cudnn" else None
  q = rope.apply_rope(q, rope.time_angles(positions[:, 0], head_dim, theta)[None, :, None, None])

  def chunk_attention(q_c, ids_c, pos_c, valid_c):
    # q_c: [B, C, P, H, D]; ids_c, pos_c: [C, S]; valid_c: [C].
    c = q_c.shape[1]
    k_c = jnp.take(k, ids_c.reshape(-1), axis=1).reshape(b, c, s, p, h, d)
    v_c = jnp.take(v, ids_c.reshape(-1), axis=1).reshape(b, c, s, p, h, d)
    k_c = rope.apply_rope(k_c, rope.time_angles(pos_c, head_dim, theta)[None, :, :, None, None])
    lengths = jnp.broadcast_to(valid_c[None] * p, (b, c)).reshape(b * c).astype(jnp.int32)
    out = _attend(q_c.reshape(b * c, p, h, d), k_c.reshape(b * c, s * p, h, d),
                  v_c.reshape(b * c, s * p, h, d), lengths, impl)
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


def _precision(dtype):
  return lax.DotAlgorithmPreset.BF16_BF16_F32 if dtype == jnp.bfloat16 else None


def _frames_per_chunk(chunk: int, tokens_per_frame: int, limit: int) -> int:
  """`chunk` frames, or with 0 those of `CHUNK_TOKENS` tokens; between 1 and `limit`."""
  return max(1, min(chunk or CHUNK_TOKENS // tokens_per_frame, limit))


def _heads_major(x):
  """[B, F, P, H, D] -> [B, H, F, P, D]."""
  return jnp.moveaxis(x, 3, 1)


def _pad_axis(x, axis: int, size: int):
  """`x` with zeros appended along `axis` up to `size`."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _softmax_init(q):
  """The online softmax's state for queries q [B, H, C, P, D]: running max and sum [B, H, C, P],
  unnormalised output [B, H, C, P, D], all float32."""
  rows = q.shape[:-1]
  return (jnp.full(rows, _BIG_NEG, jnp.float32), jnp.zeros(rows, jnp.float32), jnp.zeros(q.shape, jnp.float32))


def _softmax_step(state, q, k, v, mask):
  """One key chunk of the online softmax.

  Args:
    state: `_softmax_init`'s (max, sum, output).
    q: [B, H, C, P, D]; k, v: [B, H, K, D]; mask: bool, broadcastable to [B, H, C, P, K].
  Returns:
    the state with the chunk added. Numerics as the dense kernel: float32 logits (scaled after the
    product) and softmax, probabilities in the values' dtype; normalised at the end (`_softmax_out`).
  """
  m, l, acc = state
  s = jnp.einsum("bhcpd,bhkd->bhcpk", q, k, precision=_precision(q.dtype), preferred_element_type=jnp.float32)
  s = jnp.where(mask, s * jnp.float32(1.0 / np.sqrt(q.shape[-1])), _BIG_NEG)
  m_new = jnp.maximum(m, s.max(axis=-1))
  # Masked logits are finite (no inf - inf); the select keeps a row with nothing valid yet at 0.
  probs = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
  scale = jnp.exp(m - m_new)
  acc = acc * scale[..., None] + jnp.einsum("bhcpk,bhkd->bhcpd", probs.astype(v.dtype), v,
                                            precision=_precision(v.dtype), preferred_element_type=jnp.float32)
  return m_new, l * scale + probs.sum(axis=-1), acc


def _softmax_out(state, dtype):
  _, l, acc = state
  return (acc / l[..., None]).astype(dtype)


def _block_causal_chunked(q, k, v, window, head_dim, theta, query_chunk=0, key_chunk=0):
  """Block-causal attention as an online softmax over query-frame chunks x key-frame chunks.

  Query frames [a, a + C) read the sink (frame 0, one chunk, with the sink's own rotation as in
  `_block_causal_dense`) and one contiguous span of frames >= 1 that holds their windows
  `[a - N, a + C)`, in chunks of `key_chunk` frames; frames of the span outside a query frame's
  window are masked. Each query chunk and each key chunk is a `jax.checkpoint`: the forward pass
  keeps no logits, the backward pass one chunk's at a time (and one query chunk's running
  statistics per key chunk). Keys and values are gathered whole once (sequence-sharded queries
  stay sharded) and held in float32, as are the queries within a chunk, so that the gradients
  summed over chunks accumulate in float32 (as a flash kernel's do).

  Args:
    q, k, v: [B, F, P, H, D]; q and k carry their spatial RoPE rotation only.
    query_chunk, key_chunk: frames per chunk (0: `CHUNK_TOKENS` tokens).
  Returns:
    [B, F, P, H, D].
  """
  b, f, p, h, d = q.shape
  dtype = q.dtype
  cq = _frames_per_chunk(query_chunk, p, f)
  n_q = -(-f // cq)
  span = max(1, min(window + cq, f - 1))  # window frames (>= 1) that one query chunk can read
  ck = _frames_per_chunk(key_chunk, p, span)
  n_k = -(-span // ck)
  span = n_k * ck
  f_keys = max(f, 1 + span)  # keys padded so that every span lies within them
  frames = np.arange(n_q * cq)
  angles = lambda pos: rope.time_angles(pos, head_dim, theta)[None, None, :, None]
  qh = nn.with_logical_constraint(_pad_axis(_heads_major(q), 2, n_q * cq), _QUERY_AXES)
  q_window = rope.apply_rope(qh, angles(frames))  # distance i - j to window frame j
  # The sink sits at distance min(i, N + 1) (`kv_cache.read_layout`): a second rotation of the
  # queries, needed once a query frame lies past N + 1.
  q_sink = rope.apply_rope(qh, angles(np.minimum(frames, window + 1))) if frames[-1] > window + 1 else None
  keys = rope.apply_rope(_heads_major(k), angles(np.arange(f)))
  keys, values = (nn.with_logical_constraint(_pad_axis(x.astype(jnp.float32), 2, f_keys), _WHOLE_AXES)
                  for x in (keys, _heads_major(v)))
  to_chunks = lambda x: jnp.moveaxis(x.reshape(b, h, n_q, cq, p, d), 2, 0)  # [n_q, B, H, cq, P, D]
  key_chunks = lambda x: jnp.moveaxis(x.reshape(b, h, n_k, ck * p, d), 2, 0)  # [n_k, B, H, ck P, D]

  def query_chunk_attention(xs):
    c, q_w, q_s = xs  # q_w, q_s: [B, H, cq, P, D]
    q_w = q_w.astype(jnp.float32)
    q_s = q_w if q_s is None else q_s
    state = _softmax_step(_softmax_init(q_w), q_s.astype(dtype), keys[:, :, 0].astype(dtype),
                          values[:, :, 0].astype(dtype), True)
    q_frames = c * cq + jnp.arange(cq)
    start = jnp.clip(c * cq - window, 1, f_keys - span)
    span_k, span_v = (key_chunks(lax.dynamic_slice_in_dim(x, start, span, axis=2)) for x in (keys, values))

    def key_chunk_step(state, xs):
      j, k_c, v_c = xs
      k_frames = start + j * ck + jnp.arange(ck)
      dist = q_frames[:, None] - k_frames[None, :]
      valid = (dist >= 0) & (dist <= window) & (k_frames[None, :] < f)  # [cq, ck]
      mask = jnp.repeat(valid, p, axis=1)[:, None, :]  # [cq, 1, ck P]
      return _softmax_step(state, q_w.astype(dtype), k_c.astype(dtype), v_c.astype(dtype), mask), None

    state, _ = lax.scan(jax.checkpoint(key_chunk_step, prevent_cse=False), state,
                        (jnp.arange(n_k), span_k, span_v))
    return _softmax_out(state, dtype)

  xs = (jnp.arange(n_q), to_chunks(q_window), None if q_sink is None else to_chunks(q_sink))
  out = lax.map(jax.checkpoint(query_chunk_attention, prevent_cse=False), xs)  # [n_q, B, H, cq, P, D]
  out = jnp.moveaxis(out, 0, 2).reshape(b, h, n_q * cq, p, d)[:, :, :f]
  return jnp.moveaxis(out, 1, 3)


def cross_attention(q, k, v, *, implementation=None, query_chunk: int = 0, key_chunk: int = 0):
  """Video tokens attend to text tokens (`cross_kernel` picks the kernel).

  Args:
    q: [B, F, P, H, D]; k, v: [B, T, H, D].
    query_chunk: query frames per chunk of the chunked kernel (0: `CHUNK_TOKENS` tokens).
    key_chunk: text tokens per chunk of the chunked kernel, in frames of P tokens (0:
      `CHUNK_TOKENS` tokens), so that its chunks have the block-causal kernel's size.
  Returns:
    [B, F, P, H, D].
  """
  b, f, p, h, d = q.shape
  kernel = cross_kernel(f * p, k.shape[1], implementation, q.dtype, d)
  if kernel == "chunked":
    return _cross_chunked(q, k, v, _frames_per_chunk(query_chunk, p, f), _frames_per_chunk(key_chunk, p, 1 << 30) * p)
  if kernel == "cudnn":  # tokens not sequence-sharded (`_flash`): merging F and P copies nothing
    return _attend(q.reshape(b, f * p, h, d), k, v, implementation="cudnn").reshape(b, f, p, h, d)
  return jax.vmap(lambda q_f: _attend(q_f, k, v), in_axes=1, out_axes=1)(q)


def _cross_chunked(q, k, v, query_frames: int, key_tokens: int):
  """Cross-attention as an online softmax over chunks of `query_frames` query frames x
  `key_tokens` text tokens, each a `jax.checkpoint` (as `_block_causal_chunked`).

  Args:
    q: [B, F, P, H, D]; k, v: [B, T, H, D].
  Returns:
    [B, F, P, H, D].
  """
  b, f, p, h, d = q.shape
  t, dtype = k.shape[1], q.dtype
  cq, ct = min(query_frames, f), min(key_tokens, t)
  n_q, n_k = -(-f // cq), -(-t // ct)
  qh = nn.with_logical_constraint(_pad_axis(_heads_major(q), 2, n_q * cq), _QUERY_AXES)
  q_chunks = jnp.moveaxis(qh.reshape(b, h, n_q, cq, p, d), 2, 0)  # [n_q, B, H, cq, P, D]
  # [n_k, B, H, ct, D], float32: their gradients are summed over the query chunks.
  k_chunks, v_chunks = (jnp.moveaxis(_pad_axis(jnp.moveaxis(x, 2, 1).astype(jnp.float32), 2, n_k * ct)
                                     .reshape(b, h, n_k, ct, d), 2, 0) for x in (k, v))

  def query_chunk_attention(q_c):
    q_c = q_c.astype(jnp.float32)

    def key_chunk_step(state, xs):
      j, k_c, v_c = xs
      mask = j * ct + jnp.arange(ct) < t
      return _softmax_step(state, q_c.astype(dtype), k_c.astype(dtype), v_c.astype(dtype), mask), None

    state, _ = lax.scan(jax.checkpoint(key_chunk_step, prevent_cse=False), _softmax_init(q_c),
                        (jnp.arange(n_k), k_chunks, v_chunks))
    return _softmax_out(state, dtype)

  out = lax.map(jax.checkpoint(query_chunk_attention, prevent_cse=False), q_chunks)
  out = jnp.moveaxis(out, 0, 2).reshape(b, h, n_q * cq, p, d)[:, :, :f]
  return jnp.moveaxis(out, 1, 3)


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
                                   query_chunk=c.query_chunk, key_chunk=c.key_chunk, implementation=impl)
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
    q = self.norm_q(self.to_q(x)).reshape(b, f, p, c.num_heads, hd)
    q = nn.with_logical_constraint(q, ("activation_batch", None, "activation_length", "activation_heads", None))
    with jax.named_scope("cross_attention"):
      out = cross_attention(q, kv["k"].astype(q.dtype), kv["v"].astype(q.dtype), implementation=c.attention_impl,
                            query_chunk=c.query_chunk, key_chunk=c.key_chunk)
    return self.to_out(out.reshape(b, f, p, c.dim))
