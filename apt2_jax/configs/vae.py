"""VAE stage configs: `vae` (train or fine-tune the causal VAE: L1 + KL, optional adversarial
term) and `vae_distill` (the paper's slim real-time decoder behind a frozen encoder).

Sizes (`apt2_jax.models.vae.vae_config`): `tiny` (tests), `small` (the toy pipeline), `wan`
(fine-tune Wan2.1's VAE: set `init_from` to its diffusers folder), `slim_decoder` (distillation;
set `teacher` to a diffusers `AutoencoderKLWan` folder or a `vae` workdir).
"""
import ml_collections

SIZES = ("tiny", "small", "wan", "slim_decoder")

_SIZE_SETTINGS = {
    # size: (batch, frames, height, width, steps, learning rate)
    "tiny": (2, 5, 16, 16, 4, 1e-3),
    "small": (8, 9, 64, 64, 20_000, 3e-4),
    "wan": (8, 17, 256, 256, 10_000, 1e-5),
    "slim_decoder": (8, 17, 256, 256, 50_000, 1e-4),
}


def get_config(arg: str = "small") -> ml_collections.ConfigDict:
  size = arg or "small"
  if size not in SIZES:
    raise ValueError(f"unknown VAE size {size!r}; choose one of {SIZES}")
  batch, frames, height, width, steps, lr = _SIZE_SETTINGS[size]
  c = ml_collections.ConfigDict()
  c.stage = "vae_distill" if size == "slim_decoder" else "vae"
  c.seed = 0
  c.num_devices = 0  # data parallel over the first N devices that divide the batch (0 = all)
  # `config.vae`: a named size plus any `VAEConfig` field (e.g. --config.vae.remat=True).
  c.vae = ml_collections.ConfigDict({"size": size})
  c.init_from = ""   # stage vae: start from a diffusers AutoencoderKLWan folder or a workdir
  c.teacher = ""     # stage vae_distill: frozen encoder (and teacher decoder) source
  c.batch_size = batch
  c.num_steps = steps
  c.log_every = 1 if size == "tiny" else 50
  c.checkpoint_every = 2 if size == "tiny" else 1000
  c.measure_latent_stats = True
  c.stats_batches = 1 if size == "tiny" else 16

  c.data = ml_collections.ConfigDict()
  c.data.source = "random"   # "random" smooth videos, or "pipeline" (apt2_jax.data.pipeline)
  c.data.frames = frames     # 1 + 4k
  c.data.height = height
  c.data.width = width

  c.loss = ml_collections.ConfigDict()
  c.loss.l1_weight = 1.0
  c.loss.kl_weight = 1e-3              # per latent element
  c.loss.adversarial_weight = 0.0      # > 0 adds a patch discriminator (non-saturating loss)
  c.loss.teacher_weight = 1.0 if size == "slim_decoder" else 0.0  # distill: match the teacher

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = lr
  c.optimizer.warmup_steps = 0 if size == "tiny" else 500
  c.optimizer.end_factor = 0.1
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip = 1.0
  return c
