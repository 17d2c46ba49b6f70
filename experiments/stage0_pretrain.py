"""Stage 0: bidirectional video diffusion (rectified flow) from scratch, full attention.

For users without a pretrained video model, and for the toy pipeline. The model is the same DiT
with plain input `[noise | control]` (`model.recycled_channels=False`), mode "full".

  python -m apt2_jax.main --config=experiments/stage0_pretrain.py:small --workdir=/tmp/s0_small \\
      --config.vae.checkpoint=/tmp/vae_small
  # No dataset, no VAE (random latents):
  python -m apt2_jax.main --config=experiments/stage0_pretrain.py:tiny --workdir=/tmp/s0_tiny \\
      --config.data.source=random_latents
  # Another world: --config=experiments/stage0_pretrain.py:small,world=puppet
"""
from experiments import diffusion_common


def get_config(arg: str = "small"):
  size, extra = diffusion_common.parse_arg(arg)
  c = diffusion_common.base_config("pretrain", size, extra.get("world", "camera"))
  c.model.recycled_channels = False
  c.eval.sample_steps = 0  # streamed sampling needs the block-causal model (stage 1)
  return c
