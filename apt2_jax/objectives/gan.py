"""Adversarial losses of AAPT: relativistic pairing and the approximated R1/R2 penalties.

All functions take per-frame logits `[B, F]` (one per generated latent frame) and pair real and fake
per sample and per frame, as in the paper (R3GAN form):

    L_D = softplus(D(fake) - D(real))        L_G = softplus(D(real) - D(fake))

The non-saturating loss is an option for ablations. The approximated R1 (on real) and R2 (on fake)
replace the gradient penalty, which would need a double backward through D, by a finite
difference: `lambda * ||D(x) - D(x + sigma * n)||^2` with `n ~ N(0, I)`; since
`E_n[(grad D . n)^2] = ||grad D||^2`, it approximates `lambda * sigma^2 * ||grad D||^2`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("relativistic", "non_saturating")


def discriminator_loss(real_logits, fake_logits, loss_type: str = "relativistic"):
  """Mean D loss over samples and frames; logits [B, F] float32."""
  if loss_type == "relativistic":
    return jnp.mean(jax.nn.softplus(fake_logits - real_logits))
  if loss_type == "non_saturating":
    return jnp.mean(jax.nn.softplus(-real_logits) + jax.nn.softplus(fake_logits))
  raise ValueError(f"gan loss_type={loss_type!r} is not one of {LOSS_TYPES}")


def generator_loss(real_logits, fake_logits, loss_type: str = "relativistic"):
  """Mean G loss; gradients flow through `fake_logits` (real logits are constants to G)."""
  if loss_type == "relativistic":
    return jnp.mean(jax.nn.softplus(real_logits - fake_logits))
  if loss_type == "non_saturating":
    return jnp.mean(jax.nn.softplus(-fake_logits))
  raise ValueError(f"gan loss_type={loss_type!r} is not one of {LOSS_TYPES}")


def perturbation_std(sigma: float, sigma_is_variance: bool = False) -> float:
  """sigma is a standard deviation (default, 0.1 in the paper) or, optionally, a variance."""
  return float(sigma) ** 0.5 if sigma_is_variance else float(sigma)


def approx_penalty(logits, perturbed_logits, weight: float):
  """`weight * (D(x) - D(x + sigma n))^2` averaged over samples and frames (each frame's logit is
  its own discriminator output, so the penalty does not grow with the clip length).
  logits, perturbed_logits: [B, F]."""
  return weight * jnp.mean(jnp.square(perturbed_logits - logits))


def realism_gap(real_logits, fake_logits):
  """Mean D(real) - D(fake): how well D separates them (-> 0 as G catches up)."""
  return jnp.mean(real_logits - fake_logits)
