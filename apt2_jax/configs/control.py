"""Control chains: any DiT stage's config on a world with its control encoding.

The argument is `<stage>,<size>` with stage in `STAGES` (pretrain, adapt, distill, adversarial,
long_video); `chain_config` sets the world, the control encoding and the widened control channels.
"""
import ml_collections

from apt2_jax.configs import adversarial, diffusion

STAGES = {"pretrain": diffusion.pretrain_config, "adapt": diffusion.adapt_config,
          "distill": diffusion.distill_config, "adversarial": adversarial.adversarial_config,
          "long_video": adversarial.long_video_config}


def chain_config(arg: str, world: str, encoding: str, control_channels: int) -> ml_collections.ConfigDict:
  stage, _, rest = (arg or "adapt,small").partition(",")
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r} in the config argument; choose one of {tuple(STAGES)}")
  c = STAGES[stage](",".join([rest or "small", f"world={world}"]))
  c.data.world = world
  c.data.control_encoding = encoding
  c.model.control_channels = control_channels
  return c
