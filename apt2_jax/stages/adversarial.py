"""Stage 3: adversarial post-training with student forcing (AAPT), and long-video training.

Stage "adversarial" (`experiments/stage3_adversarial.py`). Each step, for a batch of real latent
clips `x_0 .. x_S` with their controls:
  1. G (from stage 2) rolls out S frames from the real first frame x_0 exactly as at inference:
     the jitted `lax.scan` of cached 1-NFE steps (`apt2_jax.rollout`), recycling its own outputs
     (detached) and carrying gradients through the KV cache (`adversarial.detach_cache` for the
     Self-Forcing ablation). Variants: `teacher_forcing` (the paper's failed ablation: every block
     recycles the real previous frame, one whole-clip pass) and `recycle=False` (no recycling).
  2. D (backbone from stage 1) scores real and generated clips in one block-causal pass each: the
     judged frame in the noise slot, noised to D's own t ~ U(0, 1) (unshifted), the previous frame
     of the same video in the recycled slot, one logit per latent frame.
  3. `d_steps` D updates on `L_D = softplus(D(fake) - D(real)) + R1 + R2` (approximated R1 on real,
     R2 on fake, lambda * (D(x) - D(x + sigma n))^2), then one G update on
     `L_G = softplus(D(real) - D(fake))`, both RMSProp-like Adam (b1 = 0, b2 = 0.9) by default.
     Gradient accumulation over `microbatches`; EMA of G.

Stage "long_video" (`experiments/stage3_long_video.py`): one long rollout per step, cut into
`num_segments` segments of `segment_frames` latent frames. Each segment continues from the
previous segment's *detached* KV cache and last frame; D scores the segment's frames, with the last
`overlap_frames` generated frames before it as context, against the real clip at the same
positions (the synthetic worlds render long real videos with fresh random control trajectories);
the gradients of every segment are computed right after it and accumulated (a `lax.scan` over
segments), so memory does not grow with the video's length.

State: {params, opt_state, [ema_params], d_params, d_opt_state, counters}.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from apt2_jax import train
from apt2_jax.models import CausalDiT, DiTConfig, init_params, kv_cache
from apt2_jax.models.discriminator import Discriminator, init_discriminator_params, noise_judged
from apt2_jax.objectives import gan
from apt2_jax.rollout import RolloutOptions, rollout
from apt2_jax.stages import common
from apt2_jax.train import data as train_data

VARIANTS = ("student_forcing", "teacher_forcing")


class AdversarialStage(train.Stage):

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    a = config.adversarial
    if a.variant not in VARIANTS:
      raise ValueError(f"config.adversarial.variant={a.variant!r} is not one of {VARIANTS}")
    if a.loss_type not in gan.LOSS_TYPES:
      raise ValueError(f"config.adversarial.loss_type={a.loss_type!r} is not one of {gan.LOSS_TYPES}")
    if int(a.d_steps) < 1:
      raise ValueError(f"config.adversarial.d_steps={a.d_steps} must be >= 1")
    d_from = a.get("d_init_from", "")
    if d_from:
      from apt2_jax import checkpointing
      if not checkpointing.has_checkpoint(d_from):
        raise ValueError(f"config.adversarial.d_init_from={d_from!r} holds no checkpoint")
    self.model_config = DiTConfig.from_dict(config.model)
    if not self.model_config.recycled_channels:
      raise ValueError("config.model.recycled_channels must be True for stage 3")
    self.model = CausalDiT(self.model_config)
    self.disc = Discriminator(self.model_config, tuple(a.d_head_layers))
    self.inputs = common.LatentInputs(config, mesh)
    self.frozen = self.inputs.frozen
    self.tx = train.make_optimizer(config.optimizer, config.num_steps)
    self.d_tx = train.make_optimizer(config.d_optimizer, config.num_steps)
    self.ema_decay = float(config.get("ema_decay", 0.0))
    self.options = RolloutOptions(detach_recycled=bool(a.detach_recycled), detach_cache=bool(a.detach_cache),
                                  recycle=bool(a.recycle), remat=a.rollout_remat)
    self.sigma = gan.perturbation_std(a.sigma, bool(a.get("sigma_is_variance", False)))
    self._eval = None

  # ---------------------------------------------------------------------------------------------
  # State
  # ---------------------------------------------------------------------------------------------
  def init_state(self, rng):
    _, h, w = train_data.latent_shape(self.config)
    k_g, k_d = jax.random.split(rng)
    g = init_params(self.model, k_g, frames=2, latent_hw=(h, w), boxed=True)
    d = init_discriminator_params(self.disc, k_d, frames=2, latent_hw=(h, w), boxed=True)
    state = {"params": g, "opt_state": self.tx.init(g), "d_params": d, "d_opt_state": self.d_tx.init(d),
             **train.init_counters()}
    if self.ema_decay:
      state["ema_params"] = g
    return state

  def load_pretrained(self, state):
    """G from `config.init_from` (stage 2); D's backbone from `adversarial.d_init_from` (stage 1)."""
    state = dict(state)
    key = self.config.get("init_from_key", "ema_params")
    if self.config.get("init_from", ""):
      params = common.load_pretrained_params(self.config, state["params"], self.config.init_from, key,
                                             "config.init_from")
      state.update(params=params, opt_state=self.tx.init(params))
      if self.ema_decay:
        state["ema_params"] = params
    a = self.config.adversarial
    d_from = a.get("d_init_from", "")
    if d_from:
      d_key = a.get("d_init_key", "ema_params")
      if d_key == "d_params":  # a whole stage-3 discriminator (long-video training continues it)
        d_params = _load_like(state["d_params"], d_from, "d_params", "config.adversarial.d_init_from")
      else:  # a generator checkpoint (stage 1) for the backbone; the heads start fresh
        backbone = common.load_pretrained_params(self.config, state["d_params"]["backbone"], d_from, d_key,
                                                 "config.adversarial.d_init_from")
        d_params = dict(state["d_params"], backbone=backbone)
      state.update(d_params=d_params, d_opt_state=self.d_tx.init(d_params))
    return state

  # ---------------------------------------------------------------------------------------------
  # Generator and discriminator passes
  # ---------------------------------------------------------------------------------------------
  def generate(self, params, first, eps, controls, text, real_recycled=None, cache=None):
    """G's frames `[B, S, h, w, C]` after `first` (and the final cache; None for teacher forcing).

    Student forcing streams through the cached rollout; teacher forcing (ablation) runs one
    whole-clip pass with the real previous frames recycled.
    """
    b, _, h, w, _ = first.shape
    if self.config.adversarial.variant == "teacher_forcing":
      v = self.model.apply({"params": params}, eps, real_recycled, controls, jnp.ones((b,)), text,
                           mode="block_causal")
      return eps - v, None
    text_kv = self.model.apply({"params": params}, text, method=CausalDiT.encode_text)
    if cache is None:
      cache = kv_cache.init_cache(self.model_config, b, h, w)
    return rollout(self.model, params, first, text_kv, eps, controls, cache=cache, options=self.options)

  def fake_recycled(self, first, fake, real_recycled):
    """The frame G was conditioned on for each generated frame: its own previous output, or (teacher
    forcing) the real one; D sees it in the recycled slot."""
    if self.config.adversarial.variant == "teacher_forcing":
      return real_recycled
    if not self.options.recycle:
      return jnp.concatenate([first, jnp.zeros_like(fake[:, :-1])], axis=1)
    return jnp.concatenate([first, fake[:, :-1]], axis=1)

  def d_logits(self, d_params, judged, recycled, controls, text, t_d, d_eps):
    x = noise_judged(judged, t_d, d_eps)
    return self.disc.apply({"params": d_params}, x, recycled, controls, t_d, text)

  # ---------------------------------------------------------------------------------------------
  # Losses
  # ---------------------------------------------------------------------------------------------
  def d_logits_many(self, d_params, pairs, mb):
    """D's logits for several (judged, recycled) pairs of one batch in a single pass, the pairs
    stacked on the batch axis (D treats rows independently), with the batch's controls, text,
    t_d and d_eps for each. One pass instead of several keeps the compiled step small."""
    n = len(pairs)
    tile = lambda x: None if x is None else jnp.concatenate([x] * n, axis=0)
    logits = self.d_logits(d_params, jnp.concatenate([p[0] for p in pairs], axis=0),
                           jnp.concatenate([p[1] for p in pairs], axis=0),
                           *(tile(mb[k]) for k in ("controls", "text", "t_d", "d_eps")))
    return jnp.split(logits, n, axis=0)

  def d_loss_fn(self, d_params, mb, mask=None):
    a = self.config.adversarial
    real, fake, real_p, fake_p = self.d_logits_many(d_params, (
        (mb["real"], mb["real_recycled"]), (mb["fake"], mb["fake_recycled"]),
        (mb["real"] + self.sigma * mb["n_real"], mb["real_recycled"]),
        (mb["fake"] + self.sigma * mb["n_fake"], mb["fake_recycled"])), mb)
    if mask is not None:  # long video: only the segment's new frames are judged
      real, fake, real_p, fake_p = (x[:, mask] for x in (real, fake, real_p, fake_p))
    adv = gan.discriminator_loss(real, fake, a.loss_type)
    r1 = gan.approx_penalty(real, real_p, float(a.r1_weight))
    r2 = gan.approx_penalty(fake, fake_p, float(a.r2_weight))
    return adv + r1 + r2, {"d_adv": adv, "r1": r1, "r2": r2, "d_real": jnp.mean(real),
                           "d_fake": jnp.mean(fake), "realism_gap": gan.realism_gap(real, fake)}

  def g_loss_fn(self, params, mb, d_params):
    fake, _ = self.generate(params, mb["first"], mb["eps"], mb["controls"], mb["text"], mb["real_recycled"])
    return self._g_loss_on(d_params, mb, fake, self.fake_recycled(mb["first"], fake, mb["real_recycled"]))

  def _g_loss_on(self, d_params, mb, fake, fake_recycled, mask=None):
    real, fake_logits = self.d_logits_many(d_params, ((mb["real"], mb["real_recycled"]),
                                                      (fake, fake_recycled)), mb)
    real = jax.lax.stop_gradient(real)
    if mask is not None:
      real, fake_logits = real[:, mask], fake_logits[:, mask]
    loss = gan.generator_loss(real, fake_logits, self.config.adversarial.loss_type)
    return loss, {"g_fake_logit": jnp.mean(fake_logits)}

  # ---------------------------------------------------------------------------------------------
  # The step
  # ---------------------------------------------------------------------------------------------
  def draw(self, frozen, batch, rng):
    """Real clip, G's noise, D's times/noise and the R1/R2 perturbations: all randomness up front."""
    latents, controls, text = self.inputs(frozen, batch)
    real_recycled, real, controls = common_clip(latents, controls)
    k = jax.random.split(rng, 5)
    b = real.shape[0]
    return {"first": latents[:, :1], "real": real, "real_recycled": real_recycled, "controls": controls,
            "text": text, "eps": jax.random.normal(k[0], real.shape, jnp.float32),
            "t_d": jax.random.uniform(k[1], (b,), jnp.float32),  # unshifted, as the paper
            "d_eps": jax.random.normal(k[2], real.shape, jnp.float32),
            "n_real": jax.random.normal(k[3], real.shape, jnp.float32),
            "n_fake": jax.random.normal(k[4], real.shape, jnp.float32)}

  def train_step(self, state, frozen, batch, rng):
    micro = int(self.config.get("microbatches", 1))
    mb = self.draw(frozen, batch, rng)
    if micro == 1:
      # One rollout serves both updates: D trains on its (detached) frames, then G's gradient is
      # its loss's gradient w.r.t. those frames (under the updated D) pulled back through the same
      # rollout's VJP. Identical to differentiating a second rollout, at one rollout's cost.
      def frames_of(params):
        fake, _ = self.generate(params, mb["first"], mb["eps"], mb["controls"], mb["text"], mb["real_recycled"])
        return fake
      fake, pullback = jax.vjp(frames_of, state["params"])
    else:  # microbatches bound memory: each G microbatch rolls out again inside its gradient
      fake, _ = self.generate(state["params"], mb["first"], mb["eps"], mb["controls"], mb["text"], mb["real_recycled"])
    fake_d = jax.lax.stop_gradient(fake)
    mb_d = dict(mb, fake=fake_d, fake_recycled=self.fake_recycled(mb["first"], fake_d, mb["real_recycled"]))
    d_params, d_opt_state = state["d_params"], state["d_opt_state"]
    for i in range(int(self.config.adversarial.d_steps)):
      if i:  # fresh D noise for the extra D steps
        ks = jax.random.split(jax.random.fold_in(rng, 1000 + i), 3)
        mb_d = dict(mb_d, t_d=jax.random.uniform(ks[0], mb["t_d"].shape),
                    d_eps=jax.random.normal(ks[1], mb["real"].shape), n_real=jax.random.normal(ks[2], mb["real"].shape))
      d_grads, d_metrics = train.accumulate_gradients(self.d_loss_fn, d_params, mb_d, micro)
      d_params, d_opt_state, d_extra = train.apply_gradients(self.d_tx, d_params, d_opt_state, d_grads)
    if micro == 1:
      def loss_of_frames(frames):
        return self._g_loss_on(d_params, mb, frames, self.fake_recycled(mb["first"], frames, mb["real_recycled"]))
      (g_loss, g_metrics), g_frames = jax.value_and_grad(loss_of_frames, has_aux=True)(fake_d)
      (g_grads,) = pullback(g_frames)
      g_metrics = dict(g_metrics, loss=g_loss)
    else:
      g_grads, g_metrics = train.accumulate_gradients(functools.partial(self.g_loss_fn, d_params=d_params),
                                                      state["params"], mb, micro)
    params, opt_state, g_extra = train.apply_gradients(self.tx, state["params"], state["opt_state"], g_grads)
    return self._finish(state, params, opt_state, d_params, d_opt_state, g_metrics, d_metrics, g_extra, d_extra)

  def _finish(self, state, params, opt_state, d_params, d_opt_state, g_metrics, d_metrics, g_extra, d_extra):
    new = dict(state, params=params, opt_state=opt_state, d_params=d_params, d_opt_state=d_opt_state)
    if self.ema_decay:
      new["ema_params"] = train.ema_update(state["ema_params"], params, self.ema_decay)
    metrics = {k: v for k, v in d_metrics.items() if k != "loss"}
    metrics.update(g_metrics)
    metrics.update(g_loss=g_metrics["loss"], d_loss=d_metrics["loss"], g_grad_norm=g_extra["grad_norm"],
                   d_grad_norm=d_extra["grad_norm"])
    metrics["loss"] = g_metrics["loss"] + d_metrics["loss"]
    return new, metrics

  # ---------------------------------------------------------------------------------------------
  # Evaluation: stream the validation clips with the EMA generator, score them
  # ---------------------------------------------------------------------------------------------
  def evaluate(self, state, frozen, step):
    if self._eval is None:
      self._eval = (common.EvalBatch(self.config, self.mesh).batch, jax.jit(self._eval_fn))
    batch, fn = self._eval
    return {k: float(v) for k, v in jax.device_get(fn(state.get("ema_params", state["params"]),
                                                      state["d_params"], frozen, batch)).items()}

  def _eval_fn(self, params, d_params, frozen, batch):
    mb = self.draw(frozen, batch, jax.random.key(self.config.eval.seed))
    options = RolloutOptions(num_steps=1)
    frames = common.stream_sample(self.model_config, params, mb["first"], mb["text"], mb["controls"],
                                  mb["eps"], options)
    out = common.rollout_metrics(frames, mb["real"])
    args = (mb["controls"], mb["text"], mb["t_d"], mb["d_eps"])
    real = self.d_logits(d_params, mb["real"], mb["real_recycled"], *args)
    fake = self.d_logits(d_params, frames, jnp.concatenate([mb["first"], frames[:, :-1]], 1), *args)
    out["eval_realism_gap"] = gan.realism_gap(real, fake)
    return out


