"""Stage 3: adversarial post-training with student forcing (AAPT).

Stage "adversarial" (`experiments/stage3_adversarial.py`). Each step, for a batch of real latent
clips `x_0 .. x_S` with their controls:
  1. G (from stage 2) rolls out S frames from the real first frame x_0 exactly as at inference:
     the jitted `lax.scan` of cached 1-NFE steps (`apt2_jax.rollout`), recycling its own outputs
     (detached) and carrying gradients through the KV cache (`adversarial.detach_cache` for the
     Self-Forcing ablation). Variants: `teacher_forcing` (the paper's failed ablation: every block
     recycles the real previous frame, one whole-clip pass) and `recycle=False` (no recycling).
  2. D (backbone from stage 1) scores real and generated clips in one block-causal pass each: the
     judged frame in the noise slot, noised to D's own t ~ U(0, 1) (unshifted), the previous frame
     of the same video in the recycled slot, one logit per latent frame. Under teacher forcing D
     judges each generated frame i in the context of the REAL frames < i, as G produced it
     (`teacher_forced_logits`: D's cached step over the real clip's KV cache).
  3. `d_steps` D updates on `L_D = softplus(D(fake) - D(real)) + R1 + R2` (approximated R1 on real,
     R2 on fake, lambda * (D(x) - D(x + sigma n))^2), then one G update on
     `L_G = softplus(D(real) - D(fake))`, both RMSProp-like Adam (b1 = 0, b2 = 0.9) by default.
     Gradient accumulation over `microbatches`; EMA of G. G's gradient pass runs after D's update
     and rolls out again (`adversarial.g_pass`), so the step's peak is the larger of the two passes;
     the rollout's backward pass keeps one evicted ring slot per step (`rollout_backward`).
     Sharding (`g_sharding`, `d_sharding`; `apt2_jax/sharding.py`): ZeRO-2 for G (its weights
     gathered once per pass, not per rollout step), ZeRO-3 for D, as the paper.

Long-video training (stage "long_video") builds on this stage: `apt2_jax/stages/long_video.py`.

State: {params, opt_state, [ema_params], d_params, d_opt_state, counters}.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from apt2_jax import sharding, train
from apt2_jax.models import CausalDiT, DiTConfig, init_params, kv_cache, rope
from apt2_jax.models import dit
from apt2_jax.models.conditioning import TimeTextEmbedder
from apt2_jax.models.discriminator import Discriminator, init_discriminator_params, noise_judged
from apt2_jax.objectives import gan
from apt2_jax import rollout as rollout_lib
from apt2_jax.rollout import RolloutOptions, rollout
from apt2_jax.stages import common
from apt2_jax.train import data as train_data

VARIANTS = ("student_forcing", "teacher_forcing")
# G's gradient after D's update: roll out again ("recompute": G's and D's passes never hold their
# buffers at once) or pull back through the rollout D trained on ("keep": one rollout fewer, its
# VJP residuals live through D's update).
G_PASSES = ("recompute", "keep")


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
    backward = a.get("rollout_backward", "ring")
    if backward not in rollout_lib.BACKWARDS:
      raise ValueError(f"config.adversarial.rollout_backward={backward!r} is not one of {rollout_lib.BACKWARDS}")
    self.g_pass = a.get("g_pass", "recompute")
    if self.g_pass not in G_PASSES:
      raise ValueError(f"config.adversarial.g_pass={self.g_pass!r} is not one of {G_PASSES}")
    self.options = RolloutOptions(detach_recycled=bool(a.detach_recycled), detach_cache=bool(a.detach_cache),
                                  recycle=bool(a.recycle), remat=a.rollout_remat, backward=backward)
    self.zero = {"g": a.get("g_sharding", "zero3"), "d": a.get("d_sharding", "zero3")}
    for name, value in self.zero.items():
      if value not in sharding.ZERO:
        raise ValueError(f"config.adversarial.{name}_sharding={value!r} is not one of {sharding.ZERO}")
    if int(a.get("d_clips_per_pass", 0)) < 0:
      raise ValueError(f"config.adversarial.d_clips_per_pass={a.d_clips_per_pass} must be >= 0 (0: all in one pass)")
    self._logical_specs = None
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
  def whole(self, which: str, params, after=None):
    """G's ("g") or D's ("d") parameters for this step's passes: under "zero2"
    (`adversarial.{which}_sharding`, `sharding.gather_whole`) gathered whole once, so that the
    rollout's recurrent forwards and the remat passes reuse them; under "zero3" as stored."""
    if self.zero[which] != "zero2":
      return params
    if self._logical_specs is None:  # traced once: the logical axes of the state's boxed init
      boxed = jax.eval_shape(self.init_state, jax.random.key(0))
      self._logical_specs = {"g": nn.get_partition_spec(boxed["params"]),
                             "d": nn.get_partition_spec(boxed["d_params"])}
    return sharding.gather_whole(params, self._logical_specs[which], jnp.dtype(self.model_config.dtype), after)

  def generate(self, params, first, eps, controls, text, real_recycled=None, cache=None):
    """G's frames `[B, S, h, w, C]` after `first` (and the final cache; None for teacher forcing).

    Student forcing streams through the cached rollout; teacher forcing (ablation) runs one
    whole-clip pass with the real previous frames recycled. Under ZeRO-2 the rollout gathers G's
    weights once (`rollout(gather=)`: each step's gradient goes back onto the shards), after `eps`
    (a G pass after D's update takes noise that depends on D's new weights: its gather is its own).
    """
    b, _, h, w, _ = first.shape
    if self.config.adversarial.variant == "teacher_forcing":
      v = self.model.apply({"params": self.whole("g", params, after=eps)}, eps, real_recycled, controls,
                           jnp.ones((b,)), text, mode="block_causal")
      return eps - v, None
    text_kv = self.model.apply({"params": params}, text, method=CausalDiT.encode_text)
    if cache is None:
      cache = kv_cache.init_cache(self.model_config, b, h, w)
    gather = None if self.zero["g"] != "zero2" else lambda p: self.whole("g", p, after=eps)
    return rollout(self.model, params, first, text_kv, eps, controls, cache=cache, options=self.options,
                   gather=gather)

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
    """D's logits for several (judged, recycled, is_real) triples of one batch in a single pass,
    stacked on the batch axis (D treats rows independently), with the batch's t_d and d_eps for
    each and its controls and text: the real side's own (`real_controls`, `real_text`) where
    real clips are unpaired (long video), else the shared ones. One pass instead of several keeps
    the compiled step small; `adversarial.d_clips_per_pass` = k > 0 runs a `lax.map` of passes of
    k clips each instead, so that D's backward holds one pass's attention buffers, not all four
    clips' (the stage-3 step's peak at the paper sizes; 1 if k does not divide the clips)."""
    side = lambda key, real: mb.get("real_" + key, mb[key]) if real else mb[key]
    cat = lambda xs: None if xs[0] is None else jnp.concatenate(xs, axis=0)
    per_pass = int(self.config.adversarial.get("d_clips_per_pass", 0)) or len(pairs)
    if len(pairs) % per_pass:
      per_pass = 1
    groups = [pairs[i:i + per_pass] for i in range(0, len(pairs), per_pass)]
    inputs = [(cat([p[0] for p in g]), cat([p[1] for p in g]), cat([side("controls", p[2]) for p in g]),
               cat([side("text", p[2]) for p in g]), cat([mb["t_d"]] * len(g)), cat([mb["d_eps"]] * len(g)))
              for g in groups]
    if len(groups) == 1:
      logits = self.d_logits(d_params, *inputs[0])
    else:  # one pass per group, in sequence (`d_clips_per_pass`): a group's buffers at a time
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *inputs)
      logits = jax.lax.map(lambda args: self.d_logits(d_params, *args), stacked)
      logits = logits.reshape((-1,) + logits.shape[2:])
    return jnp.split(logits, len(pairs), axis=0)

  def judge(self, d_params, mb, reals, fakes):
    """D's logits `[B, S]`: (one per real clip of `reals` (judged frames, with the batch's real
    recycled frames), one per generated clip of `fakes` ((judged, recycled) pairs)).

    Student forcing: every clip in its own context, one block-causal pass for all. Teacher forcing
    (ablation): the generated frames in the real clip's context (`teacher_forced_logits`). Under
    ZeRO-2 for D its weights are gathered once here for all these passes."""
    d_params = self.whole("d", d_params)
    real_pairs = [(x, mb["real_recycled"], True) for x in reals]
    if self.config.adversarial.variant == "teacher_forcing":
      return self.d_logits_many(d_params, real_pairs, mb), self.teacher_forced_logits(d_params, mb, [x for x, _ in fakes])
    logits = self.d_logits_many(d_params, real_pairs + [(x, r, False) for x, r in fakes], mb)
    return logits[:len(reals)], logits[len(reals):]

  def teacher_forced_logits(self, d_params, mb, fakes):
    """D's logit of each generated frame i judged with the REAL frames < i as its context (the
    teacher-forcing ablation: G made frame i from real frames), for each clip `fakes` [B, S, ...].

    A `lax.scan` of D's cached step over the real clip: at block i the generated frames' blocks
    (judged slot: generated frame i noised to t_d; recycled slot: the real frame i - 1, as G saw
    it; frame i's control) attend to D's KV cache of the real blocks < i; then the real block i is
    written into it. Exactly S block-causal passes over the real clip with block i replaced by the
    generated one (tests/test_stage3.py), for the cost of (1 + len(fakes)) whole-clip passes.
    Returns a list of [B, S] logits."""
    c, backbone = self.model_config, d_params["backbone"]
    b, _, h, w, _ = mb["real"].shape
    fake = jnp.stack([noise_judged(x, mb["t_d"], mb["d_eps"]) for x in fakes])  # [n, B, S, ...]
    xs = (_frames_first(noise_judged(mb["real"], mb["t_d"], mb["d_eps"])), _frames_first(fake, 2),
          _frames_first(mb["real_recycled"]), _frames_first(mb["controls"]))
    text_kv = CausalDiT(c).apply({"params": backbone}, mb["text"], method=CausalDiT.encode_text)

    def body(cache, inputs):
      real_i, fake_i, recycled_i, control_i = inputs
      step = lambda x, cache: _BackboneStep(c).apply({"params": backbone}, x, recycled_i, control_i, mb["t_d"],
                                                      cache, text_kv)
      hidden, _ = jax.vmap(lambda x: step(x, cache))(fake_i)  # [n, L, B, 1, P, dim]
      logits = jax.vmap(lambda x: self.disc.apply({"params": d_params}, x, method=_head_logits))(hidden)
      return step(real_i, cache)[1], logits[..., 0]  # [n, B]

    if self.options.remat != "none":
      body = jax.checkpoint(body, policy=dit.REMAT_POLICIES[self.options.remat], prevent_cse=False)
    _, logits = jax.lax.scan(body, kv_cache.init_cache(c, b, h, w), xs)  # [S, n, B]
    return list(jnp.moveaxis(logits, 0, -1))

  def d_loss_fn(self, d_params, mb, mask=None):
    a = self.config.adversarial
    (real, real_p), (fake, fake_p) = self.judge(
        d_params, mb, [mb["real"], mb["real"] + self.sigma * mb["n_real"]],
        [(mb["fake"], mb["fake_recycled"]), (mb["fake"] + self.sigma * mb["n_fake"], mb["fake_recycled"])])
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
    (real,), (fake_logits,) = self.judge(d_params, mb, [mb["real"]], [(fake, fake_recycled)])
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
    keep = micro == 1 and self.g_pass == "keep"
    if keep:
      # One rollout serves both updates: D trains on its (detached) frames, then G's gradient is
      # its loss's gradient w.r.t. those frames (under the updated D) pulled back through the same
      # rollout's VJP. One rollout fewer, but its residuals live through D's update.
      def frames_of(params):
        fake, _ = self.generate(params, mb["first"], mb["eps"], mb["controls"], mb["text"], mb["real_recycled"])
        return fake
      fake, pullback = jax.vjp(frames_of, state["params"])
    else:  # G rolls out again inside its gradient, after D's update
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
    if keep:
      def loss_of_frames(frames):
        return self._g_loss_on(d_params, mb, frames, self.fake_recycled(mb["first"], frames, mb["real_recycled"]))
      (g_loss, g_metrics), g_frames = jax.value_and_grad(loss_of_frames, has_aux=True)(fake_d)
      (g_grads,) = pullback(g_frames)
      g_metrics = dict(g_metrics, loss=g_loss)
    else:
      # G's rollout waits for D's update, so the step's peak is the larger of the two passes.
      g_grads, g_metrics = train.accumulate_gradients(functools.partial(self.g_loss_fn, d_params=d_params),
                                                      state["params"], dict(mb, eps=after(mb["eps"], d_params)), micro)
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


