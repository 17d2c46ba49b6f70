"""The testbed pipeline: every AAPT stage on the panorama world, in pixels, where a 2-core CPU can
train far enough for the paper's claims to be measured against an exact oracle.

    python -m apt2_jax.main --config=experiments/testbed.py:short --workdir=runs/testbed_short
    python -m apt2_jax.main --config=experiments/testbed.py:full --workdir=runs/testbed_full

The testbed (see `apt2_jax.data.panorama` and `apt2_jax.models.pixel_codec`):
  representation  64x64 RGB video through the PCA codec (VAE size "pixels_pca"): every 8x8 pixel
                  block of 4 frames (768 values) projected on the panorama world's top 32 principal
                  components (held-out ceiling 31.5 dB; a fixed linear "VAE", 8x space, 4x time, 32
                  channels), unit-variance latents, 8x8 latent, patch 1x1: 64 tokens per latent
                  frame of 32 values, so a token's input ([noise | recycled | control] = 32 + 32 +
                  24 values) fits the width (96) without loss, as in the paper's models (Wan: 64
                  values per token, width >= 1536). The lossless codec ("pixels", 768 values per
                  latent pixel, 3072 per 2x2 token, 32x the width) was measured first: at 600
                  stage-1 steps its t = 1 prediction could not even reproduce the recycled frame
                  (token-mean mush), since the embedding must mix the noise slot and the recycled
                  frame in 96 dims. No VAE stage; the evaluation's references pass through the codec.
  world           "panorama": a camera panning/tilting inside a procedural sphere; typical motion
                  ~6 px per latent step with bursts to ~35; content outside frame 0 must be
                  generated as the view moves; controls as unit-std ray maps ("rays", 24 channels)
  data            a fresh procedural clip for every example (grain, `num_train = 0`); short clips of
                  `frames` video frames = 10 latent frames > N + 2 = 8 (the window's eviction is
                  trained); long-video rollouts of `segments` latent frames, well past the short clips
  model           DiT width 96, 4 blocks, 2 heads, window N = 6 (the `testbed` model below)
  shift           `sizes.flow_shift(tokens_per_frame)`: 24 x sqrt(64 / 1196) = 5.55 (the paper's 24
                  is for its 736x416 frames, 1196 tokens per latent frame; SD3-style square-root
                  scaling in tokens per frame), for stage 1, the distillation schedule and the
                  baseline's Euler sampler, whose KV cache matches stage 1 ("matched")
  loss            stage 1: the clean-latent MSE (`flow.weight_t = 1`); the plain velocity MSE of the
                  x0 head weighs a clip at t = 0.05 400x one at t = 1, and the high-t regime (where
                  the next frame must come from the context and the controls) is starved
  evaluation      `apt2_jax.evaluation.testbed` on two fixed sets (in distribution, unseen appearance),
                  with the claims' criteria fixed in `apt2_jax.evaluation.claims`, after the stage-1
                  learning check (`apt2_jax.evaluation.learning`)

Variants (the argument):
  tiny   the end-to-end test of the chain (a few steps per stage)
  short  `make demo` (~20 min on 2 CPU cores): stage 1 (1300 steps at batch 4, where its rollout
         starts to follow the controls), the distilled and the AAPT generators and the evaluation;
         the claims are reported but need `full` to be meaningful
  full   every stage and ablation trained for the claims, 2 noise seeds x 2 evaluation sets
         (~1.5 h of training on 2 CPU cores, sized from the measured per-step costs)
"""
import ml_collections

from apt2_jax.configs import adversarial, diffusion, sizes
from apt2_jax.configs.sizes import flow_shift  # the one shift rule
from apt2_jax.evaluation import gates


PIXELS = 64
PATCH = (1, 1, 1)
CODEC = "pixels_pca_torus"
WORLD = "torus"
LATENT_CHANNELS = 32                                                # pixel_codec.PCA_RANK
TOKENS_PER_FRAME = sizes.tokens_per_frame(PIXELS, PIXELS, PATCH)   # latent 8x8, patch 1x1: 64


def model_config(layers: int = 4):
  """The testbed DiT: width 96, 2 heads of 48, FFN 384, window N = 6, 32 latent channels (the PCA
  codec), patch 1x1, camera ray maps (24 channels), the built-in caption encoder.

  The head predicts the clean latent (`prediction="x0"`, the velocity follows from it; measured
  with the lossless codec, where a velocity head had to pass 3072 values of white noise per token
  through the width: at 750 steps its x0 estimate at t = 1 was worse than copying the last frame)."""
  return sizes.model_config("toy", latent_channels=LATENT_CHANNELS, dim=128, ffn_dim=512, num_heads=4,
                            num_layers=layers, text_dim=64, freq_dim=64, window=6, caption_dim=64, caption_layers=1,
                            control_channels=24, prediction="x0", patch_size=PATCH,
                            scan_unroll=layers)