def _load_like(fresh, path, key, source):
  """Loads `path`'s `key` subtree onto `fresh`'s shardings; names every missing or mismatched leaf."""
  from flax import traverse_util
  from apt2_jax import checkpointing
  from apt2_jax import sharding
  flat = traverse_util.flatten_dict(fresh)
  fallback = sharding.replicated(next(iter(flat.values())).sharding.mesh)
  loaded, _ = checkpointing.load_params(path, key=key, shardings=lambda p, shape: flat[p].sharding
                                        if p in flat and tuple(flat[p].shape) == tuple(shape) else fallback)
  got = traverse_util.flatten_dict(loaded)
  missing = sorted("/".join(k) for k in flat if k not in got)
  bad = sorted("/".join(k) for k in flat if k in got and tuple(got[k].shape) != tuple(flat[k].shape))
  if missing or bad:
    raise ValueError(f"{source}: cannot load {key!r}; missing: {missing or 'none'}; shape mismatches: {bad or 'none'}")
  return traverse_util.unflatten_dict({k: got[k] for k in flat})


def common_clip(latents, controls):
  """(recycled x_0..x_{S-1}, judged/target x_1..x_S, controls of x_1..x_S)."""
  from apt2_jax.objectives import flow
  return flow.teacher_forcing_inputs(latents, controls)


