"""Camera control: the stage-0 to stage-3 chain on the camera world with ray-map controls.

Camera motion is given per video frame relative to the previous frame (pan, tilt, zoom, forward,
roll) and enters the model as per-pixel ray origin and direction maps at latent resolution
(`apt2_jax.controls.camera_ray_maps`, unit std), 4 video frames x 6 channels per latent
frame. Starting from a checkpoint without these channels (e.g. Wan2.1, or a text/image-to-video
stage 1) widens the patch embedding with randomly initialised weights for them, as the paper does.
Long-video training renders fresh random trajectories over the whole long video. Built by
`apt2_jax/configs/control.py` on the stage builders.

The argument is `<stage>,<size>` with stage in pretrain, adapt, distill, adversarial, long_video:

  python -m apt2_jax.main --config=experiments/camera_control.py:adapt,small --workdir=/tmp/cam_s1 \\
      --config.vae.checkpoint=/tmp/vae_small --config.init_from=/tmp/s0_small
  python -m apt2_jax.main --config=experiments/camera_control.py:distill,small --workdir=/tmp/cam_s2 \\
      --config.vae.checkpoint=/tmp/vae_small --config.init_from=/tmp/cam_s1
  python -m apt2_jax.main --config=experiments/camera_control.py:adversarial,small --workdir=/tmp/cam_s3 \\
      --config.vae.checkpoint=/tmp/vae_small --config.init_from=/tmp/cam_s2 \\
      --config.adversarial.d_init_from=/tmp/cam_s1
"""
from apt2_jax.configs import control


def get_config(arg: str = "adapt,small"):
  return control.chain_config(arg, world="camera", encoding="rays", control_channels=4 * 6)
