"""Control chains: any DiT stage's config on a world with its control encoding.

The argument is `<stage>,<size>` with stage in `STAGES` (pretrain, adapt, distill, adversarial,
long_video); `chain_config` sets the world, the control encoding and the control channels that
follow from it (`apt2_jax.controls.control_channels`). By default the world's unit-scale encoding
(`apt2_jax.controls.default_encoding`): camera "rays" (24 channels), pose "keypoint_maps" (60);
`encoding="raw"` (camera 20, pose 120 channels, not unit scale) only to continue old checkpoints.
"""
import ml_collections

from apt2_jax.configs import adversarial, diffusion

STAGES = {"pretrain": diffusion.pretrain_config, "adapt": diffusion.adapt_config,
          "distill": diffusion.distill_config, "adversarial": adversarial.adversarial_config,
          "long_video": adversarial.long_video_config}


def chain_config(arg: str, world: str, encoding: str = "", control_channels: int = 0) -> ml_collections.ConfigDict:
  """`arg`'s stage config on `world`, its controls in `encoding` ("": the world's default).

  `control_channels`, when given, must be the encoding's (kept for old callers)."""
  stage, _, rest = (arg or "adapt,small").partition(",")
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r} in the config argument; choose one of {tuple(STAGES)}")
  c = STAGES[stage](",".join([rest or "small", f"world={world}"]))
  if encoding:
    from apt2_jax import controls  # imports JAX: only when a config is built
    c.data.control_encoding = encoding
    c.model.control_channels = controls.control_channels(encoding, c.data.control_dim)
  if control_channels and control_channels != c.model.control_channels:
    raise ValueError(f"control_channels={control_channels} does not match encoding "
                     f"{c.data.control_encoding!r} ({c.model.control_channels} channels)")
  return c