# ================================================================================================
# Long-video training
# ================================================================================================

class LongVideoStage(AdversarialStage):
  """Segment-by-segment rollouts with detached caches and per-segment gradient accumulation."""

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    lv = config.long_video
    self.seg, self.overlap, self.num_segments = int(lv.segment_frames), int(lv.overlap_frames), int(lv.num_segments)
    if self.seg < 1 or self.num_segments < 1:
      raise ValueError("config.long_video.segment_frames and num_segments must be >= 1")
    if not 1 <= self.overlap <= self.seg:
      raise ValueError(f"config.long_video.overlap_frames={self.overlap} must be in [1, segment_frames={self.seg}]")
    # D's context before segment 0 (the first frame) is as wide as the overlap after it when the
    # overlap is 1: every segment then has the same shapes and one scanned program serves all.
    self.fold_segments = self.overlap == 1
    if config.adversarial.variant != "student_forcing":
      raise ValueError("long_video training needs config.adversarial.variant='student_forcing'")
    f, _, _ = train_data.latent_shape(config)
    if f != 1 + self.seg * self.num_segments:
      raise ValueError(f"config.data.frames gives {f} latent frames; long_video needs 1 + segment_frames x "
                       f"num_segments = {1 + self.seg * self.num_segments} (video frames "
                       f"{1 + 4 * self.seg * self.num_segments})")

  def _segment(self, params, d_params, seg_in, cache, recycled, context):
    """Gradients of one segment. `context`: [B, K, ...] frames before it (detached) that D sees
    as context (K = 1 for the first segment: the first frame; else `overlap`).

    Returns (g_grads, d_grads, metrics, new cache (detached), last frame, new context)."""
    k = context.shape[1]

    def g_loss(params):
      frames, new_cache = self.generate(params, recycled, seg_in["eps"], seg_in["g_controls"], seg_in["text"],
                                        cache=cache)
      clip = jnp.concatenate([context, frames], axis=1)
      mb = self._d_inputs(seg_in, clip)
      loss, metrics = self._g_loss_on(d_params, mb, clip[:, 1:], clip[:, :-1], mask=slice(k - 1, None))
      return loss, (metrics, frames, new_cache)

    (g_loss_value, (g_metrics, frames, new_cache)), g_grads = jax.value_and_grad(g_loss, has_aux=True)(params)
    frames = jax.lax.stop_gradient(frames)
    clip = jnp.concatenate([context, frames], axis=1)
    mb = dict(self._d_inputs(seg_in, clip), fake=clip[:, 1:], fake_recycled=clip[:, :-1])
    (d_loss_value, d_metrics), d_grads = jax.value_and_grad(
        lambda d: self.d_loss_fn(d, mb, mask=slice(k - 1, None)), has_aux=True)(d_params)
    metrics = dict(d_metrics, **g_metrics, g_loss=g_loss_value, d_loss=d_loss_value)
    return (g_grads, d_grads, metrics, jax.lax.stop_gradient(new_cache), frames[:, -1:],
            frames[:, -self.overlap:])

  def _d_inputs(self, seg_in, clip):
    real_clip = seg_in["real_clip"][:, -clip.shape[1]:]
    return {"real": real_clip[:, 1:], "real_recycled": real_clip[:, :-1],
            "controls": seg_in["d_controls"][:, -(clip.shape[1] - 1):], "text": seg_in["text"],
            "t_d": seg_in["t_d"], "d_eps": seg_in["d_eps"][:, -(clip.shape[1] - 1):],
            "n_real": seg_in["n_real"][:, -(clip.shape[1] - 1):], "n_fake": seg_in["n_fake"][:, -(clip.shape[1] - 1):]}

  def _segment_inputs(self, latents, controls, text, rng, start, first: bool):
    """Inputs of the segment generating latent frames start+1 .. start+seg (`start` may be traced;
    `first` is static). The real clip also spans D's context before the segment: the first frame
    for the first segment, `overlap` frames after that. Slices only, no copies of the video."""
    b, _, h, w, c = latents.shape
    ctx = 1 if first else self.overlap
    width = self.seg + ctx
    real_clip = jax.lax.dynamic_slice_in_dim(latents, start + 1 - ctx, width, axis=1)
    ks = jax.random.split(jax.random.fold_in(rng, start), 5)
    shape = (b, width - 1, h, w, c)
    seg = {"real_clip": real_clip, "text": text,
           "eps": jax.random.normal(ks[0], (b, self.seg, h, w, c)),
           "t_d": jax.random.uniform(ks[1], (b,)), "d_eps": jax.random.normal(ks[2], shape),
           "n_real": jax.random.normal(ks[3], shape), "n_fake": jax.random.normal(ks[4], shape),
           "g_controls": None, "d_controls": None}
    if controls is not None:
      seg["g_controls"] = jax.lax.dynamic_slice_in_dim(controls, start + 1, self.seg, axis=1)
      seg["d_controls"] = jax.lax.dynamic_slice_in_dim(controls, start + 2 - ctx, width - 1, axis=1)
    return seg

  def train_step(self, state, frozen, batch, rng):
    latents, controls, text = self.inputs(frozen, batch)
    params, d_params = state["params"], state["d_params"]
    b, _, h, w, _ = latents.shape
    cache = kv_cache.init_cache(self.model_config, b, h, w)
    first = latents[:, :1]

    def body(carry, k):
      g_acc, d_acc, cache, last, context = carry
      seg_in = self._segment_inputs(latents, controls, text, rng, k * self.seg, False)
      g, d, m, cache, last, context = self._segment(params, d_params, seg_in, cache, last, context)
      return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, d_acc, d), cache, last, context), m

    if self.fold_segments:  # one segment program instead of two: half the compile
      zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
      (g_acc, d_acc, cache, last, context), seg_metrics = jax.lax.scan(
          body, (zeros(params), zeros(d_params), cache, first, first), jnp.arange(self.num_segments))
      metrics = jax.tree.map(lambda s: jnp.sum(s) / self.num_segments, seg_metrics)
    else:
      # Segment 0 continues from the real first frame (D context: the first frame).
      g_acc, d_acc, metrics, cache, last, context = self._segment(
          params, d_params, self._segment_inputs(latents, controls, text, rng, 0, True), cache, first, first)
      if self.num_segments > 1:
        (g_acc, d_acc, cache, last, context), seg_metrics = jax.lax.scan(
            body, (g_acc, d_acc, cache, last, context), jnp.arange(1, self.num_segments))
        metrics = jax.tree.map(lambda a, s: (a + jnp.sum(s)) / self.num_segments, metrics, seg_metrics)
    scale = 1.0 / self.num_segments
    g_grads = jax.tree.map(lambda g: g * scale, g_acc)
    d_grads = jax.tree.map(lambda g: g * scale, d_acc)
    d_params, d_opt_state, d_extra = train.apply_gradients(self.d_tx, d_params, state["d_opt_state"], d_grads)
    params, opt_state, g_extra = train.apply_gradients(self.tx, params, state["opt_state"], g_grads)
    new = dict(state, params=params, opt_state=opt_state, d_params=d_params, d_opt_state=d_opt_state)
    if self.ema_decay:
      new["ema_params"] = train.ema_update(state["ema_params"], params, self.ema_decay)
    metrics = dict(metrics, g_grad_norm=g_extra["grad_norm"], d_grad_norm=d_extra["grad_norm"],
                   loss=metrics["g_loss"] + metrics["d_loss"])
    return new, metrics


def make_stage(config, mesh):
  if config.stage == "long_video":
    return LongVideoStage(config, mesh)
  return AdversarialStage(config, mesh)