def after(x, tree):
  """`x`, made to depend on `tree` so that XLA computes `tree` first (XLA:CPU drops optimisation
  barriers before it schedules). Adds 0 x one element of `tree`: exact while that is finite (a
  non-finite one poisons the step anyway)."""
  leaf = jax.tree.leaves(tree)[0]
  return x + jnp.zeros((), x.dtype) * leaf[(0,) * leaf.ndim].astype(x.dtype)


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


class _BackboneStep(CausalDiT):
  """CausalDiT's cached step (same parameters) returning the hidden states after every block,
  `[L, B, 1, P, dim]` for D's heads, and the new cache. Interim, until `apt2_jax.models` offers
  it (`CausalDiT(mode="step", return_hidden=True)` and a `Discriminator.step`)."""

  @nn.compact
  def __call__(self, noise, recycled, control, t, cache, text_kv):
    c = self.config
    b, _, hh, ww, _ = noise.shape
    x = self._embed_inputs(noise, recycled, control)
    _, mod = TimeTextEmbedder(c, name="condition_embedder").time(jnp.broadcast_to(t[:, None], (b, 1)))
    _, ph, pw = c.patch_size
    ctx = {"mod": mod, "index": cache["index"],
           "spatial": jnp.asarray(rope.spatial_angles(hh // ph, ww // pw, c.head_dim, c.rope_theta))}
    layer_cache = {k: cache[k] for k in ("sink_k", "sink_v", "ring_k", "ring_v")}
    _, ys = dit._stack(c, "step", True)(x, {"cache": layer_cache, "text_kv": text_kv}, ctx)  # pylint: disable=protected-access
    return ys["hidden"], dict(ys["cache"], index=cache["index"] + 1)


def _frames_first(x, axis=1):
  """Scan inputs over frames: [..., S (at `axis`), ...] -> [S, ..., 1, ...] (None stays None)."""
  return None if x is None else jnp.expand_dims(jnp.moveaxis(x, axis, 0), axis + 1)


def _head_logits(disc: Discriminator, hidden):
  """`Discriminator`'s per-frame logits `[B, F]` from its backbone's hidden states (as in its
  `__call__`; interim, with `_BackboneStep`)."""
  pooled = [head(hidden[l - 1]) for l, head in zip(disc._layers, disc.heads)]  # pylint: disable=protected-access
  return disc.out_proj(disc.out_norm(jnp.concatenate(pooled, axis=-1)))[..., 0].astype(jnp.float32)


def make_stage(config, mesh):
  return AdversarialStage(config, mesh)
