"""Stage 3: adversarial post-training with student forcing (AAPT).

G starts from stage 2 (`init_from`), D's backbone from stage 1 (`adversarial.d_init_from`). Paper
values: relativistic loss, approximated R1/R2 with lambda = 1000 and sigma = 0.1 (a standard
deviation), Adam b1 = 0, b2 = 0.9 (RMSProp alpha = 0.9), lr 3e-6, D's t ~ U(0, 1) unshifted.
Ablations as config arguments: `variant=teacher_forcing`, `recycle=0` (no recycling),
`detach_cache=1` (Self-Forcing-style cache), `loss=non_saturating`.

  python -m apt2_jax.main --config=experiments/stage3_adversarial.py:small --workdir=/tmp/s3_small \\
      --config.vae.checkpoint=/tmp/vae_small --config.init_from=/tmp/s2_small \\
      --config.adversarial.d_init_from=/tmp/s1_small
  # the teacher-forcing ablation:
  python -m apt2_jax.main --config=experiments/stage3_adversarial.py:small,variant=teacher_forcing ...
"""
import ml_collections

from experiments import diffusion_common

_TOY_LR = {"tiny": 1e-4, "small": 2e-5}


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
      rollout_remat="full",                             # remat of the scanned rollout step
      d_init_from="",                                   # stage-1 workdir for D's backbone
      d_init_key="ema_params"))                         # or "d_params": a stage-3 D as a whole


def gan_optimizer(lr: float) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(name="adam", learning_rate=lr, schedule="constant", warmup_steps=0,
                                        end_factor=1.0, b1=0.0, b2=0.9, eps=1e-8, weight_decay=0.0,
                                        grad_clip=1.0))


def get_config(arg: str = "small"):
  size, extra = diffusion_common.parse_arg(arg)
  c = diffusion_common.base_config("adversarial", size, extra.get("world", "camera"))
  lr = _TOY_LR.get(size, 3e-6)
  c.optimizer = gan_optimizer(lr)
  c.d_optimizer = gan_optimizer(lr)
  c.adversarial = adversarial_block(extra)
  c.caption_dropout = 0.0
  c.ema_decay = 0.0 if size == "tiny" else 0.99
  c.init_from_key = "ema_params"
  if size in ("wan_1_3b", "apt2_8b"):
    c.data.frames = 121  # 5 s at 24 fps (paper: 5-10 s clips)
  return c
