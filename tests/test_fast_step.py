"""The fast cached step: heads-major cache, per-platform attention kernel, in-place slot write,
and the benchmark's `peer` size and step breakdown."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt2_jax.models import CausalDiT, kv_cache
from apt2_jax.models import attention

B, H, P, D, N = 2, 3, 8, 12, 3


def _layer(key, dtype):
  ks = jax.random.split(key, 7)
  r = lambda k, s: jax.random.normal(k, s, jnp.float32).astype(dtype)
  q, k, v = (r(ks[i], (B, H, P, D)) for i in range(3))
  cache = {"sink_k": r(ks[3], (B, H, P, D)), "sink_v": r(ks[4], (B, H, P, D)),
           "ring_k": r(ks[5], (B, H, N, P, D)), "ring_v": r(ks[6], (B, H, N, P, D))}
  return q, k, v, cache


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("index", [0, 1, 2, 3, N + 1, N + 2, 50])
def test_einsum_kernel_equals_dot_product_attention(index, dtype, atol):
  """The CPU kernel (split logits, no concatenation, normalised after the values) against the
  `jax.nn.dot_product_attention` path on the same heads-major cache, from an empty ring to a
  wrapped one (invalid slots hold random values: the mask, not zeros, must hide them)."""
  q, k, v, cache = _layer(jax.random.key(index), dtype)
  kw = dict(window=N, head_dim=D, theta=10000.0)
  f = jax.jit(lambda i, impl: attention.cached_attention(q, k, v, cache, i, implementation=impl, **kw),
              static_argnums=1)
  want = f(jnp.int32(index), "xla")
  got = f(jnp.int32(index), "einsum")
  assert got.shape == (B, H, P, D) and got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=atol, rtol=0)


def test_step_implementation_by_platform():
  assert attention.step_implementation(None) == ("einsum" if jax.default_backend() == "cpu" else None)
  for impl in ("xla", "cudnn", "einsum"):
    assert attention.step_implementation(impl) == impl
  with pytest.raises(ValueError, match="not one of"):
    attention.step_implementation("flash")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_write_frame_touches_one_slot(dtype):
  cache = jax.tree.map(lambda x: x.astype(dtype) if x.ndim else x, dict(
      sink_k=jnp.ones((2, B, H, P, D)), sink_v=jnp.ones((2, B, H, P, D)) * 2,
      ring_k=jnp.arange(2 * B * H * N * P * D, dtype=jnp.float32).reshape(2, B, H, N, P, D) % 7,
      ring_v=jnp.zeros((2, B, H, N, P, D)), index=jnp.int32(0)))
  new = {"k": jnp.full((2, B, H, P, D), 5.0, dtype), "v": jnp.full((2, B, H, P, D), 6.0, dtype)}
  for index in (0, 1, 2, N + 1, N + 2):
    out = jax.jit(lambda c: kv_cache.write_frame(c, new, N))(dict(cache, index=jnp.int32(index)))
    slot = max(index - 1, 0) % N
    for name, val in (("k", 5.0), ("v", 6.0)):
      ring, old = np.asarray(out[f"ring_{name}"], np.float32), np.asarray(cache[f"ring_{name}"], np.float32)
      np.testing.assert_array_equal(ring[:, :, :, slot], val)
      keep = [s for s in range(N) if s != slot]
      np.testing.assert_array_equal(ring[:, :, :, keep], old[:, :, :, keep])
      sink = np.asarray(out[f"sink_{name}"], np.float32)
      want = val if index == 0 else np.asarray(cache[f"sink_{name}"], np.float32)
      np.testing.assert_array_equal(sink, np.broadcast_to(want, sink.shape))
      assert out[f"ring_{name}"].dtype == dtype


def test_cache_is_heads_major():
  from apt2_jax.configs import sizes
  from apt2_jax.models import DiTConfig
  c = DiTConfig.from_dict(sizes.model_config("tiny", caption_vocab_size=0))
  cache = jax.eval_shape(lambda: kv_cache.init_cache(c, 2, 4, 6))
  hd = c.dim // c.num_heads
  assert cache["sink_k"].shape == (c.num_layers, 2, c.num_heads, 6, hd)
  assert cache["ring_v"].shape == (c.num_layers, 2, c.num_heads, c.window, 6, hd)
  for name, axes in kv_cache.CACHE_LOGICAL_AXES.items():
    assert len(axes) == len(cache[name].shape), name


def test_donated_step_updates_the_ring_in_place(tiny_dit):
  """The compiled, donated step writes the new frame with a dynamic-update-slice and never copies
  a whole ring (the old step rewrote the stacked cache through the layer scan's outputs)."""
  model, params, config = tiny_dit
  h, w = 4, 6
  z = jnp.zeros((1, 1, h, w, config.latent_channels))
  ctrl = jnp.zeros((1, 1, h, w, config.control_channels))
  tkv = model.apply({"params": params}, jnp.zeros((1, 3, config.text_dim)), method=CausalDiT.encode_text)
  cache = kv_cache.init_cache(config, 1, h, w)
  step = jax.jit(lambda p, c: model.apply({"params": p}, z, z, ctrl, jnp.ones((1,)), c, tkv, method=CausalDiT.step),
                 donate_argnums=1)
  text = step.lower(params, cache).compile().as_text()
  ring = "[" + ",".join(map(str, cache["ring_k"].shape)) + "]"
  assert re.search(r"dynamic-update-slice\(", text)
  copies = [l for l in text.splitlines() if " copy(" in l and ring in l.split("copy(")[0]]
  assert not copies, copies[:2]


def test_peer_benchmark_size():
  from apt2_jax.configs import benchmark as bench_cfg
  from apt2_jax.configs import sizes
  c = bench_cfg.get_config("peer")
  m = c.model
  assert (m.dim, m.num_heads, m.dim // m.num_heads, m.num_layers, m.ffn_dim) == (384, 6, 64, 8, 1536)
  assert sizes.tokens_per_frame(c.height, c.width, m.patch_size) == 256
  assert m.dtype == "float32" and c.batch == 1 and c.breakdown


def test_step_breakdown_attributes_the_tiny_step(tiny_dit):
  """The profile-based breakdown finds the attention, the linear layers and the cache write in a
  compiled tiny step (nothing here is timed)."""
  from apt2_jax.benchmark import breakdown
  model, params, config = tiny_dit
  h, w = 4, 6
  z = jnp.zeros((1, 1, h, w, config.latent_channels))
  ctrl = jnp.zeros((1, 1, h, w, config.control_channels))
  tkv = model.apply({"params": params}, jnp.zeros((1, 3, config.text_dim)), method=CausalDiT.encode_text)
  step = jax.jit(lambda c: model.apply({"params": params}, z, z, ctrl, jnp.ones((1,)), c, tkv,
                                       method=CausalDiT.step)[1], donate_argnums=0)
  cache = dict(kv_cache.init_cache(config, 1, h, w), index=jnp.int32(config.window + 2))
  compiled = step.lower(cache).compile()
  cats = breakdown.categorise(compiled.as_text())
  assert {"attention", "linear", "cache_update"} <= set(cats.values())
  figures, _ = breakdown.step_breakdown(compiled, cache, compiled.as_text(), steps=2)
  for c in breakdown.CATEGORIES:
    assert figures[f"{c}_ms"] >= 0
  assert figures["attention_ms"] > 0 and figures["linear_ms"] > 0 and figures["profiled_step_ms"] > 0


def test_benchmark_cli_drops_cheap_compile_flags(monkeypatch):
  from apt2_jax import xla_flags
  from apt2_jax.benchmark import timing
  monkeypatch.setenv("XLA_FLAGS", " ".join(xla_flags.CHEAP_CPU_COMPILE + ("--xla_dump_to=/tmp/x",)))
  timing.drop_cheap_compile_flags()
  assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"
