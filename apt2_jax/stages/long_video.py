"""Stage 3b "long_video": long rollouts in segments, judged against unpaired real short clips.

Each step rolls out one long video per rollout row, cut into `num_segments` segments of
`segment_frames` latent frames. Each segment continues from the previous segment's *detached* KV
cache and last frame; D scores the segment's frames (with the last `overlap_frames` generated
frames before it as context) against *independent real short clips* of the same width: the long
rollout needs only a real first frame, its prompt and a control trajectory, never a long real
video (the paper's point). The gradients of every segment are computed right after it and
accumulated (a `lax.scan` over segments), so memory does not grow with the video's length. Each
segment's rollout continues from a non-empty cache with the ring-cache backward pass
(`apt2_jax.rollout`: one evicted slot per step, not the whole cache), and D's pass follows G's.

Batch layout (the loop's one data iterator, `config.batch_size` = 2B rows of `config.data.frames`
video frames; its state is checkpointed with the run, so a resumed run sees the same batches):
  even rows 0, 2, ..  the B long rollouts' conditions: the real first frame (only video frame 0 is
                      encoded), the prompt and the per-frame controls of the whole long video;
                      the rest of these clips is never read.
  odd rows  1, 3, ..  the real side of D: B clips independent of the rollouts. Segment k takes from
                      each a window of `segment_frames` + context latent frames (context: 1 for
                      segment 0, `overlap_frames` after) with its own controls and prompt: for
                      segment 0 the clip's start (its context is a real first frame, as the
                      generated segment's is), later a random start >= 1 per row and segment.
                      Any real clips of that many latent frames would do; these are the data's
                      clips of the batch's one shape.
Rows alternate so that with an even number of rows per device both halves stay on it. Real and
generated rows are paired by position in the relativistic loss (unpaired in content).

State and optimisers: those of stage 3 (`apt2_jax.stages.adversarial`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from apt2_jax import train
from apt2_jax.models import kv_cache
from apt2_jax.stages import common
from apt2_jax.stages.adversarial import AdversarialStage, after
from apt2_jax.train import data as train_data


def batch_rows(batch, parity: int):
  """The even (`parity` 0: rollout conditions) or odd (1: real clips) rows of a batch dict."""
  return {k: v.reshape((v.shape[0] // 2, 2) + v.shape[1:])[:, parity] for k, v in batch.items()}


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
    if int(config.batch_size) % 2:
      raise ValueError(f"config.batch_size={config.batch_size} must be even for long_video: even rows condition "
                       "the rollouts, odd rows are the real clips")
    # D's context before segment 0 (the first frame) is as wide as the overlap after it when the
    # overlap is 1: every segment then has the same shapes and one scanned program serves all.
    self.fold_segments = self.overlap == 1
    if config.adversarial.variant != "student_forcing":
      raise ValueError("long_video training needs config.adversarial.variant='student_forcing'")
    self.frames, _, _ = train_data.latent_shape(config)
    if self.frames != 1 + self.seg * self.num_segments:
      raise ValueError(f"config.data.frames gives {self.frames} latent frames; long_video needs 1 + segment_frames x "
                       f"num_segments = {1 + self.seg * self.num_segments} (video frames "
                       f"{1 + 4 * self.seg * self.num_segments})")

  # ---------------------------------------------------------------------------------------------
  # Inputs
  # ---------------------------------------------------------------------------------------------
  def rollout_inputs(self, frozen, batch):
    """(first latent frame [B, 1, h, w, C], controls [B, F, h, w, Cc] or None, text) of the
    rollouts: only video frame 0 is encoded (the causal VAE's latent frame 0 is frame 0 alone)."""
    if "latents" in batch:
      first = batch["latents"][:, :1].astype(jnp.float32)
    else:
      first = self.inputs.encode(frozen, batch["video"][:, :1])
    controls = None
    if self.model_config.control_channels:
      _, _, h, w, _ = first.shape
      controls = common.latent_controls(batch["controls"].astype(jnp.float32), self.frames, h, w,
                                        self.inputs.control_encoding)
    return first, controls, batch["text_tokens"]

  def real_windows(self, real, rng, k, ctx: int):
    """Segment k's real clips `[B, seg + ctx, ...]` and the controls of their judged frames: from
    each real clip, the window at 0 (segment 0) or at a random start >= 1 (`k` may be traced)."""
    latents, controls, text = real
    b, f = latents.shape[:2]
    width = self.seg + ctx
    start = jax.random.randint(jax.random.fold_in(rng, k), (b,), 1, max(f - width, 0) + 1)
    start = jnp.where(k == 0, 0, start)
    window = lambda x, n, off: jax.vmap(lambda r, s: jax.lax.dynamic_slice_in_dim(r, s + off, n, axis=0))(x, start)
    clip = window(latents, width, 0)
    return {"real_clip": clip, "real_controls": None if controls is None else window(controls, width - 1, 1),
            "real_text": text}

  def _segment_inputs(self, cond, real, rng, start, first: bool):
    """Inputs of the segment generating latent frames start+1 .. start+seg (`start` may be traced;
    `first` is static): G's noise and controls, D's times, noise and the controls of the generated
    clip including its context (the first frame for the first segment, `overlap` frames after),
    and the real windows. Slices only, no copies of the video."""
    first_frame, controls, text = cond
    b, _, h, w, c = first_frame.shape
    ctx = 1 if first else self.overlap
    shape = (b, self.seg + ctx - 1, h, w, c)
    ks = jax.random.split(jax.random.fold_in(rng, start), 6)
    seg = {"text": text, "eps": jax.random.normal(ks[0], (b, self.seg, h, w, c)),
           "t_d": jax.random.uniform(ks[1], (b,)), "d_eps": jax.random.normal(ks[2], shape),
           "n_real": jax.random.normal(ks[3], shape), "n_fake": jax.random.normal(ks[4], shape),
           "g_controls": None, "d_controls": None,
           **self.real_windows(real, ks[5], start // self.seg, ctx)}
    if controls is not None:
      seg["g_controls"] = jax.lax.dynamic_slice_in_dim(controls, start + 1, self.seg, axis=1)
      seg["d_controls"] = jax.lax.dynamic_slice_in_dim(controls, start + 2 - ctx, self.seg + ctx - 1, axis=1)
    return seg

  def _d_inputs(self, seg_in, clip):
    """D's batch for a generated clip [context | segment] and the segment's real windows."""
    real = seg_in["real_clip"]
    return {"real": real[:, 1:], "real_recycled": real[:, :-1], "real_controls": seg_in["real_controls"],
            "real_text": seg_in["real_text"], "fake": clip[:, 1:], "fake_recycled": clip[:, :-1],
            **{k: seg_in[k] for k in ("text", "t_d", "d_eps", "n_real", "n_fake")},
            "controls": seg_in["d_controls"]}

  # ---------------------------------------------------------------------------------------------
  # One segment, the step
  # ---------------------------------------------------------------------------------------------
  def _segment(self, params, d_params, seg_in, cache, recycled, context):
    """Gradients of one segment. `context`: [B, K, ...] frames before it (detached) that D sees
    as context (K = 1 for the first segment: the first frame; else `overlap`).

    Returns (g_grads, d_grads, metrics, new cache (detached), last frame, new context)."""
    mask = slice(context.shape[1] - 1, None)

    def g_loss(params):
      frames, new_cache = self.generate(params, recycled, seg_in["eps"], seg_in["g_controls"], seg_in["text"],
                                        cache=cache)
      clip = jnp.concatenate([context, frames], axis=1)
      loss, metrics = self._g_loss_on(d_params, self._d_inputs(seg_in, clip), clip[:, 1:], clip[:, :-1], mask=mask)
      return loss, (metrics, frames, new_cache)

    (g_loss_value, (g_metrics, frames, new_cache)), g_grads = jax.value_and_grad(g_loss, has_aux=True)(params)
    # D's pass waits for G's gradient: G's rollout residuals never live through it.
    frames = after(jax.lax.stop_gradient(frames), g_grads)
    mb = self._d_inputs(seg_in, jnp.concatenate([context, frames], axis=1))
    (d_loss_value, d_metrics), d_grads = jax.value_and_grad(
        lambda d: self.d_loss_fn(d, mb, mask=mask), has_aux=True)(d_params)
    metrics = dict(d_metrics, **g_metrics, g_loss=g_loss_value, d_loss=d_loss_value)
    return (g_grads, d_grads, metrics, jax.lax.stop_gradient(new_cache), frames[:, -1:],
            frames[:, -self.overlap:])

  def train_step(self, state, frozen, batch, rng):
    cond = self.rollout_inputs(frozen, batch_rows(batch, 0))
    real = self.inputs(frozen, batch_rows(batch, 1))
    params, d_params = state["params"], state["d_params"]
    first = cond[0]
    b, _, h, w, _ = first.shape
    cache = kv_cache.init_cache(self.model_config, b, h, w)

    def body(carry, k):
      g_acc, d_acc, cache, last, context = carry
      seg_in = self._segment_inputs(cond, real, rng, k * self.seg, False)
      g, d, m, cache, last, context = self._segment(params, d_params, seg_in, cache, last, context)
      return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, d_acc, d), cache, last, context), m

    if self.fold_segments:  # one segment program instead of two: half the compile
      zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
      (g_acc, d_acc, _, _, _), seg_metrics = jax.lax.scan(
          body, (zeros(params), zeros(d_params), cache, first, first), jnp.arange(self.num_segments))
      metrics = jax.tree.map(lambda s: jnp.sum(s) / self.num_segments, seg_metrics)
    else:
      # Segment 0 continues from the real first frame (D context: the first frame).
      g_acc, d_acc, metrics, cache, last, context = self._segment(
          params, d_params, self._segment_inputs(cond, real, rng, 0, True), cache, first, first)
      if self.num_segments > 1:
        (g_acc, d_acc, _, _, _), seg_metrics = jax.lax.scan(
            body, (g_acc, d_acc, cache, last, context), jnp.arange(1, self.num_segments))
        metrics = jax.tree.map(lambda a, s: (a + jnp.sum(s)) / self.num_segments, metrics, seg_metrics)
    return self._apply(state, g_acc, d_acc, metrics)

  def _apply(self, state, g_acc, d_acc, metrics):
    """One G and one D update on the gradients averaged over segments."""
    scale = 1.0 / self.num_segments
    d_params, d_opt_state, d_extra = train.apply_gradients(
        self.d_tx, state["d_params"], state["d_opt_state"], jax.tree.map(lambda g: g * scale, d_acc))
    params, opt_state, g_extra = train.apply_gradients(
        self.tx, state["params"], state["opt_state"], jax.tree.map(lambda g: g * scale, g_acc))
    new = dict(state, params=params, opt_state=opt_state, d_params=d_params, d_opt_state=d_opt_state)
    if self.ema_decay:
      new["ema_params"] = train.ema_update(state["ema_params"], params, self.ema_decay)
    metrics = dict(metrics, g_grad_norm=g_extra["grad_norm"], d_grad_norm=d_extra["grad_norm"],
                   loss=metrics["g_loss"] + metrics["d_loss"])
    return new, metrics


def make_stage(config, mesh):
  return LongVideoStage(config, mesh)
