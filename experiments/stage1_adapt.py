"""Stage 1: diffusion adaptation with teacher forcing (block-causal, recycled clean frames).

Paper values (`wan_1_3b`, `apt2_8b`): AdamW lr 1e-5, weight decay 0.01, shift s = 24, one t per
clip. Toy sizes (`tiny`, `small`) use a larger learning rate. Starting from a stage-0 (or Wan2.1)
checkpoint without recycled/control channels widens the patch embedding; the new channels are
randomly initialised, as the paper does. Fields: `apt2_jax/configs/diffusion.py`.

  python -m apt2_jax.main --config=experiments/stage1_adapt.py:small --workdir=/tmp/s1_small \\
      --config.vae.checkpoint=/tmp/vae_small --config.init_from=/tmp/s0_small
  # No dataset, no VAE (random latents):
  python -m apt2_jax.main --config=experiments/stage1_adapt.py:tiny --workdir=/tmp/s1_tiny \\
      --config.data.source=random_latents
"""
from apt2_jax.configs import diffusion


def get_config(arg: str = "small"):
  return diffusion.adapt_config(arg)
