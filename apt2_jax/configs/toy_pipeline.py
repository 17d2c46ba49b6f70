"""The toy pipeline's config: the VAE, stages 0-3, long video and the ablations on the synthetic
camera world, each stage starting from the previous one's checkpoint (`chain`), then the evaluation
against the oracle (`evaluation`); `apt2_jax.pipeline` runs it in `ORDER`.

Variants (the argument):
  tiny  the end-to-end test: tiny 1-block model on 1 device, 32x32 pixels, 1-3 steps per stage
        (measured: ~2 min on 2 idle CPU cores before the evaluation had two sets; nearly all of it
        XLA compiles: 8 stage steps, their initialisations, the evaluation)
  demo  `make demo-camera`: the `toy` DiT (4 blocks, width 128), small VAE (base width 16), 64x64
        pixels, tens of steps per stage: measured 8-10 min on 2 CPU cores before the VAE's clips
        were made as long as the DiT's (VAE 2.5-4 min; now 2 clips of 17 frames per step instead of
        4 of 9, about the same frames per step); a smoke run of the whole chain, far too short to
        learn the world
  full  the same models trained for thousands of steps, evaluated on 2 worlds of each set with 1-
        and 5-minute rollouts: measured ~75 minutes on 2 CPU cores before this change (VAE 11, DiT
        stages ~40, evaluation 22); now estimated (not measured end to end) ~145 minutes: the VAE
        trains 2000 steps on 2 clips of 17 frames (measured alone: ~0.6 steps/s, ~55 min; 700 steps
        did not beat the flat colour by the clear margin, 2000 do in distribution: README "The
        camera world's VAE") and the evaluation runs two sets plus the references' VAE pass;
        docs/toy_full/ predates all of it (stale, says so)

Clips: the VAE trains on clips as long as the DiT's (`vae_frames` = `frames`, 17 video frames in
`demo` and `full`), so its causal encoder and decoder have seen the context the stream gives them.
Controls: the camera world's relative motion as unit-std ray maps ("rays", 24 channels; every DiT
stage, tested). Time shift: `sizes.flow_shift` of the tokens per latent frame (`tiny` 32x32 px: 4
tokens, 1.39; `demo`/`full` 64x64 px: 16 tokens, 2.78) for stage 1's flow, the distillation
schedule and the stage-1 baseline's Euler sampler, whose KV cache matches stage-1 training
("matched": one cache per schedule time, 2 x euler_steps passes per frame).

Evaluation (`apt2_jax.evaluation.evaluate`, the one evaluation of every world): every model on
`worlds` worlds of two sets, reported separately: `in_distribution` (validation-split worlds drawn
like training's: training textures, trajectory types and caption words; the gates and claims) and
`held_out` (test-split worlds: unseen textures and the held-out trajectory; generalisation). The
trajectories continue training's control sampler (training's speeds, no hovering). References
through the same VAE: the oracle (the VAE's ceiling), the true frame one latent step back, frozen
frame 0 and frame 0's flat colour (the camera world has no exact warp, so no warp references),
with the VAE-vs-flat-colour margin; the longest of `durations` is rolled out, the shorter ones
scored on its prefix.
"""
import ml_collections

from apt2_jax.configs import adversarial, diffusion, sizes
from apt2_jax.configs import vae as vae_stage

ORDER = ("vae", "pretrain", "adapt", "distill", "adversarial", "adversarial_teacher_forcing",
         "adversarial_no_recycle", "long_video")

