"""CausalDiT: cached step == whole-clip block-causal pass, bounded positions, the mask's reach."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt2_jax.models import CausalDiT, DiTConfig, count_params, kv_cache

B, H, W = 2, 4, 6


def _inputs(config, frames, seed=1):
  ks = jax.random.split(jax.random.key(seed), 4)
  c = config.latent_channels
  noise = jax.random.normal(ks[0], (B, frames, H, W, c))
  recycled = jax.random.normal(ks[1], (B, frames, H, W, c))
  control = jax.random.normal(ks[2], (B, frames, H, W, config.control_channels))
  text = jax.random.normal(ks[3], (B, 5, config.text_dim))
  return noise, recycled, control, text


@pytest.fixture(scope="module")
def stepper(tiny_dit):
  model, params, config = tiny_dit
  step = jax.jit(lambda p, n, r, c, t, cache, tkv: model.apply({"params": p}, n, r, c, t, cache, tkv,
                                                                method=CausalDiT.step))
  encode = jax.jit(lambda p, text: model.apply({"params": p}, text, method=CausalDiT.encode_text))
  return step, encode


def _run_cached(stepper, params, config, noise, recycled, control, t, text, cache=None):
  step, encode = stepper
  tkv = encode(params, text)
  cache = cache if cache is not None else kv_cache.init_cache(config, B, H, W)
  outs = []
  for i in range(noise.shape[1]):
    v, cache = step(params, noise[:, i:i + 1], recycled[:, i:i + 1], control[:, i:i + 1], t, cache, tkv)
    outs.append(v)
  return jnp.concatenate(outs, axis=1), cache


def test_cached_step_equals_whole_clip_past_the_window(tiny_dit, stepper):
  model, params, config = tiny_dit
  frames = config.window + 4  # the ring wraps
  noise, recycled, control, text = _inputs(config, frames)
  t = jnp.array([1.0, 0.3])
  whole = jax.jit(lambda p: model.apply({"params": p}, noise, recycled, control, t, text))(params)
  cached, cache = _run_cached(stepper, params, config, noise, recycled, control, t, text)
  assert whole.shape == (B, frames, H, W, config.latent_channels)
  np.testing.assert_allclose(cached, whole, atol=1e-5, rtol=0)
  assert int(cache["index"]) == frames


def test_query_chunks_equal_one_pass(tiny_dit):
  model, params, config = tiny_dit
  noise, recycled, control, text = _inputs(config, 6)
  t = jnp.array([0.7, 0.2])
  chunked = CausalDiT(DiTConfig.from_dict({**config.__dict__, "query_chunk": 2}))
  a = jax.jit(model.apply)({"params": params}, noise, recycled, control, t, text)
  b = jax.jit(chunked.apply)({"params": params}, noise, recycled, control, t, text)
  # Chunking regroups float32 sums: a few ulps on outputs up to ~3.3 (measured 1.2e-6 = 5 ulps at
  # 3.27 on 1 of 1152 values; an absolute 1e-6 alone was tighter than float32 at that size).
  np.testing.assert_allclose(a, b, atol=1e-6, rtol=2e-6)


def test_dense_block_causal_and_unrolled_scan_equal_the_gathered_kernel(tiny_dit):
  """The CPU's whole-clip kernel (dense heads-major einsums, `use_dense_block_causal`) and an
  unrolled layer scan give the gathered kernel's outputs and gradients, past the window (the
  sink's distance is clamped) and at the longest clip that takes the dense kernel."""
  from apt2_jax.models.attention import use_dense_block_causal
  model, params, config = tiny_dit
  assert config.num_layers >= 2
  for frames in (config.window + 4, 2 * (config.window + 2)):
    assert use_dense_block_causal(frames, config.window) and not use_dense_block_causal(frames, config.window, "xla")
    noise, recycled, control, text = _inputs(config, frames, seed=3)
    t = jnp.array([0.9, 0.4])
    variants = {"gathered": {"attention_impl": "xla"}, "dense": {},
                "dense_unrolled": {"scan_unroll": config.num_layers}}
    outs = {}
    for name, fields in variants.items():
      m = CausalDiT(DiTConfig.from_dict({**config.__dict__, **fields}))
      loss = lambda p, m=m: jnp.mean(jnp.square(m.apply({"params": p}, noise, recycled, control, t, text)))
      outs[name] = jax.jit(jax.value_and_grad(loss))(params)
    ref_loss, ref_grad = outs["gathered"]
    for name in ("dense", "dense_unrolled"):
      loss, grad = outs[name]
      np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=f"{name}, {frames} frames")
      for path, g in jax.tree_util.tree_leaves_with_path(grad):
        r = dict(jax.tree_util.tree_leaves_with_path(ref_grad))[path]
        scale = float(jnp.max(jnp.abs(r))) + 1e-12
        assert float(jnp.max(jnp.abs(g - r))) <= 1e-4 * scale, (name, frames, jax.tree_util.keystr(path))
  assert not use_dense_block_causal(2 * (config.window + 2) + 1, config.window)