# variant: video frames of the short clips, long-video segments (latent frames, overlap, number),
# batch, steps per stage, learning rates, Euler steps of the diffusion baseline, evaluation worlds,
# noise seeds and rollout seconds. Stages after stage 1 that a variant gives 0 steps are left out.
_STAGE_STEPS = ("adapt", "distill", "adversarial", "adversarial_teacher_forcing", "distill_control", "long_video",
                "adapt_no_recycle", "distill_no_recycle", "adversarial_no_recycle", "distill_seed1",
                "adversarial_seed1")
_VARIANTS = {
    "tiny": dict(layers=1, frames=9, segments=(2, 1, 2), batch=4, devices=1, checkpoints=1,
                 steps=dict(adapt=2, distill=2, adversarial=2, adversarial_teacher_forcing=1, distill_control=1,
                            long_video=1),
                 lr=1e-3, gan_lr=1e-4, euler_steps=2, worlds=1, seeds=(0,), seconds=2.0),
    # `make demo`, ~20 min on 2 CPU cores with the install.
    "short": dict(layers=4, frames=37, segments=(10, 2, 3), batch=4,
                  steps=dict(adapt=1000, distill=60, adversarial=30),
                  lr=1e-3, gan_lr=5e-5, euler_steps=8, worlds=2, seeds=(0,), seconds=8.0),
    # Every stage, ablation and control the claims need (issue: "AAPT's effect, shown"): stage 1 to
    # Gate 1, distillation, AAPT and the teacher-forced adversarial ablation at 300 G updates each, the
    # distilled model continued for AAPT's wall time (the compute-matched control), the no-recycling
    # chain trained without recycling from stage 1 on, a second training seed from distillation on,
    # long video from AAPT; 16 worlds x 2 paired noise seeds, 20-s rollouts. Several hours on 2 cores.
    "full": dict(layers=4, frames=37, segments=(10, 2, 3), batch=4, checkpoints=10,
                 steps=dict(adapt=5000, distill=300, adversarial=300, adversarial_teacher_forcing=300,
                            distill_control=-1, long_video=60, adapt_no_recycle=5000, distill_no_recycle=300,
                            adversarial_no_recycle=300, distill_seed1=300, adversarial_seed1=300),
                 lr=1e-3, gan_lr=5e-5, euler_steps=8, worlds=16, seeds=(0, 1), seconds=20.0),
}
# Where each stage's weights come from (`pipeline.stage_configs`); "match_wall_time": the stage runs
# as many steps as fit in that stage's measured training time (the compute-matched control).
_CHAIN = dict(
    distill=dict(init_from="adapt"),
    adversarial=dict(init_from="distill", d_init_from="adapt"),
    adversarial_teacher_forcing=dict(init_from="distill", d_init_from="adapt"),
    distill_control=dict(init_from="distill", teacher_from="adapt", match_wall_time="adversarial"),
    long_video=dict(init_from="adversarial", d_init_from="adversarial"),
    distill_no_recycle=dict(init_from="adapt_no_recycle"),
    adversarial_no_recycle=dict(init_from="distill_no_recycle", d_init_from="adapt"),
    distill_seed1=dict(init_from="adapt"),
    adversarial_seed1=dict(init_from="distill_seed1", d_init_from="adapt"))


def ema_decay(steps: int) -> float:
  """The EMA of a stage of `steps` updates: horizon 1 / (1 - decay) a tenth of them, the longest
  `gates.ema_allowed` lets a verdict use (none under 100 steps)."""
  return 0.0 if steps < 100 else 1.0 - 10.0 / steps


