"""Stage 2: consistency distillation to one step (1 NFE), teacher forced.

The 32-step schedule shifted with s = 24, no CFG, no EMA target; the generator and the frozen
teacher both start from the stage-1 workdir given as `init_from` (required). Fields:
`apt2_jax/configs/diffusion.py`.

  python -m apt2_jax.main --config=experiments/stage2_distill.py:small --workdir=/tmp/s2_small \\
      --config.vae.checkpoint=/tmp/vae_small --config.init_from=/tmp/s1_small
"""
from apt2_jax.configs import diffusion


def get_config(arg: str = "small"):
  return diffusion.distill_config(arg)