def test_block_causal_reach(tiny_dit):
  """In one layer, frame i sees the sink, frames i-N..i and nothing else (never the future).

  (With L layers the reach compounds to L * N frames, so the check uses a one-layer model.)"""
  from apt2_jax.models import init_params
  _, _, config = tiny_dit
  config = DiTConfig.from_dict({**config.__dict__, "num_layers": 1})
  model = CausalDiT(config)
  params = init_params(model, jax.random.key(3))
  n = config.window
  frames = n + 4
  noise, recycled, control, text = _inputs(config, frames)
  t = jnp.ones((B,))
  f = jax.jit(lambda nz: model.apply({"params": params}, nz, recycled, control, t, text))
  base = f(noise)
  def changed(frame):
    out = f(noise.at[:, frame].add(1.0))
    return np.abs(np.asarray(out - base)).max(axis=(0, 2, 3, 4)) > 1e-6
  last = frames - 1
  assert not changed(last)[:last].any()            # the future is invisible
  assert changed(0)[last]                          # the sink is always visible
  assert not changed(last - n - 1)[last]           # outside the window: invisible
  assert changed(last - n)[last]                   # the oldest frame of the window: visible


def test_bounded_positions_frame_10000_equals_frame_n_plus_2(tiny_dit, stepper):
  """With identical window contents, the output at frame 10,000+ equals that at frame N + 2."""
  model, params, config = tiny_dit
  n = config.window
  noise, recycled, control, text = _inputs(config, n + 3)
  t = jnp.ones((B,))
  _, cache = _run_cached(stepper, params, config, noise[:, :n + 2], recycled[:, :n + 2],
                         control[:, :n + 2], t, text)
  assert int(cache["index"]) == n + 2
  # Same ring contents in the same slots: the slot of frame j is (j - 1) % N.
  far = n + 2 + n * ((10_000 - (n + 2)) // n + 1)
  assert far >= 10_000 and (far - (n + 2)) % n == 0
  far_cache = dict(cache, index=jnp.asarray(far, jnp.int32))
  step, encode = stepper
  tkv = encode(params, text)
  sl = slice(n + 2, n + 3)
  near_v, _ = step(params, noise[:, sl], recycled[:, sl], control[:, sl], t, cache, tkv)
  far_v, far_next = step(params, noise[:, sl], recycled[:, sl], control[:, sl], t, far_cache, tkv)
  np.testing.assert_array_equal(np.asarray(near_v), np.asarray(far_v))
  assert np.isfinite(np.asarray(far_v)).all() and int(far_next["index"]) == far + 1


def test_full_mode_sees_the_future(tiny_dit):
  model, params, config = tiny_dit
  noise, recycled, control, text = _inputs(config, 3)
  t = jnp.ones((B,))
  f = jax.jit(lambda nz: model.apply({"params": params}, nz, recycled, control, t, text, mode="full"))
  assert np.abs(np.asarray(f(noise.at[:, 2].add(1.0)) - f(noise)))[:, 0].max() > 1e-6


def test_caption_tokens_and_errors():
  from apt2_jax.configs import sizes
  from apt2_jax.models import init_params
  config = DiTConfig.from_dict(sizes.model_config("tiny"))
  model = CausalDiT(config)
  params = init_params(model, jax.random.key(0))
  z = jnp.zeros((1, 2, 4, 4, config.latent_channels))
  tokens = jnp.array([[5, 9, 0, 0]], jnp.int32)
  v = jax.jit(model.apply)({"params": params}, z, z, None, jnp.ones((1,)), tokens)
  assert v.shape == z.shape and np.isfinite(np.asarray(v)).all()
  with pytest.raises(ValueError, match="latent channels"):
    model.apply({"params": params}, z[..., :2], z[..., :2], None, jnp.ones((1,)), tokens)
  with pytest.raises(ValueError, match="unknown model config field"):
    DiTConfig.from_dict({"dim": 48, "num_hedas": 2})
  with pytest.raises(ValueError, match="remat_policy"):
    DiTConfig.from_dict({"remat_policy": "sometimes"})


def test_parameter_counts_from_eval_shape():
  from apt2_jax.configs import sizes
  counts = {s: count_params(DiTConfig.from_dict(sizes.model_config(s))) for s in sizes.SIZES}
  assert 20e6 <= counts["small"] <= 40e6, counts
  assert 1.25e9 <= counts["wan_1_3b"] <= 1.5e9, counts
  assert 7.5e9 <= counts["apt2_8b"] <= 8.5e9, counts


def test_cache_layout_worked_example():
  positions, valid = kv_cache.read_layout(jnp.asarray(6), 3)
  np.testing.assert_array_equal(positions, [4, 0, 2, 3, 1])
  assert int(valid) == 5
  positions, valid = kv_cache.read_layout(jnp.asarray(0), 3)
  assert int(valid) == 1 and int(positions[0]) == 0
  ids, pos, valid = kv_cache.clip_layout(6, 3)
  np.testing.assert_array_equal(ids[5], [5, 0, 4, 3, 2])
  np.testing.assert_array_equal(pos[5], [4, 0, 3, 2, 1])
  np.testing.assert_array_equal(valid, [1, 2, 3, 4, 5, 5])
