"""Stage 0: bidirectional video diffusion (rectified flow) from scratch, full attention.

For users without a pretrained video model, and for the toy pipeline. The model is the same DiT
with plain input `[noise | control]` (`model.recycled_channels=False`), mode "full". Fields:
`apt2_jax/configs/diffusion.py`; sizes: `apt2_jax/configs/sizes.py`.

  python -m apt2_jax.main --config=experiments/stage0_pretrain.py:small --workdir=/tmp/s0_small \\
      --config.vae.checkpoint=/tmp/vae_small
  # No dataset, no VAE (random latents):
  python -m apt2_jax.main --config=experiments/stage0_pretrain.py:tiny --workdir=/tmp/s0_tiny \\
      --config.data.source=random_latents
  # Another world: --config=experiments/stage0_pretrain.py:small,world=puppet
"""
from apt2_jax.configs import diffusion


def get_config(arg: str = "small"):
  return diffusion.pretrain_config(arg)
