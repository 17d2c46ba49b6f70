"""Models: the causal DiT (generator and discriminator backbone), its KV cache, the VAE."""
from apt2_jax.models import kv_cache, rope
from apt2_jax.models.dit import CausalDiT, DiTConfig, count_params, init_params

__all__ = ["CausalDiT", "DiTConfig", "count_params", "init_params", "kv_cache", "rope"]
