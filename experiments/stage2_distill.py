"""Stage 2: consistency distillation to one step (1 NFE), teacher forced.

The 32-step schedule shifted with s = 24, no CFG, no EMA target; the generator and the frozen
teacher both start from the stage-1 workdir given as `init_from` (required).

  python -m apt2_jax.main --config=experiments/stage2_distill.py:small --workdir=/tmp/s2_small \\
      --config.vae.checkpoint=/tmp/vae_small --config.init_from=/tmp/s1_small
"""
import ml_collections

from experiments import diffusion_common


def get_config(arg: str = "small"):
  size, extra = diffusion_common.parse_arg(arg)
  c = diffusion_common.base_config("distill", size, extra.get("world", "camera"))
  c.caption_dropout = 0.0  # no CFG in distillation
  c.optimizer.learning_rate = {"tiny": 1e-3, "small": 1e-4}.get(size, 1e-5)
  c.distill = ml_collections.ConfigDict(dict(num_steps=32, shift=24.0, teacher="", teacher_key="ema_params"))
  c.eval.sample_steps = 1
  return c
