"""Stage 3: adversarial post-training (`adversarial_config`) and long-video training
(`long_video_config`). The argument is `size[,key=value...]` (`diffusion.parse_arg`): `world=`,
and the ablations `variant=teacher_forcing`, `recycle=0`, `detach_cache=1`, `loss=non_saturating`;
the memory options `rollout_backward=scan` and `g_pass=keep` (the paths before the ring-cache VJP),
`g_sharding=zero3|zero2` and `d_sharding=` (`apt2_jax/sharding.py`);
long video also `segment_frames=`, `overlap_frames=`, `num_segments=`.
"""
import ml_collections

from apt2_jax.configs import diffusion

_TOY_LR = {"tiny": 1e-4, "small": 2e-5}

# size: (segment latent frames, overlap latent frames, segments)
_SEGMENTS = {"tiny": (2, 1, 2), "small": (4, 1, 4), "wan_1_3b": (60, 6, 6), "apt2_8b": (60, 6, 6)}


def adversarial_block(extra: dict) -> ml_collections.ConfigDict:
  truthy = lambda k, d: str(extra.get(k, d)).lower() in ("1", "true", "yes")
  return ml_collections.ConfigDict(dict(
      variant=extra.get("variant", "student_forcing"),  # or "teacher_forcing" (ablation)
      recycle=truthy("recycle", True),                  # False: no-recycling ablation
      detach_recycled=True,                             # recycled input is detached (paper)
      detach_cache=truthy("detach_cache", False),       # True: no gradient through the KV cache
      d_steps=1,                                        # D updates per G update
      loss_type=extra.get("loss", "relativistic"),      # or "non_saturating"
      r1_weight=1000.0, r2_weight=1000.0,               # approximated R1 (real) / R2 (fake)
      sigma=0.1, sigma_is_variance=False,               # perturbation std of the approximation
      d_head_layers=(),                                 # () = the paper's 16/26/36-of-36 scaled
      rollout_remat="full",                             # remat of the scanned step (rollout_backward="scan")
      # The rollout's backward pass (`RolloutOptions.backward`): "ring", a custom VJP that keeps each
      # step's evicted ring slot; "scan", autodiff of the scan (one whole cache per step).
      rollout_backward=extra.get("rollout_backward", "ring"),
      # G's gradient pass (`stages.adversarial.G_PASSES`): "recompute" rolls out again after D's
      # update (the step's peak is the larger pass); "keep" pulls back through the first rollout
      # (one rollout fewer; its residuals live through D's update).
      g_pass=extra.get("g_pass", "recompute"),
      # Sharding of G's and D's state (`sharding.ZERO`): the paper's ZeRO-2 for G during student
      # forcing (its weights gathered once per pass, bf16 block matrices, not per rollout step),
      # ZeRO-3 for D (gathered per use). Storage is sharded either way.
      g_sharding=extra.get("g_sharding", "zero2"),
      # Clips per D pass (`AdversarialStage.d_logits_many`): 0, all of a step's clips (real,
      # generated and their perturbed copies) batched in one pass; k, passes of k clips in sequence.
      d_clips_per_pass=int(extra.get("d_clips_per_pass", 0)),
      d_sharding=extra.get("d_sharding", "zero3"),
      d_init_from="",                                   # stage-1 workdir for D's backbone
      d_init_key="ema_params"))                         # or "d_params": a stage-3 D as a whole


def gan_optimizer(lr: float) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(name="adam", learning_rate=lr, schedule="constant", warmup_steps=0,
                                        end_factor=1.0, b1=0.0, b2=0.9, eps=1e-8, weight_decay=0.0,
                                        grad_clip=1.0))


def adversarial_config(arg: str = "small") -> ml_collections.ConfigDict:
  """Paper values: relativistic loss, R1/R2 1000 at sigma 0.1, Adam b1 0 b2 0.9, lr 3e-6."""
  size, extra = diffusion.parse_arg(arg)
  c = diffusion.base_config("adversarial", size, extra.get("world", "camera"))
  lr = _TOY_LR.get(size, 3e-6)
  c.optimizer = gan_optimizer(lr)
  c.d_optimizer = gan_optimizer(lr)
  c.adversarial = adversarial_block(extra)
  if size in ("wan_1_3b", "apt2_8b"):
    # Memory at the paper sizes (AOT, 8 devices, 8-way context parallelism; docs/benchmarks/
    # aot_memory.md): D's clips one pass at a time (apt2_8b: 88.9 -> 77.3 GB per device), and at
    # apt2_8b G under ZeRO-3: ZeRO-2's whole bf16 copy of G and each step's whole gradient add
    # 42 GB (130.8 GB). wan_1_3b keeps the paper's ZeRO-2 for G (fits in 30 GB).
    c.adversarial.d_clips_per_pass = int(extra.get("d_clips_per_pass", 1))
    if size == "apt2_8b":
      c.adversarial.g_sharding = extra.get("g_sharding", "zero3")
  c.caption_dropout = 0.0
  c.ema_decay = 0.0 if size == "tiny" else 0.99
  c.init_from_key = "ema_params"
  if size in ("wan_1_3b", "apt2_8b"):
    c.data.frames = 121  # 5 s at 24 fps (paper: 5-10 s clips)
  return c


def long_video_config(arg: str = "small") -> ml_collections.ConfigDict:
  """Stage 3b: `num_segments` segments of `segment_frames` latent frames per long rollout, judged
  against unpaired real short clips. Batch layout (`apt2_jax/stages/long_video.py`): even rows give
  the `batch_size / 2` rollouts their first frame, prompt and control trajectory; odd rows are the
  real clips (windows of `segment_frames` + context latent frames); `batch_size` must be even."""
  size, extra = diffusion.parse_arg(arg)
  c = adversarial_config(arg)
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
