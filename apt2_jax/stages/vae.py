"""VAE training stages: `vae` (L1 + KL, optional adversarial term) and `vae_distill` (the slim
decoder trained behind a frozen encoder).

A self-contained loop (optax + orbax, data parallel over all devices) until the shared trainer
(`apt2_jax/train.py`) takes the stages over. Config: `experiments/vae.py`.

  python -m apt2_jax.main --config=experiments/vae.py:small --workdir=/tmp/vae_small

What a workdir holds afterwards:
  checkpoints/       orbax steps: {'step', 'params' (trainable), 'opt_state', 'disc_*'}
  vae_config.json    the model's `VAEConfig` fields, including the latent statistics measured at
                     the end of training (per-channel mean/std of posterior means), so that
                     `normalize_latents` gives the DiT zero-mean, unit-variance latents
  `load_vae(workdir)` gives back (VAE, params) for the encode tool, the DiT stages and inference.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from apt2_jax import sharding
from apt2_jax.models import vae as vae_lib

STAGES = ("vae", "vae_distill")
# Parameters the decoder-only distillation trains; the rest (the encoder side) stays frozen.
DECODER_PARAMS = ("post_quant_conv", "decoder")


# ------------------------------------------------------------------------------------------------
# Config helpers
# ------------------------------------------------------------------------------------------------


def vae_config_from(config: ml_collections.ConfigDict) -> vae_lib.VAEConfig:
  """`config.vae` (`size` plus `VAEConfig` field overrides) -> `VAEConfig`."""
  fields = dict(config.vae.to_dict())
  size = fields.pop("size")
  for key, value in list(fields.items()):
    if isinstance(value, list):
      fields[key] = tuple(value)
  return vae_lib.vae_config(size, **fields)


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails at start, naming the field, rather than an hour into a run."""
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r} is not one of {STAGES}")
  vae_lib.latent_frames(config.data.frames)  # 1 + 4k
  for name in ("height", "width"):
    if config.data[name] % vae_lib.SPATIAL_FACTOR:
      raise ValueError(f"config.data.{name}={config.data[name]} is not a multiple of 8")
  if config.data.source not in ("random", "worlds", "pipeline"):
    raise ValueError(f"config.data.source={config.data.source!r}: 'random', 'worlds' or 'pipeline'")
  if config.stage == "vae_distill" and not config.teacher:
    raise ValueError("config.teacher (a diffusers AutoencoderKLWan folder or a `vae` workdir) is "
                     "required by stage vae_distill")
  if config.loss.adversarial_weight < 0 or config.loss.kl_weight < 0:
    raise ValueError("config.loss weights must be >= 0")
  vae_config_from(config)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def random_smooth_videos(rng: np.random.Generator, batch: int, frames: int, height: int,
                         width: int) -> np.ndarray:
  """Smooth random videos in [-1, 1], `[batch, frames, height, width, 3]` float32.

  A coarse random field drifting in time (random walk), upsampled bilinearly and squashed: enough
  structure for a VAE to learn, no dataset needed (tests, smoke runs).
  """
  ch, cw = max(2, height // 8), max(2, width // 8)
  steps = rng.normal(size=(batch, frames, ch, cw, 3)).astype(np.float32) * 0.3
  steps[:, 0] *= 5.0
  coarse = np.cumsum(steps, axis=1)
  video = jax.image.resize(coarse, (batch, frames, height, width, 3), "linear")
  return np.asarray(np.tanh(video), np.float32)


def batches(config: ml_collections.ConfigDict, seed: int) -> Iterator[np.ndarray]:
  """Training videos `[batch, frames, height, width, 3]` in [-1, 1]."""
  d = config.data
  if d.source == "random":
    rng = np.random.default_rng(seed)
    while True:
      yield random_smooth_videos(rng, config.batch_size, d.frames, d.height, d.width)
  from apt2_jax.stages import data as stage_data  # pylint: disable=g-import-not-at-top
  if d.source == "worlds":  # a pool of rendered world clips, cycled (the toy pipeline)
    source = stage_data.WorldClips(config, "train", 0, 1)
  elif d.source == "pipeline":  # the grain pipeline (procedural or TFDS ArrayRecord)
    source = stage_data.PipelineBatches(config, "train", 0, 1)
  else:
    raise ValueError(f"config.data.source={d.source!r} is not 'random', 'worlds' or 'pipeline'")
  for batch in source:
    video = np.asarray(batch["video"])[:, :d.frames]
    if video.dtype == np.uint8:
      video = video.astype(np.float32) / 127.5 - 1.0
    yield video


# ------------------------------------------------------------------------------------------------
# Discriminator (optional adversarial term)
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------


def _merge(trainable, frozen):
  return {"params": {**frozen, **trainable}}


def generator_loss(trainable, frozen, disc_params, video, rng, *, model, disc, teacher, config):
  """Returns (loss, (metrics, reconstruction)). `teacher`: (VAE, params) or None."""
  params = _merge(trainable, frozen)
  lc = config.loss
  metrics = {}
  if config.stage == "vae":
    recon, mean, logvar = model.apply(params, video, rngs={"sample": rng})
    kl = jnp.mean(vae_lib.kl_divergence(mean, logvar)) / math.prod(mean.shape[1:])
    metrics["kl"] = kl
    loss = lc.kl_weight * kl
  else:  # vae_distill: frozen encoder's posterior mean -> trained decoder
    mean, _ = model.apply(params, video, method=vae_lib.VAE.encode)
    mean = jax.lax.stop_gradient(mean)
    recon = model.apply(params, mean, clip=False, method=vae_lib.VAE.decode)
    loss = 0.0
    if teacher is not None and lc.teacher_weight:
      t_model, t_params = teacher
      target = t_model.apply(t_params, mean, clip=False, method=vae_lib.VAE.decode)
      metrics["teacher_l1"] = jnp.mean(jnp.abs(recon - jax.lax.stop_gradient(target)))
      loss = loss + lc.teacher_weight * metrics["teacher_l1"]
  metrics["l1"] = jnp.mean(jnp.abs(recon - video))
  loss = loss + lc.l1_weight * metrics["l1"]
  if disc is not None:
    metrics["g_adv"] = jnp.mean(jax.nn.softplus(-disc.apply(disc_params, recon)))
    loss = loss + lc.adversarial_weight * metrics["g_adv"]
  metrics["loss"] = loss
  return loss, (metrics, recon)


def discriminator_loss(disc_params, video, recon, *, disc):
  real = disc.apply(disc_params, video)
  fake = disc.apply(disc_params, jax.lax.stop_gradient(recon))
  return jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake))


