"""VAE stages on the shared loop: `vae` (L1 + KL, optional patch discriminator) and `vae_distill`
(a decoder, e.g. the paper's slim one, trained behind a frozen encoder).

  python -m apt2_jax.main --config=experiments/vae.py:small --workdir=/tmp/vae_small

`init_from` (stage vae) and `teacher` (stage vae_distill) name a diffusers AutoencoderKLWan folder
or another VAE workdir. Data parallel: parameters replicated on `config.mesh`, the batch split
over its data axis (`train.validate.STAGE_DEFAULTS` fills the loop's fields VAE configs lack).

State, the contract `apt2_jax.generation.vae.load_vae` reads:
  params         the whole VAE (encoder, quant_conv, post_quant_conv, decoder); for vae_distill
                 the encoder side is the teacher's and never changes (`optax.multi_transform`
                 zeroes its updates)
  opt_state      the optimiser's state
  latent_stats   {"mean", "std"}: float32 [z_dim], per-channel statistics of the encoder's
                 posterior means (for `normalize_latents`): a plain average of the batches'
                 moments over the first `stats_batches` steps, then an EMA with decay
                 `latent_stats_decay`, so every checkpoint carries usable statistics; fixed when
                 `measure_latent_stats` is off, and the teacher's for vae_distill
  disc_params, disc_opt_state   the patch discriminator (`loss.adversarial_weight > 0`)
  step, nonfinite_in_a_row, nonfinite_total   the loop's counters
Frozen (passed to every step, never saved): the teacher's variables when `loss.teacher_weight > 0`.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from apt2_jax import sharding, train
from apt2_jax.generation.vae import load_vae, vae_config_from_block
from apt2_jax.models import vae as vae_lib
from apt2_jax.train.validate import with_defaults

STAGES = ("vae", "vae_distill")
SOURCES = ("random", "worlds", "pipeline")
# Parameters the decoder-only distillation trains; the rest (the encoder side) stays frozen.
DECODER_PARAMS = ("post_quant_conv", "decoder")
MIN_STD = 1e-6  # floor of the latent std: `normalize_latents` divides by it


def validate(config) -> None:
  """Fails at start, naming the field, rather than an hour into a run."""
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r} is not one of {STAGES}")
  vae_lib.latent_frames(config.data.frames)  # 1 + 4k
  for name in ("height", "width"):
    if config.data[name] % vae_lib.SPATIAL_FACTOR:
      raise ValueError(f"config.data.{name}={config.data[name]} is not a multiple of 8")
  if config.data.source not in SOURCES:
    raise ValueError(f"config.data.source={config.data.source!r} is not one of {SOURCES}")
  if config.stage == "vae_distill" and not config.get("teacher", ""):
    raise ValueError("config.teacher (a diffusers AutoencoderKLWan folder or a `vae` workdir) is "
                     "required by stage vae_distill")
  if config.loss.adversarial_weight < 0 or config.loss.kl_weight < 0:
    raise ValueError("config.loss weights must be >= 0")
  if int(config.get("microbatches", 1)) != 1:
    raise ValueError(f"config.microbatches={config.microbatches}: the VAE stages take whole batches")
  vae_config_from_block(config.vae)


class PatchDiscriminator(nn.Module):
  """Per-frame patch logits for video `[B, T, H, W, 3]` -> `[B, T, H/2^n, W/2^n, 1]`."""
  width: int = 32
  num_layers: int = 3

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = nn.Conv(self.width * 2 ** i, (3, 4, 4), strides=(1, 2, 2), padding="SAME")(x)
      x = nn.leaky_relu(x, 0.2)
    return nn.Conv(1, (3, 3, 3), padding="SAME")(x)


# ================================================================================================
# Losses and latent statistics
# ================================================================================================

def to_unit_range(video):
  """uint8 video (worlds, pipeline) -> float32 in [-1, 1]; float video passes through."""
  return video.astype(jnp.float32) / 127.5 - 1.0 if video.dtype == jnp.uint8 else video.astype(jnp.float32)


def generator_loss(params, disc_params, video, rng, *, model, disc, teacher, loss_config, distill):
  """(loss, (metrics, reconstruction, posterior mean)) for `video` [B, T, H, W, 3].

  `params`: the VAE's parameter dict; `teacher`: (VAE, variables) for vae_distill's decoder L1.
  """
  lc, metrics, variables = loss_config, {}, {"params": params}
  if distill:  # the frozen encoder's posterior mean -> the trained decoder
    mean, _ = model.apply(variables, video, method=vae_lib.VAE.encode)
    mean = jax.lax.stop_gradient(mean)
    recon = model.apply(variables, mean, clip=False, method=vae_lib.VAE.decode)
    loss = 0.0
    if teacher is not None:
      t_model, t_variables = teacher
      target = t_model.apply(t_variables, mean, clip=False, method=vae_lib.VAE.decode)
      metrics["teacher_l1"] = jnp.mean(jnp.abs(recon - jax.lax.stop_gradient(target)))
      loss = loss + lc.teacher_weight * metrics["teacher_l1"]
  else:
    recon, mean, logvar = model.apply(variables, video, rngs={"sample": rng})
    metrics["kl"] = jnp.mean(vae_lib.kl_divergence(mean, logvar)) / math.prod(mean.shape[1:])
    loss = lc.kl_weight * metrics["kl"]
  metrics["l1"] = jnp.mean(jnp.abs(recon - video))
  loss = loss + lc.l1_weight * metrics["l1"]
  if disc is not None:
    metrics["g_adv"] = jnp.mean(jax.nn.softplus(-disc.apply(disc_params, recon)))
    loss = loss + lc.adversarial_weight * metrics["g_adv"]
  return loss, (metrics, recon, jax.lax.stop_gradient(mean))


def discriminator_loss(disc_params, video, recon, *, disc):
  real = disc.apply(disc_params, video)
  fake = disc.apply(disc_params, jax.lax.stop_gradient(recon))
  return jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake))


def update_latent_stats(stats, mean, count, warmup: int, decay: float):
  """Running per-channel statistics of posterior means `mean` [..., z_dim].

  The first and second moments are mixed with weight 1 / (count + 1) while `count` (the batches
  seen before this one) < `warmup` (a plain average), then 1 - `decay` (an EMA). Tracking them
  inside the step puts usable statistics in every checkpoint and keeps a resumed run exact.
  """
  z = mean.reshape(-1, mean.shape[-1]).astype(jnp.float32)
  count = count.astype(jnp.float32)
  w = jnp.where(count < warmup, 1.0 / (count + 1.0), 1.0 - decay)
  second = jnp.square(stats["std"]) + jnp.square(stats["mean"])
  new_mean = stats["mean"] + w * (jnp.mean(z, axis=0) - stats["mean"])
  second = second + w * (jnp.mean(jnp.square(z), axis=0) - second)
  std = jnp.sqrt(jnp.maximum(second - jnp.square(new_mean), MIN_STD ** 2))
  return {"mean": new_mean, "std": std}


def config_latent_stats(cfg: vae_lib.VAEConfig):
  """A VAEConfig's statistics as the state's `latent_stats` (0 and 1 where it has none)."""
  mean = cfg.latents_mean or (0.0,) * cfg.z_dim
  std = cfg.latents_std or (1.0,) * cfg.z_dim
  return {"mean": jnp.asarray(mean, jnp.float32), "std": jnp.asarray(std, jnp.float32)}


# ================================================================================================
# The stage
# ================================================================================================

class VAEStage(train.Stage):

  def __init__(self, config, mesh):
    config = with_defaults(config)
    super().__init__(config, mesh)
    validate(config)
    self.distill = config.stage == "vae_distill"
    self.model = vae_lib.VAE(vae_config_from_block(config.vae))
    opt = config.optimizer
    self.schedule = train.learning_rate_schedule(opt, config.num_steps)
    self.tx = train.make_optimizer(opt, config.num_steps)
    if self.distill:  # only the decoder side learns; the encoder side's updates are zero
      self.tx = optax.multi_transform({"train": self.tx, "frozen": optax.set_to_zero()}, self._labels)
    self.disc = PatchDiscriminator() if config.loss.adversarial_weight > 0 else None
    # The discriminator: the same schedule, no momentum (b1 = 0), as in the adversarial stages.
    self.d_tx = train.make_optimizer(ml_collections.ConfigDict(dict(opt.to_dict(), b1=0.0)), config.num_steps)
    self.teacher, self._teacher_vars, self.frozen, self._eval = None, None, {}, None
    if self.distill:
      self.teacher, self._teacher_vars = load_vae(config.teacher)
      if float(config.loss.get("teacher_weight", 0.0)):
        self.frozen = {"teacher": jax.device_put(self._teacher_vars, sharding.replicated(mesh))}

  @staticmethod
  def _labels(params):
    return {k: jax.tree.map(lambda _, k=k: "train" if k in DECODER_PARAMS else "frozen", v)
            for k, v in params.items()}

  # ---------------------------------------------------------------------------------------------
  def init_state(self, rng):
    k_vae, k_disc = jax.random.split(rng)
    params = vae_lib.init_params(self.model, k_vae, 16, 16)["params"]  # shapes are size-free
    state = {"params": params, "opt_state": self.tx.init(params),
             "latent_stats": config_latent_stats(self.model.config), **train.init_counters()}
    if self.disc is not None:
      d = self.disc.init(k_disc, jnp.zeros((1, 5, 16, 16, 3), jnp.float32))
      state.update(disc_params=d, disc_opt_state=self.d_tx.init(d))
    return state

  def load_pretrained(self, state):
    """vae: every parameter (and the statistics) from `config.init_from`, when set; vae_distill:
    the teacher's encoder side and latent statistics (the latent space is the teacher's)."""
    source = "config.teacher" if self.distill else "config.init_from"
    path = self.config.get("teacher" if self.distill else "init_from", "")
    if not path:
      return state
    model, variables = (self.teacher, self._teacher_vars) if self.distill else load_vae(path)
    loaded = variables["params"]
    take = [k for k in state["params"] if not self.distill or k not in DECODER_PARAMS]
    for k in take:
      want = jax.tree.map(lambda x: tuple(x.shape), state["params"][k])
      got = jax.tree.map(lambda x: tuple(x.shape), loaded[k]) if k in loaded else None
      if got != want:
        raise ValueError(f"{source}={path!r}: parameters {k!r} do not match config.vae "
                         f"(checkpoint {'missing' if got is None else 'shapes differ'})")
    params = dict(state["params"], **{k: loaded[k] for k in take})
    stats = config_latent_stats(model.config)
    return dict(state, params=params, opt_state=self.tx.init(params), latent_stats=stats)

  # ---------------------------------------------------------------------------------------------
  def train_step(self, state, frozen, batch, rng):
    c = self.config
    video = to_unit_range(batch["video"])
    teacher = (self.teacher, frozen["teacher"]) if "teacher" in frozen else None
    loss = lambda p: generator_loss(p, state.get("disc_params"), video, rng, model=self.model,
                                    disc=self.disc, teacher=teacher, loss_config=c.loss,
                                    distill=self.distill)
    params = state["params"]
    if self.distill:  # gradients of the decoder side only; zeros for the frozen side
      fixed = {k: v for k, v in params.items() if k not in DECODER_PARAMS}
      grad_fn = jax.value_and_grad(lambda t: loss({**fixed, **t}), has_aux=True)
      (total, (metrics, recon, mean)), g = grad_fn({k: params[k] for k in DECODER_PARAMS})
      grads = {**jax.tree.map(jnp.zeros_like, fixed), **g}
    else:
      (total, (metrics, recon, mean)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    params, opt_state, extra = train.apply_gradients(self.tx, params, state["opt_state"], grads)
    metrics = dict(metrics, **extra, loss=total, learning_rate=self.schedule(state["step"]))
    new = dict(state, params=params, opt_state=opt_state)
    if self.disc is not None:
      d_loss, d_grads = jax.value_and_grad(discriminator_loss)(state["disc_params"], video, recon,
                                                               disc=self.disc)
      new["disc_params"], new["disc_opt_state"], d_extra = train.apply_gradients(
          self.d_tx, state["disc_params"], state["disc_opt_state"], d_grads)
      metrics.update(d_loss=d_loss, d_grad_norm=d_extra["grad_norm"])
    if not self.distill and c.get("measure_latent_stats", True):
      new["latent_stats"] = update_latent_stats(state["latent_stats"], mean, state["step"],
                                                max(1, int(c.get("stats_batches", 16))),
                                                float(c.get("latent_stats_decay", 0.98)))
    return new, metrics

  # ---------------------------------------------------------------------------------------------
  def evaluate(self, state, frozen, step) -> dict:
    """Reconstruction of a fixed validation batch through the posterior mean: L1 and PSNR."""
    if self._eval is None:
      local = next(train.data.make_iterator(self.config, "validation"))
      batch = train.global_batch(local, train.batch_shardings(local, self.mesh))

      def recon(params, video):
        video = to_unit_range(video)
        variables = {"params": params}
        mean, _ = self.model.apply(variables, video, method=vae_lib.VAE.encode)
        out = self.model.apply(variables, mean, method=vae_lib.VAE.decode)
        mse = jnp.mean(jnp.square(out - video))
        return {"recon_l1": jnp.mean(jnp.abs(out - video)), "psnr": 10.0 * jnp.log10(4.0 / mse)}
      self._eval = (jax.jit(recon), batch["video"])
    fn, video = self._eval
    return {k: float(v) for k, v in jax.device_get(fn(state["params"], video)).items()}


def make_stage(config, mesh):
  return VAEStage(config, mesh)