def _common(c, v, steps, lr):
  c.model = model_config(v["layers"]) if c.model.recycled_channels else c.model
  c.mesh = sizes.mesh_config(data=-1, fsdp=1)
  c.num_devices = v.get("devices", 0)
  c.batch_size = v["batch"]
  c.num_steps = max(int(steps), 1)
  c.optimizer.learning_rate = lr
  c.optimizer.warmup_steps = min(100, c.num_steps // 10)
  c.flow.shift = flow_shift(TOKENS_PER_FRAME)
  if "weight_t" in c.flow:
    c.flow.weight_t = 1.0   # stage 1: the clean-latent MSE (module docstring)
  # Fresh procedural clips for every example (no pool to memorise).
  c.data.update(dict(source="pipeline", world=WORLD, height=PIXELS, width=PIXELS, frames=v["frames"],
                     control_dim=5, control_encoding="rays", num_train=0, num_validation=0, pre_encode=False))
  c.vae = ml_collections.ConfigDict(dict(size=CODEC, checkpoint=""))
  c.log_every = max(1, min(25, c.num_steps // 10))
  c.checkpoint_every = max(1, c.num_steps // v.get("checkpoints", 4))
  c.eval_every = 0
  c.eval_at_end = False  # the pipeline's evaluation scores every model at the end
  c.eval.batch_size = v["batch"]
  c.eval.sample_steps = v["euler_steps"]
  c.eval.sample_shift = flow_shift(TOKENS_PER_FRAME)
  c.eval.guidance = 1.0
  c.ema_decay = ema_decay(c.num_steps) if v["layers"] > 1 else 0.0
  return c


def get_config(arg: str = "short"):
  variant = arg or "short"
  if variant not in _VARIANTS:
    raise ValueError(f"unknown testbed variant {variant!r}; choose one of {tuple(_VARIANTS)}")
  v = _VARIANTS[variant]
  c = ml_collections.ConfigDict()
  c.stage = "pipeline"
  c.variant = variant
  c.world = WORLD
  c.world_options = ml_collections.ConfigDict()
  c.height = c.width = PIXELS
  steps = {name: int(v["steps"].get(name, 0)) for name in _STAGE_STEPS}
  c.order = tuple(name for name in _STAGE_STEPS if steps[name])

  s = ml_collections.ConfigDict()
  for name in ("adapt", "adapt_no_recycle"):
    a = _common(diffusion.adapt_config("small"), v, steps[name], v["lr"])
    a.caption_dropout = 0.0  # the baseline samples without guidance here
    # Cosine decay to 1% (docs/testbed_full/stage1_attempts.md: at a constant 1e-3 the loss sat at
    # ~0.06 from step 1000 to 2000 while the t = 1 prediction was 7 dB under warp-last).
    a.optimizer.schedule = "cosine"
    a.optimizer.end_factor = 0.01
    a.recycle = name == "adapt"
    s[name] = a
  for name in ("distill", "distill_control", "distill_no_recycle", "distill_seed1"):
    d = _common(diffusion.distill_config("small"), v, max(steps[name], 1), v["lr"] / 3)
    d.distill.shift = flow_shift(TOKENS_PER_FRAME)  # the 32-step schedule of the consistency targets
    d.recycle = name != "distill_no_recycle"
    d.seed = 1 if name.endswith("seed1") else 0
    s[name] = d
  for name, extra in (("adversarial", ""), ("adversarial_teacher_forcing", ",variant=teacher_forcing"),
                      ("adversarial_no_recycle", ",recycle=0"), ("adversarial_seed1", "")):
    g = _common(adversarial.adversarial_config("small" + extra), v, steps[name], v["gan_lr"])
    g.optimizer.learning_rate = g.d_optimizer.learning_rate = v["gan_lr"]
    g.optimizer.warmup_steps = 0
    g.seed = 1 if name.endswith("seed1") else 0
    s[name] = g
  seg, overlap, num = v["segments"]
  lv = _common(adversarial.long_video_config(f"small,segment_frames={seg},overlap_frames={overlap},num_segments={num}"),
               v, steps["long_video"], v["gan_lr"])
  lv.optimizer.learning_rate = lv.d_optimizer.learning_rate = v["gan_lr"]
  lv.optimizer.warmup_steps = 0
  lv.data.frames = 1 + 4 * seg * num
  lv.adversarial.d_init_key = "d_params"  # continue stage 3's discriminator
  s.long_video = lv
  # Each stage starts from the weights its source's verdict would use (`gates.weights_key`).
  for name, links in _CHAIN.items():
    source = s[links["init_from"]]
    s[name].init_from_key = gates.weights_key(source.ema_decay, source.num_steps)
  c.stages = s
  c.chain = ml_collections.ConfigDict({name: links for name, links in _CHAIN.items() if name in c.order})

  e = ml_collections.ConfigDict()
  e.enabled = True
  e.kind = "testbed"
  e.num_worlds = v["worlds"]
  e.noise_seeds = v["seeds"]
  e.seconds = v["seconds"]
  e.eval_sets = ("in_distribution",)   # the unseen palettes never occur in training captions
  e.fps = 24
  labels = {"diffusion": "adapt", "distilled": "distill", "aapt": "long_video", "aapt_short": "adversarial",
            "teacher_forcing": "adversarial_teacher_forcing", "control": "distill_control",
            "no_recycle": "adversarial_no_recycle", "distilled_seed1": "distill_seed1",
            "aapt_short_seed1": "adversarial_seed1"}
  models = {}
  for label, stage in labels.items():
    sc = s[stage]
    spec = dict(workdir=stage, key=gates.weights_key(sc.ema_decay, sc.num_steps))
    if label == "diffusion":
      spec.update(num_steps=v["euler_steps"], shift=flow_shift(TOKENS_PER_FRAME), cache_from="matched")
    if label == "no_recycle":
      spec.update(recycle=False)
    models[label] = spec
  e.models = ml_collections.ConfigDict(models)
  c.evaluation = e
  return c
