"""Stage 3b: long-video training (AAPT section on long videos).

One long rollout per step, `num_segments` segments of `segment_frames` latent frames; each segment
continues from the previous segment's detached KV cache, D scores it (with `overlap_frames`
generated frames before it as context) against unpaired real short clips (no long real video is
needed: the rollout takes only a real first frame, its prompt and a control trajectory; even batch
rows condition the rollouts, odd rows are the real clips, `apt2_jax/stages/long_video.py`),
gradients are accumulated segment by segment (memory independent of the total length). Paper: 60 s in 10 s
segments with 1 s overlap (at 24 fps: 6 segments of 60 latent frames, overlap 6), lr 1e-5. The
segments can be set in the argument: `small,segment_frames=4,overlap_frames=1,num_segments=4`.

  python -m apt2_jax.main --config=experiments/stage3_long_video.py:small --workdir=/tmp/s3l_small \\
      --config.vae.checkpoint=/tmp/vae_small --config.init_from=/tmp/s3_small \\
      --config.adversarial.d_init_from=/tmp/s1_small
"""
from apt2_jax.configs import adversarial


def get_config(arg: str = "small"):
  return adversarial.long_video_config(arg)