# ------------------------------------------------------------------------------------------------
# Loading and saving
# ------------------------------------------------------------------------------------------------


def _config_to_json(cfg: vae_lib.VAEConfig) -> dict[str, Any]:
  d = dataclasses.asdict(cfg)
  d["dtype"] = jnp.dtype(cfg.dtype).name
  return d


def _config_from_json(d: dict[str, Any]) -> vae_lib.VAEConfig:
  d = dict(d)
  d["dtype"] = jnp.dtype(d.get("dtype", "float32")).type
  for key, value in list(d.items()):
    if isinstance(value, list):
      d[key] = tuple(value)
  return vae_lib.VAEConfig(**d)


# (workdir, step, step directory mtime, overrides) -> (VAE, host copy of its params): a pipeline
# loads the same frozen VAE in every stage and in the evaluation.
_LOADED: dict = {}


def load_vae(path: str, **overrides):
  """(VAE, params) from a `vae`/`vae_distill` workdir or a diffusers `AutoencoderKLWan` folder.

  Workdir loads are cached per checkpoint step (host copies; every call returns fresh arrays)."""
  config_path = os.path.join(path, "vae_config.json")
  if not os.path.exists(config_path):
    from apt2_jax.convert import wan_vae  # pylint: disable=g-import-not-at-top
    params, cfg, _ = wan_vae.import_vae(path, **overrides)
    return vae_lib.VAE(cfg), jax.tree.map(jnp.asarray, params)
  with open(config_path) as f:
    saved = json.load(f)
  cfg = dataclasses.replace(_config_from_json(saved["vae"]), **overrides)
  model = vae_lib.VAE(cfg)
  directory = os.path.join(os.path.abspath(path), "checkpoints")
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {path}/checkpoints")
    key = (directory, step, os.path.getmtime(os.path.join(directory, str(step))), tuple(sorted(overrides.items())))
    if key in _LOADED:
      return model, jax.tree.map(jnp.asarray, _LOADED[key])
    # Restored as saved (no target: the optimizer state is not needed here).
    restored = manager.restore(step, args=ocp.args.StandardRestore())
  frozen = saved.get("frozen_from")
  if frozen:  # decoder-only distillation: the encoder side is the teacher's
    _, teacher_params = load_vae(frozen)
    params = {**teacher_params["params"], **restored["params"]}
  else:
    params = {**vae_lib.init_params(model, jax.random.key(0), 16, 16)["params"], **restored["params"]}
  params = {"params": jax.tree.map(np.asarray, params)}
  _LOADED[key] = params
  return model, jax.tree.map(jnp.asarray, params)


