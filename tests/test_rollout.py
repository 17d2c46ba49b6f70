"""The scan rollout: equals the whole-clip pass on its own outputs; gradients through the cache;
the matched multi-step sampler equals stage 1's teacher forcing at one t per clip."""
import jax
import jax.numpy as jnp
import numpy as np

from apt2_jax.models import CausalDiT, kv_cache
from apt2_jax.rollout import RolloutOptions, empty_cache, matched_noise, rollout, shifted_schedule

B, H, W = 2, 4, 6


def _setup(config, steps):
  ks = jax.random.split(jax.random.key(7), 4)
  c = config.latent_channels
  first = jax.random.normal(ks[0], (B, 1, H, W, c))
  noise = jax.random.normal(ks[1], (B, steps, H, W, c))
  controls = jax.random.normal(ks[2], (B, steps, H, W, config.control_channels))
  text = jax.random.normal(ks[3], (B, 5, config.text_dim))
  return first, noise, controls, text


def test_rollout_equals_whole_clip_on_recycled_outputs(tiny_dit):
  model, params, config = tiny_dit
  steps = config.window + 3
  first, noise, controls, text = _setup(config, steps)

  @jax.jit
  def run(params):
    tkv = model.apply({"params": params}, text, method=CausalDiT.encode_text)
    return rollout(model, params, first, tkv, noise, controls,
                   cache=kv_cache.init_cache(config, B, H, W))
  frames, cache = run(params)
  assert frames.shape == noise.shape and int(cache["index"]) == steps
  # Teacher forcing on the rollout's own frames reproduces them: x_i = eps_i - v(eps_i, t=1).
  recycled = jnp.concatenate([first, frames[:, :-1]], axis=1)
  v = jax.jit(model.apply)({"params": params}, noise, recycled, controls, jnp.ones((B,)), text)
  np.testing.assert_allclose(frames, noise - v, atol=2e-5, rtol=0)


def _grad_wrt_noise(model, params, config, options):
  steps = 4
  first, noise, controls, text = _setup(config, steps)
  tkv = model.apply({"params": params}, text, method=CausalDiT.encode_text)

  def loss(noise):
    frames, _ = rollout(model, params, first, tkv, noise, controls,
                        cache=kv_cache.init_cache(config, B, H, W), options=options)
    return jnp.sum(frames[:, -1] ** 2)  # a loss on the last frame only
  return jax.jit(jax.grad(loss))(noise)


def test_gradient_reaches_first_frame_through_the_cache(tiny_dit):
  model, params, config = tiny_dit
  g = _grad_wrt_noise(model, params, config, RolloutOptions(detach_recycled=True, remat="full"))
  assert float(jnp.abs(g[:, 0]).max()) > 1e-6  # through the KV cache only (recycled is detached)
  g = _grad_wrt_noise(model, params, config, RolloutOptions(detach_recycled=True, detach_cache=True))
  np.testing.assert_array_equal(np.asarray(g[:, :-1]), 0.0)
  assert float(jnp.abs(g[:, -1]).max()) > 1e-6


def test_no_recycling_and_multistep_variants_run(tiny_dit):
  model, params, config = tiny_dit
  first, noise, controls, text = _setup(config, 3)
  tkv = model.apply({"params": params}, text, method=CausalDiT.encode_text)
  cache = kv_cache.init_cache(config, B, H, W)
  a, _ = jax.jit(lambda: rollout(model, params, first, tkv, noise, controls, cache=cache,
                                 options=RolloutOptions(recycle=False)))()
  b, _ = jax.jit(lambda: rollout(model, params, first, tkv, noise, controls, cache=cache))()
  np.testing.assert_allclose(a[:, 0], b[:, 0], atol=1e-6)     # block 0 sees the first frame in both
  assert float(jnp.abs(a[:, 1:] - b[:, 1:]).max()) > 1e-4      # later blocks see zeros instead
  c, _ = jax.jit(lambda: rollout(model, params, first, tkv, noise, controls, cache=cache,
                                 options=RolloutOptions(num_steps=4, shift=3.0, cache_from="clean")))()
  assert c.shape == noise.shape and np.isfinite(np.asarray(c)).all()


def test_matched_sampler_is_teacher_forced_euler_at_one_t(tiny_dit):
  """cache_from="matched": every block is a K-step Euler integration of the whole-clip
  block-causal model with ALL frames at the same t_k (stage 1 trains one t per clip): the frames
  before it (the sampler's own), re-noised to t_k with the sampler's fresh noise, the clean
  previous frames recycled. Cache k holds the keys/values of exactly that clip at t_k (written by
  cached steps, which equal the whole-clip pass: tests/test_dit.py)."""
  model, params, config = tiny_dit
  k_steps, shift, steps = 3, 3.0, config.window + 3  # past the window: ring eviction
  first, noise, controls, text = _setup(config, steps)
  options = RolloutOptions(num_steps=k_steps, shift=shift, cache_from="matched")
  assert options.forward_passes == 2 * k_steps
  tkv = model.apply({"params": params}, text, method=CausalDiT.encode_text)
  caches = empty_cache(config, B, H, W, options)
  assert caches["ring_k"].shape[0] == k_steps and caches["index"].shape == (k_steps,)
  frames, caches = jax.jit(lambda c: rollout(model, params, first, tkv, noise, controls, cache=c, options=options))(caches)
  times = [float(t) for t in shifted_schedule(k_steps, shift)]
  fresh = jnp.stack([matched_noise(noise[:, i:i + 1], k_steps)[:, :, 0] for i in range(steps)], axis=2)  # [K, B, S, ...]
  recycled = jnp.concatenate([first, frames[:, :-1]], axis=1)
  whole = jax.jit(lambda x, t: model.apply({"params": params}, x, recycled, controls, jnp.full((B,), t), text))
  for i in range(steps):
    x = noise[:, i]
    for k in range(k_steps):
      clip = ((1 - times[k]) * frames + times[k] * fresh[k]).at[:, i].set(x)  # frames > i: unseen
      x = x + (times[k + 1] - times[k]) * whole(clip, times[k])[:, i]
    np.testing.assert_allclose(x, frames[:, i], atol=1e-4, rtol=0, err_msg=f"block {i}")

  step = jax.jit(lambda x, r, c, cache, t: model.apply({"params": params}, x, r, c, jnp.full((B,), t), cache, tkv,
                                                       method=CausalDiT.step)[1])
  for k in range(k_steps):
    cache = kv_cache.init_cache(config, B, H, W)
    noised = (1 - times[k]) * frames + times[k] * fresh[k]
    for j in range(steps):
      cache = step(noised[:, j:j + 1], recycled[:, j:j + 1], controls[:, j:j + 1], cache, times[k])
    for name in cache:
      np.testing.assert_allclose(caches[name][k], cache[name], atol=1e-5, rtol=0, err_msg=f"cache {k} {name}")