# variant: model size, VAE size, pixels, video frames of the short clips, long-video segments
# (segment latent frames, overlap, number), batch, steps per stage, evaluation
_VARIANTS = {
    # One device, one DiT block and one checkpoint per stage: the test of the chain, where XLA
    # compiles are the cost (a second block adds ~30% to each stage-3 compile).
    "tiny": dict(model="tiny", layers=1, vae="tiny", pixels=32, frames=9, segments=(2, 1, 2), batch=8, pool=8,
                 devices=1, checkpoints=1,
                 steps=dict(vae=3, pretrain=2, adapt=2, distill=2, adversarial=2, adversarial_teacher_forcing=1,
                            adversarial_no_recycle=1, long_video=1),
                 lr=1e-3, gan_lr=1e-4, euler_steps=4, worlds=1, durations=(1.0,)),
    # Sized to the 2-core CPU: XLA compiles dominate; the steps are enough to watch the losses and
    # the realism gap move, not for quality (that is `full`). The VAE's clips are the DiT's 17 frames
    # (2 per step: about the frames per step of the former 4 clips of 9).
    "demo": dict(model="toy", vae="small", vae_base_dim=16, vae_frames=17, vae_batch=2, pixels=64, frames=17,
                 segments=(2, 1, 3), batch=8, pool=32,
                 steps=dict(vae=60, pretrain=60, adapt=60, distill=30, adversarial=20,
                            adversarial_teacher_forcing=6, adversarial_no_recycle=6, long_video=4),
                 vae_lr=1e-3, lr=1e-3, gan_lr=5e-5, euler_steps=8, worlds=1, durations=(4.0,)),
    # Measured ~75 minutes on 2 CPU cores with the VAE on 4 clips of 5 frames and one evaluation set
    # (VAE 11 min, DiT stages ~40, evaluation 22); now ~145 estimated (module docstring). The VAE
    # trains 2000 steps: at its former 700 it beat frame 0's flat colour by 2.5 dB in distribution
    # (`tools.vae_references`), under the 3 dB clear margin; at 2000 by 3.5 (docs/camera_vae/).
    "full": dict(model="toy", vae="small", vae_base_dim=16, vae_frames=17, vae_batch=2, vae_lr=1e-3,
                 pixels=64, frames=17, segments=(2, 1, 4), batch=8, pool=256,
                 steps=dict(vae=2000, pretrain=2500, adapt=8000, distill=1500, adversarial=300,
                            adversarial_teacher_forcing=300, adversarial_no_recycle=300, long_video=100),
                 lr=1e-3, gan_lr=5e-5, euler_steps=8, worlds=2, durations=(60.0, 300.0)),
}


