"""The testbed pipeline: every AAPT stage on the panorama world, in pixels, where a 2-core CPU can
train far enough for the paper's claims to be measured against an exact oracle.

    python -m apt2_jax.main --config=experiments/testbed.py:short --workdir=runs/testbed_short
    python -m apt2_jax.main --config=experiments/testbed.py:full --workdir=runs/testbed_full

The testbed (see `apt2_jax.data.panorama` and `apt2_jax.models.pixel_codec`):
  representation  64x64 RGB video through the lossless space-to-depth codec (VAE size "pixels": 4
                  frames x 8x8 pixels x RGB = 768 channels per latent pixel, 8x8 latent) in place
                  of the VAE, so the oracle frame is reachable exactly: 2x2 patches give 16 tokens
                  per latent frame; no VAE stage
  world           "panorama": a camera panning/tilting inside a procedural sphere; typical motion
                  ~6 px per latent step with bursts to ~35; content outside frame 0 must be
                  generated as the view moves; controls as unit-std ray maps ("rays", 24 channels)
  data            a fresh procedural clip for every example (grain, `num_train = 0`); short clips of
                  `frames` video frames = 10 latent frames > N + 2 = 8 (the window's eviction is
                  trained); long-video rollouts of `segments` latent frames, well past the short clips
  model           DiT width 96, 4 blocks, 2 heads, window N = 6 (the `testbed` model below)
  shift           `sizes.flow_shift(tokens_per_frame)`: 24 x sqrt(16 / 1196) = 2.78 (the paper's 24
                  is for its 736x416 frames, 1196 tokens per latent frame; SD3-style square-root
                  scaling in tokens per frame), for stage 1, the distillation schedule and the
                  baseline's Euler sampler, whose KV cache matches stage 1 ("matched")
  evaluation      `apt2_jax.evaluation.testbed` on two fixed sets (in distribution, unseen appearance),
                  with the claims' criteria fixed in `apt2_jax.evaluation.claims`, after the stage-1
                  learning check (`apt2_jax.evaluation.learning`)

Variants (the argument):
  tiny   the end-to-end test of the chain (a few steps per stage)
  short  `make demo`: stage 1 long enough to learn the world and follow the controls, then the
         distilled and AAPT generators; the claims are reported but need `full` to be meaningful
  full   every stage and ablation trained for the claims, 2 noise seeds x 2 evaluation sets
"""
import ml_collections

from apt2_jax.configs import adversarial, diffusion, sizes
from apt2_jax.configs.sizes import flow_shift  # the one shift rule

ORDER = ("adapt", "distill", "adversarial", "adversarial_teacher_forcing", "adversarial_no_recycle",
         "long_video")

PIXELS = 64
TOKENS_PER_FRAME = sizes.tokens_per_frame(PIXELS, PIXELS)   # latent 8x8, patch 2x2: 16


def model_config(layers: int = 4):
  """The testbed DiT: width 96, 2 heads of 48, FFN 384, window N = 6, 768 latent channels
  (the pixel codec), camera ray maps (24 channels), the built-in caption encoder.

  The head predicts the clean latent (`prediction="x0"`, the velocity follows from it): a token of
  the pixel codec holds 2 x 2 x 768 = 3072 values, 32x the width, and a velocity head would have
  to pass the white noise through that bottleneck (measured: at 750 steps a velocity model's
  x0 estimate at t = 1 was worse than copying the last frame, and its rollouts stayed noise)."""
  return sizes.model_config("toy", latent_channels=768, dim=96, ffn_dim=384, num_heads=2, num_layers=layers,
                            text_dim=64, freq_dim=64, window=6, caption_dim=64, caption_layers=1,
                            control_channels=24, prediction="x0")


# variant: video frames of the short clips, long-video segments (latent frames, overlap, number),
# batch, steps per stage, learning rates, Euler steps of the diffusion baseline, evaluation
_VARIANTS = {
    "tiny": dict(layers=1, frames=9, segments=(2, 1, 2), batch=4, devices=1, checkpoints=1,
                 steps=dict(adapt=2, distill=2, adversarial=2, adversarial_teacher_forcing=1,
                            adversarial_no_recycle=1, long_video=1),
                 lr=1e-3, gan_lr=1e-4, euler_steps=2, worlds=1, seeds=(0,), short_clips=2.0),
    "short": dict(layers=4, frames=37, segments=(10, 2, 3), batch=8,
                  steps=dict(adapt=600, distill=100, adversarial=30, adversarial_teacher_forcing=0,
                             adversarial_no_recycle=0, long_video=0),
                  lr=1e-3, gan_lr=2e-5, euler_steps=8, worlds=2, seeds=(0,), short_clips=8.0),
    "full": dict(layers=4, frames=37, segments=(10, 2, 3), batch=8,
                 steps=dict(adapt=1500, distill=300, adversarial=150, adversarial_teacher_forcing=150,
                            adversarial_no_recycle=150, long_video=50),
                 lr=1e-3, gan_lr=2e-5, euler_steps=8, worlds=4, seeds=(0, 1), short_clips=20.0),
}


