"""Stage 0 "pretrain" (bidirectional video diffusion) and stage 1 "adapt" (diffusion adaptation).

Both are rectified flow with one shifted t per clip (`apt2_jax.objectives.flow`):
  pretrain  mode "full", input `[noise | control]` (`model.recycled_channels=False`): every frame
            of the clip is noised and denoised jointly, target `eps - x`.
  adapt     mode "block_causal", teacher forcing: block s holds the noised frame s + 1, the clean
            recycled frame s and the control of frame s + 1; target `eps_s - x_{s+1}`, shifted by
            one frame. `init_from` a stage-0 (or Wan2.1) checkpoint widens the patch embedding.
Caption dropout (`config.caption_dropout`) lets the baseline sample with classifier-free guidance.

State: {params, opt_state, [ema_params], step, nonfinite_in_a_row, nonfinite_total}.
Eval: the flow loss on a fixed validation batch at fixed times, and (adapt) a streamed sample of
the validation clips with the multi-step Euler sampler through `apt2_jax.rollout`, scored against
the ground-truth latents (`rollout_mse*`). The sampler's context matches training
(`eval.sample_cache_from = "matched"`, the default: one KV cache per schedule time, every context
frame at the time of the block being denoised, as stage 1's one t per clip).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from apt2_jax import train
from apt2_jax.models import CausalDiT, DiTConfig, init_params
from apt2_jax.objectives import flow
from apt2_jax.rollout import RolloutOptions
from apt2_jax.stages import common
from apt2_jax.train import data as train_data


class DiffusionStage(train.Stage):

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    self.model_config = DiTConfig.from_dict(config.model)
    if config.stage == "pretrain" and self.model_config.recycled_channels:
      raise ValueError("config.model.recycled_channels must be False for stage 'pretrain' (plain video diffusion)")
    if config.stage == "adapt" and not self.model_config.recycled_channels:
      raise ValueError("config.model.recycled_channels must be True for stage 'adapt' (teacher forcing)")
    self.model = CausalDiT(self.model_config)
    self.mode = "full" if config.stage == "pretrain" else "block_causal"
    self.inputs = common.LatentInputs(config, mesh)
    self.frozen = self.inputs.frozen
    self.schedule = train.learning_rate_schedule(config.optimizer, config.num_steps)
    self.tx = train.make_optimizer(config.optimizer, config.num_steps)
    self.ema_decay = float(config.get("ema_decay", 0.0))
    self._eval = None

  # ---------------------------------------------------------------------------------------------
  def init_state(self, rng):
    f, h, w = train_data.latent_shape(self.config)
    params = init_params(self.model, rng, frames=2, latent_hw=(h, w), boxed=True)
    state = {"params": params, "opt_state": self.tx.init(params), **train.init_counters()}
    if self.ema_decay:
      state["ema_params"] = params
    return state

  def load_pretrained(self, state):
    if not self.config.get("init_from", ""):
      return state
    params = common.load_pretrained_params(self.config, state["params"], self.config.init_from,
                                           self.config.get("init_from_key", "ema_params"),
                                           "config.init_from")
    state = dict(state, params=params, opt_state=self.tx.init(params))
    if self.ema_decay:
      state["ema_params"] = params
    return state

  # ---------------------------------------------------------------------------------------------
  def draw(self, frozen, batch, rng):
    """All randomness of a step, up front (so microbatches reproduce the whole batch)."""
    latents, controls, text = self.inputs(frozen, batch)
    rng_t, rng_eps, rng_drop = jax.random.split(rng, 3)
    if self.mode == "full":
      x0, recycled = latents, None
    else:
      recycled, x0, controls = flow.teacher_forcing_inputs(latents, controls, bool(self.config.get("recycle", True)))
    out = {"x0": x0, "eps": jax.random.normal(rng_eps, x0.shape, jnp.float32),
           "t": flow.sample_time(rng_t, x0.shape[0], self.config.flow.shift),
           "text": common.caption_dropout(rng_drop, text, float(self.config.get("caption_dropout", 0.0)))}
    if recycled is not None:
      out["recycled"] = recycled
    if controls is not None:
      out["control"] = controls
    return out

  def loss_fn(self, params, mb):
    xt = flow.noisy(mb["x0"], mb["eps"], mb["t"])
    v = self.model.apply({"params": params}, xt, mb.get("recycled"), mb.get("control"), mb["t"], mb["text"],
                         mode=self.mode)
    w = flow.loss_weight(mb["t"], float(self.config.flow.get("weight_t", 0.0)))
    return jnp.mean(w * flow.mse(v, flow.velocity_target(mb["x0"], mb["eps"]), self.inputs.loss_weights)), {}

  def train_step(self, state, frozen, batch, rng):
    mb = self.draw(frozen, batch, rng)
    grads, metrics = train.accumulate_gradients(self.loss_fn, state["params"], mb,
                                                int(self.config.get("microbatches", 1)))
    params, opt_state, extra = train.apply_gradients(self.tx, state["params"], state["opt_state"], grads)
    new = dict(state, params=params, opt_state=opt_state)
    if self.ema_decay:
      new["ema_params"] = train.ema_update(state["ema_params"], params, self.ema_decay)
    return new, dict(metrics, **extra, learning_rate=self.schedule(state["step"]))

  # ---------------------------------------------------------------------------------------------
  def evaluate(self, state, frozen, step):
    if self._eval is None:
      self._eval = (common.EvalBatch(self.config, self.mesh).batch, jax.jit(self._eval_fn))
    batch, fn = self._eval
    params = state.get("ema_params", state["params"])
    return {k: float(v) for k, v in jax.device_get(fn(params, frozen, batch)).items()}

  def _eval_fn(self, params, frozen, batch):
    ev = self.config.eval
    mb = self.draw(frozen, batch, jax.random.key(ev.seed))
    # The same noise at a few fixed times: a low-variance validation loss to compare checkpoints.
    losses = {}
    for t in ev.loss_times:
      mbt = dict(mb, t=jnp.full_like(mb["t"], t))
      losses[f"loss_t{t:g}"] = self.loss_fn(params, mbt)[0]
    out = dict(losses, loss=jnp.mean(jnp.stack(list(losses.values()))))
    if self.mode == "block_causal" and ev.sample_steps:
      out.update(self.sample_metrics(params, frozen, batch, ev.sample_steps, ev.sample_shift, ev.guidance,
                                     ev.get("sample_cache_from", "matched")))
    return out

  def sample_metrics(self, params, frozen, batch, num_steps, shift, guidance, cache_from="matched"):
    """Streams the validation clips from their true first frame and controls (Euler sampler; its
    KV cache per `cache_from`, `apt2_jax.rollout`)."""
    latents, controls, text = self.inputs(frozen, batch)
    noise = jax.random.normal(jax.random.key(self.config.eval.seed + 1), latents[:, 1:].shape)
    options = RolloutOptions(num_steps=num_steps, shift=shift, cache_from=cache_from)
    frames = common.stream_sample(self.model_config, params, latents[:, :1], text,
                                  None if controls is None else controls[:, 1:], noise, options, guidance)
    return common.rollout_metrics(frames, latents[:, 1:])


def make_stage(config, mesh):
  return DiffusionStage(config, mesh)
