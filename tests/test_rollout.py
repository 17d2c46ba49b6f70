"""The scan rollout: equals the whole-clip pass on its own outputs; gradients through the cache."""
import jax
import jax.numpy as jnp
import numpy as np

from apt2_jax.models import CausalDiT, kv_cache
from apt2_jax.rollout import RolloutOptions, rollout

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