def _common(c, v, steps, lr):
  c.model = model_config(v["layers"]) if c.model.recycled_channels else c.model
  c.mesh = sizes.mesh_config(data=-1, fsdp=1)
  c.num_devices = v.get("devices", 0)
  c.batch_size = v["batch"]
  c.num_steps = max(int(steps), 1)
  c.optimizer.learning_rate = lr
  c.optimizer.warmup_steps = min(100, c.num_steps // 10)
  c.flow.shift = flow_shift(TOKENS_PER_FRAME)
  # Fresh procedural clips for every example (no pool to memorise).
  c.data.update(dict(source="pipeline", world="panorama", height=PIXELS, width=PIXELS, frames=v["frames"],
                     control_dim=5, control_encoding="rays", num_train=0, num_validation=0, pre_encode=False))
  c.vae = ml_collections.ConfigDict(dict(size="pixels", checkpoint=""))
  c.log_every = max(1, min(25, c.num_steps // 10))
  c.checkpoint_every = max(1, c.num_steps // v.get("checkpoints", 4))
  c.eval_every = 0
  c.eval_at_end = False  # the pipeline's evaluation scores every model at the end
  c.eval.batch_size = v["batch"]
  c.eval.sample_steps = v["euler_steps"]
  c.eval.sample_shift = flow_shift(TOKENS_PER_FRAME)
  c.eval.guidance = 1.0
  c.ema_decay = 0.0 if v["layers"] == 1 else 0.99
  return c


def get_config(arg: str = "short"):
  variant = arg or "short"
  if variant not in _VARIANTS:
    raise ValueError(f"unknown testbed variant {variant!r}; choose one of {tuple(_VARIANTS)}")
  v = _VARIANTS[variant]
  c = ml_collections.ConfigDict()
  c.stage = "pipeline"
  c.variant = variant
  c.world = "panorama"
  c.world_options = ml_collections.ConfigDict()
  c.height = c.width = PIXELS
  c.order = tuple(name for name in ORDER if v["steps"][name] > 0)

  s = ml_collections.ConfigDict()
  s.adapt = _common(diffusion.adapt_config("small"), v, v["steps"]["adapt"], v["lr"])
  s.adapt.caption_dropout = 0.0  # the baseline samples without guidance here
  s.distill = _common(diffusion.distill_config("small"), v, v["steps"]["distill"], v["lr"] / 3)
  s.distill.distill.shift = flow_shift(TOKENS_PER_FRAME)  # the 32-step schedule of the consistency targets
  for name, extra in (("adversarial", ""), ("adversarial_teacher_forcing", ",variant=teacher_forcing"),
                      ("adversarial_no_recycle", ",recycle=0")):
    g = _common(adversarial.adversarial_config("small" + extra), v, v["steps"][name], v["gan_lr"])
    g.optimizer.learning_rate = g.d_optimizer.learning_rate = v["gan_lr"]
    g.optimizer.warmup_steps = 0
    s[name] = g
  seg, overlap, num = v["segments"]
  lv = _common(adversarial.long_video_config(f"small,segment_frames={seg},overlap_frames={overlap},num_segments={num}"),
               v, v["steps"]["long_video"], v["gan_lr"])
  lv.optimizer.learning_rate = lv.d_optimizer.learning_rate = v["gan_lr"]
  lv.optimizer.warmup_steps = 0
  lv.data.frames = 1 + 4 * seg * num
  lv.adversarial.d_init_key = "d_params"  # continue stage 3's discriminator
  s.long_video = lv
  c.stages = s

  c.chain = ml_collections.ConfigDict(dict(
      distill=dict(init_from="adapt"),
      adversarial=dict(init_from="distill", d_init_from="adapt"),
      adversarial_teacher_forcing=dict(init_from="distill", d_init_from="adapt"),
      adversarial_no_recycle=dict(init_from="distill", d_init_from="adapt"),
      long_video=dict(init_from="adversarial", d_init_from="adversarial")))

  e = ml_collections.ConfigDict()
  e.enabled = True
  e.kind = "testbed"
  e.num_worlds = v["worlds"]
  e.noise_seeds = v["seeds"]
  e.short_clips = v["short_clips"]   # rollout length in short training clips (claim (d): >= 20)
  e.fps = 24
  e.models = ml_collections.ConfigDict({
      "diffusion": dict(workdir="adapt", num_steps=v["euler_steps"], shift=flow_shift(TOKENS_PER_FRAME),
                        cache_from="matched"),
      "distilled": dict(workdir="distill"),
      "aapt": dict(workdir="long_video"),
      "aapt_short": dict(workdir="adversarial"),
      "teacher_forcing": dict(workdir="adversarial_teacher_forcing"),
      "no_recycle": dict(workdir="adversarial_no_recycle", recycle=False),
  })
  c.evaluation = e
  return c
