"""Models: the causal DiT (generator and discriminator backbone), its KV cache, the VAE."""
from apt2_jax.models import kv_cache, rope, vae
from apt2_jax.models.discriminator import Discriminator
from apt2_jax.models.dit import CausalDiT, DiTConfig, count_params, init_params
from apt2_jax.models.vae import VAE, VAEConfig, vae_config

__all__ = ["CausalDiT", "DiTConfig", "Discriminator", "VAE", "VAEConfig", "count_params", "init_params",
           "kv_cache", "rope", "vae", "vae_config"]
