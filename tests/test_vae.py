"""Causal VAE: streamed decode == whole-clip decode, chunked encode == whole-clip encode."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt2_jax.models import vae as vae_lib

# Tests compile many small programs: XLA's backend optimisations cost more than they save here.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module")
def tiny():
  model = vae_lib.VAE(vae_lib.vae_config("tiny"))
  params = vae_lib.init_params(model, jax.random.key(0), 16, 16)
  return model, params


@pytest.fixture(scope="module")
def decode(tiny):
  """Whole-clip decode, unclipped, jitted once for the module's tests."""
  model, _ = tiny
  return jax.jit(lambda p, z: model.apply(p, z, clip=False, method=vae_lib.VAE.decode),
                 compiler_options=FAST_COMPILE)


def test_configs():
  wan = vae_lib.vae_config("wan")
  assert (wan.base_dim, wan.z_dim, wan.dim_mult, wan.num_res_blocks) == (96, 16, (1, 2, 4, 4), 2)
  assert wan.temperal_upsample == (True, True, False)
  slim = vae_lib.vae_config("slim_decoder")
  assert slim.dec_base_dim * np.array(slim.dec_dim_mult) == pytest.approx([64, 128, 256, 512])
  assert slim.dec_num_res_blocks + 1 == 2  # residual blocks per decoder scale
  with pytest.raises(ValueError, match="latents_mean"):
    vae_lib.vae_config("tiny", latents_mean=(0.0,))
  assert [vae_lib.latent_frames(t) for t in (1, 5, 9)] == [1, 2, 3]
  with pytest.raises(ValueError):
    vae_lib.latent_frames(4)


def test_streamed_decode_equals_whole_clip_decode(tiny, decode):
  model, params = tiny
  z = jax.random.normal(jax.random.key(1), (2, 4, 2, 2, 4))
  whole = jnp.clip(decode(params, z), -1.0, 1.0)
  assert whole.shape == (2, 13, 16, 16, 3)

  cache = vae_lib.init_decode_cache(model, batch=2, height=2, width=2)
  # Other tests in this process may have compiled decode_step for other shapes: count ours.
  compiled_before = vae_lib.decode_step._cache_size()
  frames = []
  for i in range(z.shape[1]):
    out, cache = vae_lib.decode_step(model, params, cache, z[:, i:i + 1], i == 0)
    assert out.shape == (2, 1 if i == 0 else 4, 16, 16, 3)
    frames.append(out)
  streamed = jnp.concatenate(frames, axis=1)
  np.testing.assert_allclose(streamed, whole, atol=1e-5)
  assert float(jnp.abs(whole).max()) > 1e-2  # not a trivially zero decode
  # At most one compilation per variant (first frame, later frames), and streaming more frames
  # compiles nothing new.
  compiled = vae_lib.decode_step._cache_size()
  assert compiled - compiled_before <= 2
  for i in range(2):
    _, cache = vae_lib.decode_step(model, params, cache, z[:, i:i + 1], False)
  assert vae_lib.decode_step._cache_size() == compiled
  # The cache is fixed-shape: what comes back has the zeros' structure and shapes.
  zeros = vae_lib.init_decode_cache(model, batch=2, height=2, width=2)
  assert jax.tree.map(jnp.shape, cache) == jax.tree.map(jnp.shape, zeros)


def test_decode_is_causal(tiny, decode):
  """Changing latent frame 2 leaves the video frames before it untouched."""
  _, params = tiny
  z = jax.random.normal(jax.random.key(2), (2, 4, 2, 2, 4))
  a, b = decode(params, z), decode(params, z.at[:, 2].add(1.0))
  np.testing.assert_array_equal(a[:, :5], b[:, :5])
  assert float(jnp.abs(a[:, 5:9] - b[:, 5:9]).max()) > 1e-3


def test_chunked_encode_equals_whole_clip_encode(tiny):
  model, params = tiny
  video = jax.random.uniform(jax.random.key(3), (1, 9, 16, 16, 3), minval=-1, maxval=1)
  mean, logvar = jax.jit(lambda p, v: model.apply(p, v, method=vae_lib.VAE.encode),
                         compiler_options=FAST_COMPILE)(params, video)
  assert mean.shape == logvar.shape == (1, 3, 2, 2, 4)
  encode_chunked = jax.jit(vae_lib.encode_chunked.__wrapped__, static_argnames="model",
                           compiler_options=FAST_COMPILE)
  mean_c, logvar_c = encode_chunked(model, params, video)
  np.testing.assert_allclose(mean_c, mean, atol=1e-5)
  np.testing.assert_allclose(logvar_c, logvar, atol=1e-5)
  # Causal: changing video frames 5.. leaves latent frames 0 and 1 untouched.
  mean_c2, _ = encode_chunked(model, params, video.at[:, 5:].set(0.0))
  np.testing.assert_array_equal(mean_c2[:, :2], mean_c[:, :2])
  assert float(jnp.abs(mean_c2[:, 2] - mean_c[:, 2]).max()) > 1e-4


def test_latent_normalisation_and_kl():
  cfg = vae_lib.vae_config("wan")
  z = jax.random.normal(jax.random.key(4), (1, 2, 2, 2, 16)) * 3.0
  n = vae_lib.normalize_latents(z, cfg)
  np.testing.assert_allclose(n[..., 0], (z[..., 0] + 0.7571) / 2.8184, rtol=1e-6)
  np.testing.assert_allclose(vae_lib.denormalize_latents(n, cfg), z, atol=1e-5)
  zero = jnp.zeros((2, 1, 2, 2, 4))
  np.testing.assert_allclose(vae_lib.kl_divergence(zero, zero), [0.0, 0.0])
  # KL(N(1, 1) || N(0, 1)) = 0.5 per element.
  np.testing.assert_allclose(vae_lib.kl_divergence(zero + 1.0, zero), [8.0, 8.0])
