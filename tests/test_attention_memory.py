"""The chunked (online-softmax) attention kernels: equal to the dense ones, sharded or not, and
their compiled temporaries far below the dense kernels' (`models/attention.py`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from apt2_jax import sharding
from apt2_jax.models import attention
from apt2_jax.models import CausalDiT, DiTConfig

B, H, D, THETA = 2, 2, 8, 10000.0
TOL = 1e-5


def _qkv(frames, tokens, seed=0, text=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (B, frames, tokens, H, D))
  kv_shape = (B, text, H, D) if text else (B, frames, tokens, H, D)
  return q, jax.random.normal(ks[1], kv_shape), jax.random.normal(ks[2], kv_shape), jax.random.normal(ks[3], q.shape)


def _value_and_grads(fn, q, k, v, cot):
  """fn(q, k, v) and the gradients of <fn(q, k, v), cot> with respect to q, k and v."""
  out, vjp = jax.vjp(fn, q, k, v)
  return (out,) + vjp(cot)


def _assert_close(got, want, what):
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=TOL, rtol=0, err_msg=f"{what}: {name}")


def _dense(window):
  return lambda q, k, v: attention._block_causal_dense(q, k, v, window, D, THETA)


def _chunked(window, query_chunk, key_chunk):
  return lambda q, k, v: attention.block_causal_attention(
      q, k, v, window=window, head_dim=D, theta=THETA, query_chunk=query_chunk, key_chunk=key_chunk,
      implementation="chunked")


@pytest.mark.parametrize("frames, tokens, window, chunks", [
    (7, 3, 2, [(1, 1), (2, 3), (3, 2), (7, 7), (0, 0)]),  # frames past N + 1: the sink's distance is clamped
    (5, 5, 1, [(2, 1), (4, 3)]),                          # a one-frame window
    (6, 2, 9, [(1, 2), (5, 4)]),                          # a window longer than the clip
    (1, 3, 2, [(1, 1)]),                                  # the sink alone
])
def test_block_causal_chunked_equals_dense(frames, tokens, window, chunks):
  """Outputs and gradients of the chunked kernel at several query x key chunk sizes (dividing the
  clip or not) against the dense kernel."""
  q, k, v, cot = _qkv(frames, tokens, seed=frames)
  want = jax.jit(lambda *a: _value_and_grads(_dense(window), *a))(q, k, v, cot)
  for qc, kc in chunks:
    got = jax.jit(lambda *a: _value_and_grads(_chunked(window, qc, kc), *a))(q, k, v, cot)
    _assert_close(got, want, f"chunks {qc} x {kc}")


def _cross_reference(q, k, v):
  b, f, p, h, d = q.shape
  return jax.nn.dot_product_attention(q.reshape(b, f * p, h, d), k, v).reshape(q.shape)


def test_cross_chunked_equals_dot_product_attention():
  """Cross-attention's chunked kernel (text chunks of 3, 6 and all 7 tokens, with padding) and its
  per-frame XLA kernel against `jax.nn.dot_product_attention` over all queries at once."""
  q, k, v, cot = _qkv(5, 3, seed=1, text=7)
  want = jax.jit(lambda *a: _value_and_grads(_cross_reference, *a))(q, k, v, cot)
  for impl, qc, kc in (("chunked", 1, 1), ("chunked", 2, 2), ("chunked", 5, 3), ("xla", 0, 0)):
    fn = lambda q, k, v, impl=impl, qc=qc, kc=kc: attention.cross_attention(
        q, k, v, implementation=impl, query_chunk=qc, key_chunk=kc)
    got = jax.jit(lambda *a, fn=fn: _value_and_grads(fn, *a))(q, k, v, cot)
    _assert_close(got, want, f"{impl} {qc} x {kc}")


def test_sequence_sharded_queries(devices):
  """On 8 devices with each frame's tokens over `sequence` (4) and the batch over `fsdp` (2): the
  chunked kernels give the unsharded dense results, and their outputs stay sharded over tokens."""
  frames, tokens, window = 5, 4, 2
  q, k, v, cot = _qkv(frames, tokens, seed=2)
  _, tk, tv, _ = _qkv(frames, tokens, seed=3, text=6)
  want = jax.jit(lambda *a: _value_and_grads(_dense(window), *a))(q, k, v, cot)
  want_cross = jax.jit(lambda *a: _value_and_grads(_cross_reference, *a))(q, tk, tv, cot)
  mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=1, sequence=4), devices)
  tokens_split = NamedSharding(mesh, P("fsdp", None, "sequence"))
  text_split = NamedSharding(mesh, P("fsdp"))
  with sharding.use_mesh(mesh):
    q, k, v, cot = (jax.device_put(x, tokens_split) for x in (q, k, v, cot))
    tk, tv = (jax.device_put(x, text_split) for x in (tk, tv))
    got = jax.jit(lambda *a: _value_and_grads(_chunked(window, 2, 1), *a))(q, k, v, cot)
    cross = lambda q, k, v: attention.cross_attention(q, k, v, implementation="chunked", query_chunk=2, key_chunk=1)
    got_cross = jax.jit(lambda *a: _value_and_grads(cross, *a))(q, tk, tv, cot)
  _assert_close(got, want, "block-causal, sequence-sharded")
  _assert_close(got_cross, want_cross, "cross, sequence-sharded")
  for out in (got[0], got_cross[0]):
    assert out.sharding.is_equivalent_to(tokens_split, out.ndim), out.sharding


def test_model_chunked_equals_default(tiny_dit):
  """The tiny DiT's whole-clip pass (past the window) with `attention_impl="chunked"` against the
  CPU default (dense block-causal, per-frame cross-attention); the kernels' gradients are checked
  above."""
  from tests.test_dit import _inputs
  model, params, config = tiny_dit
  noise, recycled, control, text = _inputs(config, config.window + 3, seed=4)
  t = jnp.array([0.8, 0.3])
  chunked = CausalDiT(DiTConfig.from_dict({**config.__dict__, "attention_impl": "chunked", "query_chunk": 2,
                                           "key_chunk": 1}))
  want, got = (jax.jit(m.apply)({"params": params}, noise, recycled, control, t, text) for m in (model, chunked))
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def _temp_bytes(fn, *shapes):
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  grad = jax.grad(lambda q, k, v, c: jnp.vdot(fn(q, k, v), c), argnums=(0, 1, 2))
  return jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_temporaries_far_below_dense():
  """Compile-only, forward and backward at 16 frames of 64 tokens (1024 tokens, window 15): the
  chunked kernels' temporaries are a small fraction of the dense kernels' (which hold
  [heads, tokens, tokens] float32 logits and probabilities)."""
  frames, tokens, window, text = 16, 64, 15, 512
  shape = (1, frames, tokens, H, D)
  logits = H * (frames * tokens) ** 2 * 4
  dense = _temp_bytes(_dense(window), shape, shape, shape, shape)
  chunked = _temp_bytes(_chunked(window, 1, 1), shape, shape, shape, shape)
  assert dense >= 2 * logits and chunked <= logits / 8, (dense, chunked, logits)
  text_shape = (1, text, H, D)
  cross = lambda impl: (lambda q, k, v: attention.cross_attention(q, k, v, implementation=impl, query_chunk=1,
                                                                  key_chunk=1))
  dense = _temp_bytes(cross("xla"), shape, text_shape, text_shape, shape)
  chunked = _temp_bytes(cross("chunked"), shape, text_shape, text_shape, shape)
  assert chunked <= dense / 4, (dense, chunked)


def test_kernel_choice(monkeypatch, devices):
  """CPUs keep the dense kernel for small clips and take the chunked one at size; GPUs take cuDNN
  for bf16 unless the queries are sequence-sharded; config values are checked at load."""
  n = 30
  kernel = attention.block_causal_kernel
  assert kernel(9, 6, None, 64) == "dense" and kernel(9, 6, "einsum", 64) == "dense"
  assert kernel(2 * (n + 2) + 1, n, None, 4) == "gathered"
  assert kernel(30, n, None, 1196) == "chunked" and kernel(9, 6, "chunked", 64) == "chunked"
  assert kernel(9, 6, "xla", 64) == "gathered"
  assert attention.cross_kernel(9 * 64, 32) == "xla" and attention.cross_kernel(30 * 1196, 512) == "chunked"
  assert attention.step_implementation("chunked") == "einsum"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert kernel(30, n, None, 1196, jnp.bfloat16, 128) == "cudnn"
  assert kernel(30, n, None, 1196, jnp.float32, 128) == "chunked"
  assert kernel(9, 6, None, 64, jnp.float32, 48) == "gathered"
  assert attention.cross_kernel(30 * 1196, 512, None, jnp.bfloat16, 128) == "cudnn"
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, sequence=8), devices)
  with sharding.use_mesh(mesh):
    assert kernel(30, n, None, 1196, jnp.bfloat16, 128) == "chunked"
    assert kernel(30, n, "cudnn", 1196, jnp.bfloat16, 128) == "chunked"
    assert attention.cross_kernel(30 * 1196, 512, None, jnp.bfloat16, 128) == "chunked"
  monkeypatch.undo()
  base = dict(num_heads=2, dim=48, num_layers=2)
  with pytest.raises(ValueError, match="model.attention_impl='flash'"):
    DiTConfig(**base, attention_impl="flash")
  with pytest.raises(ValueError, match="model.key_chunk=-1"):
    DiTConfig(**base, key_chunk=-1)
