"""Stage 3b: long-video training (AAPT section on long videos).

One long rollout per step, `num_segments` segments of `segment_frames` latent frames; each segment
continues from the previous segment's detached KV cache, D scores it (with `overlap_frames`
generated frames before it as context) against the real video at the same positions, gradients
are accumulated segment by segment (memory independent of the total length). Paper: 60 s in 10 s
segments with 1 s overlap (at 24 fps: 6 segments of 60 latent frames, overlap 6), lr 1e-5.

  python -m apt2_jax.main --config=experiments/stage3_long_video.py:small --workdir=/tmp/s3l_small \\
      --config.vae.checkpoint=/tmp/vae_small --config.init_from=/tmp/s3_small \\
      --config.adversarial.d_init_from=/tmp/s1_small
"""
import ml_collections

from experiments import diffusion_common
from experiments import stage3_adversarial

# size: (segment latent frames, overlap latent frames, segments)
_SEGMENTS = {"tiny": (2, 1, 2), "small": (4, 1, 4), "wan_1_3b": (60, 6, 6), "apt2_8b": (60, 6, 6)}


def get_config(arg: str = "small"):
  size, extra = diffusion_common.parse_arg(arg)
  c = stage3_adversarial.get_config(arg)
  c.stage = "long_video"
  seg, overlap, num = _SEGMENTS[size]
  c.long_video = ml_collections.ConfigDict(dict(
      segment_frames=int(extra.get("segment_frames", seg)), overlap_frames=int(extra.get("overlap_frames", overlap)),
      num_segments=int(extra.get("num_segments", num))))
  c.data.frames = 1 + 4 * c.long_video.segment_frames * c.long_video.num_segments
  lr = {"tiny": 1e-4, "small": 2e-5}.get(size, 1e-5)
  c.optimizer.learning_rate = lr
  c.d_optimizer.learning_rate = lr
  return c