def measure_latent_stats(model, params, videos) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of posterior means over `videos` (a list of batches)."""
  encode = jax.jit(lambda p, v: model.apply(p, v, method=vae_lib.VAE.encode)[0])
  means = np.concatenate([np.asarray(encode(params, v)).reshape(-1, model.config.z_dim)
                          for v in videos])
  std = np.maximum(means.std(axis=0), 1e-6)
  return tuple(float(x) for x in means.mean(axis=0)), tuple(float(x) for x in std)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def _optimizer(config, b1, b2):
  o = config.optimizer
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, o.learning_rate, max(1, o.warmup_steps), max(o.warmup_steps + 1, config.num_steps),
      end_value=o.learning_rate * o.end_factor)
  return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                     optax.adamw(schedule, b1=b1, b2=b2, weight_decay=o.weight_decay))


def train_vae(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs stage `config.stage` ('vae' or 'vae_distill') into `workdir`; resumes from it.

  Returns the last logged metrics.
  """
  validate(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  cfg = vae_config_from(config)
  model = vae_lib.VAE(cfg)
  rng = jax.random.key(config.seed)
  rng, init_rng, disc_rng = jax.random.split(rng, 3)
  params = vae_lib.init_params(model, init_rng, config.data.height, config.data.width)["params"]

  teacher = None
  frozen_from = None
  if config.stage == "vae_distill":
    teacher = load_vae(config.teacher)
    t_params = teacher[1]["params"]
    encoder_side = {k: v for k, v in t_params.items() if k not in DECODER_PARAMS}
    shapes_ok = all(jax.tree.map(lambda a, b: a.shape == b.shape, encoder_side[k], params[k])
                    for k in encoder_side)
    if not shapes_ok:
      raise ValueError("config.teacher's encoder does not match config.vae's encoder")
    frozen = encoder_side
    trainable = {k: v for k, v in params.items() if k in DECODER_PARAMS}
    frozen_from = os.path.abspath(config.teacher)
    # The encoder (hence the latent space and its statistics) is the teacher's.
    t_cfg = teacher[0].config
    cfg = dataclasses.replace(cfg, latents_mean=t_cfg.latents_mean, latents_std=t_cfg.latents_std)
    model = vae_lib.VAE(cfg)
    if not config.loss.teacher_weight:
      teacher = None
  else:
    if config.init_from:  # e.g. Wan2.1's VAE (diffusers folder) or another workdir
      params = load_vae(config.init_from)[1]["params"]
    trainable, frozen = params, {}

  # Data parallel: the batch is split over as many devices as divide it; parameters replicated.
  devices = sharding.config_devices(config)
  devices = devices[:math.gcd(config.batch_size, len(devices))]
  mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))

  g_opt = _optimizer(config, 0.9, 0.99)
  disc = PatchDiscriminator() if config.loss.adversarial_weight > 0 else None
  state = {"step": jnp.zeros((), jnp.int32), "params": trainable,
           "opt_state": g_opt.init(trainable)}
  d_opt = None
  if disc is not None:
    d_opt = _optimizer(config, 0.0, 0.99)
    sample = jnp.zeros((1, config.data.frames, config.data.height, config.data.width, 3))
    state["disc_params"] = disc.init(disc_rng, sample)
    state["disc_opt_state"] = d_opt.init(state["disc_params"])
  state = jax.device_put(state, replicated)
  frozen = jax.device_put(frozen, replicated)
  if teacher is not None:
    teacher = (teacher[0], jax.device_put(teacher[1], replicated))

  manager = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  if manager.latest_step() is not None:
    state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
    logging.info("resumed from step %d", int(state["step"]))

  def train_step(state, frozen, teacher_params, video, rng):
    t = None if teacher is None else (teacher[0], teacher_params)
    loss_fn = lambda p: generator_loss(p, frozen, state.get("disc_params"), video, rng,
                                       model=model, disc=disc, teacher=t, config=config)
    (_, (metrics, recon)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = g_opt.update(grads, state["opt_state"], state["params"])
    new = dict(state, params=optax.apply_updates(state["params"], updates), opt_state=opt_state,
               step=state["step"] + 1)
    if disc is not None:
      d_loss, d_grads = jax.value_and_grad(discriminator_loss)(
          state["disc_params"], video, recon, disc=disc)
      d_updates, d_opt_state = d_opt.update(d_grads, state["disc_opt_state"], state["disc_params"])
      new["disc_params"] = optax.apply_updates(state["disc_params"], d_updates)
      new["disc_opt_state"] = d_opt_state
      metrics["d_loss"] = d_loss
    return new, metrics

  # Shardings: state, frozen parameters and the teacher replicated; the batch split on `data`.
  # The state is donated (updated in place).
  train_step = jax.jit(
      train_step,
      in_shardings=(replicated, replicated, replicated, batch_sharding, replicated),
      out_shardings=(replicated, replicated), donate_argnums=(0,))

  start = int(state["step"])
  data = batches(config, seed=config.seed + start)
  metrics = {}
  from apt2_jax.train import MetricWriter  # the shared trainer's metrics.jsonl + TensorBoard
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  t0 = time.time()
  for step in range(start, config.num_steps):
    video = jax.device_put(next(data), batch_sharding)
    state, metrics = train_step(state, frozen, None if teacher is None else teacher[1], video,
                                jax.random.fold_in(rng, step))
    done = step + 1
    if done % config.log_every == 0 or done == config.num_steps:
      metrics = {k: float(v) for k, v in metrics.items()}
      writer.write(done, metrics)
      rate = (done - start) / max(time.time() - t0, 1e-9)
      eta = (config.num_steps - done) / max(rate, 1e-9)
      logging.info("step %d/%d  %s  (%.2f steps/s, ETA %.0f s)", done, config.num_steps,
                   "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())), rate, eta)
    if done % config.checkpoint_every == 0 or done == config.num_steps:
      manager.save(done, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  manager.close()
  writer.close()

  # Latent statistics of the trained encoder, for `normalize_latents`.
  params = _merge(state["params"], frozen)
  if config.stage == "vae" and config.measure_latent_stats:
    stats_data = batches(config, seed=config.seed + 10_000)
    mean, std = measure_latent_stats(model, params,
                                     [next(stats_data) for _ in range(config.stats_batches)])
    cfg = dataclasses.replace(cfg, latents_mean=mean, latents_std=std)
  with open(os.path.join(workdir, "vae_config.json"), "w") as f:
    json.dump({"vae": _config_to_json(cfg), "stage": config.stage,
               "trainable": sorted(state["params"]), "frozen_from": frozen_from}, f, indent=2)
  return {k: float(v) for k, v in metrics.items()}
