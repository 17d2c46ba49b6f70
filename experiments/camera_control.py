"""Camera control: the stage-0 to stage-3 chain on the camera world with ray-map controls.

Camera motion is given per video frame relative to the previous frame (pan, tilt, zoom, forward,
roll) and enters the model as per-pixel ray origin and direction maps at latent resolution
(`apt2_jax.models.conditioning.camera_ray_maps`, unit std), 4 video frames x 6 channels per latent
frame. Starting from a checkpoint without these channels (e.g. Wan2.1, or a text/image-to-video
stage 1) widens the patch embedding with randomly initialised weights for them, as the paper does.
Long-video training renders fresh random trajectories over the whole long video.

The argument is `<stage>,<size>` with stage in pretrain, adapt, distill, adversarial, long_video:

  python -m apt2_jax.main --config=experiments/camera_control.py:adapt,small --workdir=/tmp/cam_s1 \\
      --config.vae.checkpoint=/tmp/vae_small --config.init_from=/tmp/s0_small
  python -m apt2_jax.main --config=experiments/camera_control.py:distill,small --workdir=/tmp/cam_s2 \\
      --config.vae.checkpoint=/tmp/vae_small --config.init_from=/tmp/cam_s1
  python -m apt2_jax.main --config=experiments/camera_control.py:adversarial,small --workdir=/tmp/cam_s3 \\
      --config.vae.checkpoint=/tmp/vae_small --config.init_from=/tmp/cam_s2 \\
      --config.adversarial.d_init_from=/tmp/cam_s1
"""
from experiments import stage0_pretrain, stage1_adapt, stage2_distill, stage3_adversarial, stage3_long_video

STAGES = {"pretrain": stage0_pretrain, "adapt": stage1_adapt, "distill": stage2_distill,
          "adversarial": stage3_adversarial, "long_video": stage3_long_video}


def chain_config(arg: str, world: str, encoding: str, control_channels: int):
  stage, _, rest = (arg or "adapt,small").partition(",")
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r} in the config argument; choose one of {tuple(STAGES)}")
  c = STAGES[stage].get_config(",".join([rest or "small", f"world={world}"]))
  c.data.world = world
  c.data.control_encoding = encoding
  c.model.control_channels = control_channels
  return c


def get_config(arg: str = "adapt,small"):
  return chain_config(arg, "camera", "rays", 24)