def _common(c, v, world, steps, lr):
  c.model = sizes.model_config(v["model"], control_channels=c.model.control_channels,
                                recycled_channels=c.model.recycled_channels)
  if v.get("layers"):
    c.model.num_layers = v["layers"]
  c.mesh = sizes.mesh_config(data=-1, fsdp=1)
  c.num_devices = v.get("devices", 0)
  c.batch_size = v["batch"]
  c.num_steps = steps
  c.optimizer.learning_rate = lr
  c.optimizer.warmup_steps = min(50, steps // 10)
  # A pool of rendered world clips, cycled: rendering on the fly is the slow path on a CPU.
  c.data.update(dict(source="worlds", world=world, height=v["pixels"], width=v["pixels"], pool_size=v["pool"],
                     frames=v["frames"], pre_encode=True))  # the frozen VAE encodes the pool once, not every batch
  c.vae.size = v["vae"]
  c.log_every = max(1, min(20, steps // 10))
  c.checkpoint_every = max(1, steps // v.get("checkpoints", 4))
  c.eval_every = 0
  c.eval_at_end = False  # the pipeline's evaluation scores every model at the end (one compile less)
  c.eval.batch_size = v["batch"]
  c.eval.sample_steps = v["euler_steps"] if c.stage == "adapt" else c.eval.sample_steps
  c.ema_decay = 0.0 if v["model"] == "tiny" else 0.99
  return diffusion.apply_shift(c)  # the pixels changed: the shifts follow the tokens per frame


def get_config(arg: str = "demo"):
  variant = arg or "demo"
  if variant not in _VARIANTS:
    raise ValueError(f"unknown toy pipeline variant {variant!r}; choose one of {tuple(_VARIANTS)}")
  v = _VARIANTS[variant]
  world = "camera"
  size = v["model"] if v["model"] != "toy" else "small"  # the stage builders know tiny/small/...
  c = ml_collections.ConfigDict()
  c.stage = "pipeline"
  c.variant = variant
  c.world = world
  c.height = c.width = v["pixels"]
  c.order = ORDER

  s = ml_collections.ConfigDict()
  vae = vae_stage.get_config(v["vae"])
  if v.get("vae_base_dim"):
    vae.vae.base_dim = v["vae_base_dim"]
  vae.data.source = "worlds"
  vae.data.update(dict(world=world, height=v["pixels"], width=v["pixels"], frames=v.get("vae_frames", v["frames"]),
                       pool_size=v["pool"]))
  vae.batch_size = v.get("vae_batch", v["batch"])
  vae.num_steps = v["steps"]["vae"]
  vae.optimizer.learning_rate = v.get("vae_lr", vae.optimizer.learning_rate)
  vae.optimizer.warmup_steps = min(50, vae.num_steps // 10)
  vae.num_devices = v.get("devices", 0)
  vae.checkpoint_every = max(1, vae.num_steps // v.get("checkpoints", 4))
  vae.log_every = max(1, min(20, vae.num_steps // 10))
  s.vae = vae

  s.pretrain = _common(diffusion.pretrain_config(size), v, world, v["steps"]["pretrain"], v["lr"])
  s.adapt = _common(diffusion.adapt_config(size), v, world, v["steps"]["adapt"], v["lr"])
  s.distill = _common(diffusion.distill_config(size), v, world, v["steps"]["distill"], v["lr"] / 3)
  for name, extra in (("adversarial", ""), ("adversarial_teacher_forcing", ",variant=teacher_forcing"),
                      ("adversarial_no_recycle", ",recycle=0")):
    g = _common(adversarial.adversarial_config(size + extra), v, world, v["steps"][name], v["gan_lr"])
    g.optimizer.learning_rate = g.d_optimizer.learning_rate = v["gan_lr"]
    g.optimizer.warmup_steps = 0
    s[name] = g
  seg, overlap, num = v["segments"]
  lv = _common(adversarial.long_video_config(f"{size},segment_frames={seg},overlap_frames={overlap},num_segments={num}"),
               v, world, v["steps"]["long_video"], v["gan_lr"])
  lv.optimizer.learning_rate = lv.d_optimizer.learning_rate = v["gan_lr"]
  lv.optimizer.warmup_steps = 0
  lv.data.frames = 1 + 4 * seg * num
  lv.adversarial.d_init_key = "d_params"  # continue stage 3's discriminator as a whole
  s.long_video = lv
  c.stages = s

  # Which earlier stage each stage starts from (sub-workdirs of the pipeline's workdir).
  c.chain = ml_collections.ConfigDict(dict(
      adapt=dict(init_from="pretrain"),
      distill=dict(init_from="adapt"),
      adversarial=dict(init_from="distill", d_init_from="adapt"),
      adversarial_teacher_forcing=dict(init_from="distill", d_init_from="adapt"),
      adversarial_no_recycle=dict(init_from="distill", d_init_from="adapt"),
      long_video=dict(init_from="adversarial", d_init_from="adversarial")))

  e = ml_collections.ConfigDict()
  e.enabled = True
  e.num_worlds = v["worlds"]
  e.durations = v["durations"]
  e.fps = 24
  e.seed = 0
  e.models = ml_collections.ConfigDict({
      "diffusion_stage1": dict(workdir="adapt", num_steps=v["euler_steps"], shift=s.adapt.eval.sample_shift,
                               guidance=3.0, cache_from="matched"),
      "distilled_1nfe": dict(workdir="distill"),
      "aapt": dict(workdir="long_video"),
      "aapt_short_only": dict(workdir="adversarial"),
      "adversarial_teacher_forcing": dict(workdir="adversarial_teacher_forcing"),
      "no_recycling": dict(workdir="adversarial_no_recycle", recycle=False),
  })
  c.evaluation = e
  return c
