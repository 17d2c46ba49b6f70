"""VAE stage configs: `vae` (train or fine-tune the causal VAE: L1 + KL, optional adversarial
term) and `vae_distill` (the paper's slim real-time decoder behind a frozen encoder).

Sizes (`apt2_jax.models.vae.vae_config`): `tiny` (tests), `small` (the toy pipeline), `wan`
(fine-tune Wan2.1's VAE: set `init_from` to its diffusers folder), `slim_decoder` (distillation;
set `teacher` to a diffusers `AutoencoderKLWan` folder or a `vae` workdir), `light_decoder`
(distillation of the light streaming decoder behind the `small` VAE's frozen encoder: set `teacher`
to a `small` `vae` workdir; `experiments/vae.py:light_decoder`).

The light decoder (`apt2_jax/models/light_decoder.py`, `VAEConfig.decoder_type = "light"`): a
causal 2x3x3 conv and one residual block with a causal first conv at the latent frame (C0 = 64;
its temporal state is the previous latent frame and the block's previous input), a 1x1 conv into
4 video frames (C1 = 48 each), then per video frame a residual block at 1x, 1x1 conv + pixel
shuffle to 2x (C2 = 32), a residual block, 1x1 conv + pixel shuffle to 4x (C3 = 16), and a 3x3 conv
+ pixel shuffle to RGB at 8x: `light_dims = (64, 48, 32, 16)`, `light_blocks = (1, 1, 1, 0)`,
215k parameters and 1.5 GFLOP per latent frame at 256x256 (the small VAE's decoder: 6.1M, 172
GFLOP). Its `config.vae` is the teacher's size
(`small`; the encoder side must match the teacher's, `load_pretrained` checks) with the light
decoder fields; for another teacher set `--config.vae.size` (and its encoder fields) to match.
"""
import ml_collections

SIZES = ("tiny", "small", "wan", "slim_decoder", "light_decoder")

_SIZE_SETTINGS = {
    # size: (batch, frames, height, width, steps, learning rate)
    "tiny": (2, 5, 16, 16, 4, 1e-3),
    "small": (8, 9, 64, 64, 20_000, 3e-4),
    "wan": (8, 17, 256, 256, 10_000, 1e-5),
    "slim_decoder": (8, 17, 256, 256, 50_000, 1e-4),
    "light_decoder": (8, 9, 64, 64, 20_000, 1e-3),
}
# `config.vae` of the light decoder: the teacher's encoder (`small`) + the light decoder's fields.
LIGHT_DECODER_VAE = {"size": "small", "decoder_type": "light", "light_dims": (64, 48, 32, 16),
                     "light_blocks": (1, 1, 1, 0)}
DISTILL_SIZES = ("slim_decoder", "light_decoder")


def get_config(arg: str = "small") -> ml_collections.ConfigDict:
  size = arg or "small"
  if size not in SIZES:
    raise ValueError(f"unknown VAE size {size!r}; choose one of {SIZES}")
  batch, frames, height, width, steps, lr = _SIZE_SETTINGS[size]
  c = ml_collections.ConfigDict()
  distill = size in DISTILL_SIZES
  c.stage = "vae_distill" if distill else "vae"
  c.seed = 0
  c.num_devices = 0  # data parallel over the first N devices that divide the batch (0 = all)
  # `config.vae`: a named size plus any `VAEConfig` field (e.g. --config.vae.remat=True).
  c.vae = ml_collections.ConfigDict(LIGHT_DECODER_VAE if size == "light_decoder" else {"size": size})
  c.init_from = ""   # stage vae: start from a diffusers AutoencoderKLWan folder or a workdir
  c.teacher = ""     # stage vae_distill: frozen encoder (and teacher decoder) source
  c.batch_size = batch
  c.num_steps = steps
  c.log_every = 1 if size == "tiny" else 50
  c.checkpoint_every = 2 if size == "tiny" else 1000
  c.measure_latent_stats = True
  c.stats_batches = 1 if size == "tiny" else 16

  c.data = ml_collections.ConfigDict()
  # "random" smooth videos, "worlds" (a pool of rendered world clips) or "pipeline" (grain)
  c.data.source = "worlds" if size == "light_decoder" else "random"
  c.data.frames = frames     # 1 + 4k
  c.data.height = height
  c.data.width = width
  c.data.world = "camera"    # the synthetic world of "worlds" / "pipeline"
  c.data.pool_size = 64      # "worlds": clips rendered at start (validation: other seeds)

  c.loss = ml_collections.ConfigDict()
  # The light decoder matches its teacher only (its target is the full decoder's output).
  c.loss.l1_weight = 0.0 if size == "light_decoder" else 1.0
  c.loss.kl_weight = 1e-3              # per latent element
  c.loss.adversarial_weight = 0.0      # > 0 adds a patch discriminator (non-saturating loss)
  c.loss.teacher_weight = 1.0 if distill else 0.0  # distill: match the teacher

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = lr
  c.optimizer.warmup_steps = 0 if size == "tiny" else 500
  c.optimizer.end_factor = 0.1
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip = 1.0
  return c
