"""Pose control: the stage-0 to stage-3 chain on the puppet world (a virtual-human stand-in).

The control of each video frame is the puppet's 15 keypoints (x, y in [0, 1]); they enter the
model at unit scale as one Gaussian map per keypoint per video frame (`apt2_jax.controls`
"keypoint_maps"): 4 x 15 = 60 per-pixel channels per latent frame. New control channels are
randomly initialised when starting from a checkpoint without them. Argument: `<stage>,<size>`.
Built by `apt2_jax/configs/control.py` on the stage builders.

  python -m apt2_jax.main --config=experiments/pose_control.py:adapt,small --workdir=/tmp/pose_s1 \\
      --config.vae.checkpoint=/tmp/vae_small --config.init_from=/tmp/s0_puppet
"""
from apt2_jax.configs import control


def get_config(arg: str = "adapt,small"):
  return control.chain_config(arg, world="puppet", encoding="keypoint_maps")
