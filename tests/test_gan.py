"""Discriminator and adversarial losses: formulas on known logits, approximated R1, shapes."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt2_jax.configs import sizes
from apt2_jax.models import DiTConfig
from apt2_jax.models.discriminator import (Discriminator, default_head_layers, from_generator,
                                            init_discriminator_params, noise_judged)
from apt2_jax.objectives import gan

softplus = lambda x: math.log1p(math.exp(x))


def test_relativistic_and_non_saturating_losses_on_known_logits():
  real = jnp.array([[1.0, 2.0]])
  fake = jnp.array([[0.0, 3.0]])
  d = gan.discriminator_loss(real, fake)
  g = gan.generator_loss(real, fake)
  np.testing.assert_allclose(d, (softplus(-1.0) + softplus(1.0)) / 2, rtol=1e-6)
  np.testing.assert_allclose(g, (softplus(1.0) + softplus(-1.0)) / 2, rtol=1e-6)
  # Pairing is per frame: swapping fake frames changes the loss.
  assert abs(float(gan.discriminator_loss(real, fake[:, ::-1])) - float(d)) > 1e-3
  d_ns = gan.discriminator_loss(real, fake, "non_saturating")
  np.testing.assert_allclose(d_ns, (softplus(-1) + softplus(0) + softplus(-2) + softplus(3)) / 2, rtol=1e-6)
  np.testing.assert_allclose(gan.generator_loss(real, fake, "non_saturating"),
                             (softplus(0) + softplus(-3)) / 2, rtol=1e-6)
  np.testing.assert_allclose(gan.realism_gap(real, fake), 0.0, atol=1e-7)
  np.testing.assert_allclose(gan.approx_penalty(real, fake, 1000.0), 1000.0 * (1 + 1) / 2)
  with pytest.raises(ValueError, match="loss_type"):
    gan.discriminator_loss(real, fake, "hinge-ish")
  assert gan.perturbation_std(0.01, sigma_is_variance=True) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def tiny_d():
  config = DiTConfig.from_dict(sizes.model_config("tiny", num_layers=2, control_channels=0,
                                                   caption_vocab_size=0))
  disc = Discriminator(config, head_layers=(1, 2))
  params = init_discriminator_params(disc, jax.random.key(0))
  return disc, params, config


def test_discriminator_gives_one_logit_per_frame(tiny_d):
  disc, params, config = tiny_d
  b, f = 2, 5
  x = jax.random.normal(jax.random.key(1), (b, f, 4, 4, config.latent_channels))
  text = jnp.zeros((b, 3, config.text_dim))
  logits = jax.jit(disc.apply)({"params": params}, x, x, None, jnp.full((b,), 0.5), text)
  assert logits.shape == (b, f) and logits.dtype == jnp.float32
  assert default_head_layers(36) == (16, 26, 36)
  # D starts from a generator: its backbone takes the generator's parameters.
  merged = from_generator(params, jax.tree.map(lambda a: a + 1.0, params["backbone"]))
  np.testing.assert_allclose(merged["backbone"]["proj_out"]["bias"], params["backbone"]["proj_out"]["bias"] + 1)
  with pytest.raises(ValueError, match="do not match"):
    from_generator(params, {"other": params["backbone"]["proj_out"]})


def test_approx_r1_matches_sigma2_grad_norm(tiny_d):
  """E_n mean_f (D(x + sigma n) - D(x))^2  ~=  sigma^2 mean_f ||d D_f / d x||^2 for small sigma."""
  disc, params, config = tiny_d
  f, sigma, samples = 3, 1e-3, 256
  x = jax.random.normal(jax.random.key(2), (1, f, 4, 4, config.latent_channels))
  recycled = jax.random.normal(jax.random.key(3), x.shape)
  text = jnp.zeros((1, 3, config.text_dim))
  t = jnp.full((1,), 0.3)
  d = lambda judged: disc.apply({"params": params}, judged, recycled, None, t, text)[0]  # [F]
  jac = jax.jit(jax.jacrev(d))(x)                                   # [F, 1, f, h, w, C]
  expected = sigma ** 2 * float(jnp.mean(jnp.sum(jac.reshape(f, -1) ** 2, axis=-1)))

  @jax.jit
  def penalty(key):
    n = jax.random.normal(key, (samples,) + x.shape[1:])
    xs = jnp.broadcast_to(x, n.shape)
    apply = lambda j: disc.apply({"params": params}, j, jnp.broadcast_to(recycled, n.shape), None,
                                 jnp.full((samples,), 0.3), jnp.broadcast_to(text, (samples,) + text.shape[1:]))
    return gan.approx_penalty(apply(xs), apply(xs + sigma * n), 1.0)
  measured = float(penalty(jax.random.key(4)))
  assert expected > 0
  np.testing.assert_allclose(measured, expected, rtol=0.15)


def test_noise_judged_interpolates():
  x, eps = jnp.ones((2, 3, 1, 1, 1)), jnp.zeros((2, 3, 1, 1, 1))
  out = noise_judged(x, jnp.array([0.0, 1.0]), eps)
  np.testing.assert_allclose(out[0], 1.0)
  np.testing.assert_allclose(out[1], 0.0)
