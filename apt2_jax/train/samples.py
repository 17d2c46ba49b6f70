"""Evaluation rollouts as videos (TensorBoard), through the one generation path.

`rollout_videos(stage, state, num)` streams the first `num` validation clips of a DiT stage from
their true first frame, text and controls with `apt2_jax.generation.stream` (`start`, `text`,
`chunk`, `decode`: the functions inference, export, the evaluation and the benchmark run), with
the run's EMA parameters and its frozen VAE, and returns `{"rollout": uint8 [B, T, H, 2W, 3]}`:
generated frames on the left, the ground truth on the right. The loop writes them to
TensorBoard (`MetricWriter.write_videos`) after each evaluation when `config.eval_videos > 0`
(default: 2 when the run evaluates periodically, `config.eval_every > 0`; 0 otherwise, so smoke
runs and tests pay no extra compile).

Multi-step stages (pretrain, adapt) sample with their evaluation's Euler sampler
(`config.eval.sample_steps`, `sample_shift`, `guidance`); the others are one-step generators.
Only single-process runs write videos (a multi-host run logs once that it skips them); a stage
whose data holds latents only (no pixels to start from) has none.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from apt2_jax.train import data as train_data

MULTI_STEP_STAGES = ("pretrain", "adapt")


def num_videos(config) -> int:
  """`config.eval_videos` when set, else 2 for runs that evaluate periodically, else 0."""
  if "eval_videos" in config:
    return max(0, int(config.eval_videos or 0))
  return 2 if int(config.get("eval_every", 0) or 0) > 0 else 0


def _options(config):
  from apt2_jax.rollout import RolloutOptions
  ev = config.get("eval") or {}
  if config.get("stage") in MULTI_STEP_STAGES and int(ev.get("sample_steps", 0) or 0) > 1:
    options = RolloutOptions(num_steps=int(ev.sample_steps), shift=float(ev.get("sample_shift", 1.0)),
                             cache_from=str(ev.get("sample_cache_from", "matched")))
    return options, float(ev.get("guidance", 1.0) or 1.0)
  return RolloutOptions(), 1.0


def _rollout(spec, length, params, vae_params, image, prompt, controls, seed):
  from apt2_jax.generation import stream
  frame0, state, decode_cache = stream.start(spec, vae_params, image, seed)
  latents, _ = stream.chunk(spec, params, state, stream.text(spec, params, prompt), controls, length=length)

  def decode(cache, z):
    video, cache = stream.decode(spec, vae_params, cache, z[:, None])
    return cache, video
  _, videos = jax.lax.scan(decode, decode_cache, jnp.swapaxes(latents, 0, 1))  # [S, B, 4, H, W, 3]
  b = image.shape[0]
  videos = jnp.swapaxes(videos, 0, 1).reshape(b, -1, *videos.shape[-3:])
  return jnp.concatenate([frame0, videos], axis=1)


def _as_uint8(video: np.ndarray) -> np.ndarray:
  """Video as uint8: data sources give uint8 or float in [-1, 1] (the range the VAE reads)."""
  if video.dtype == np.uint8:
    return video
  return np.clip(np.round((video.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _compiled(spec, length: int):
  return jax.jit(functools.partial(_rollout, spec, length))


class RolloutVideos:
  """The evaluation-rollout videos of one run (`__call__(stage, state)`); inputs read once."""

  def __init__(self, config, num: int):
    self.config, self.num = config, int(num)
    self._inputs = None
    self._skip_reason = None

  def _skip(self, reason: str) -> dict:
    if self._skip_reason is None:
      logging.info("no evaluation videos: %s", reason)
    self._skip_reason = reason
    return {}

  def __call__(self, stage, state) -> dict:
    """`{"rollout": uint8 [B, T, H, 2W, 3]}` or {}; never raises (a failure is logged once and
    switches the videos off: they must not end a training run)."""
    if self.num <= 0 or self._skip_reason:
      return {}
    try:
      return self._videos(stage, state)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("evaluation videos failed and are switched off for this run: %s: %s", type(e).__name__, e)
      self._skip_reason = "failed"
      return {}

  def _videos(self, stage, state) -> dict:
    if jax.process_count() > 1:
      return self._skip("multi-host runs do not write them")
    inputs = getattr(stage, "inputs", None)
    if "model" not in self.config or inputs is None or getattr(inputs, "vae", None) is None:
      return self._skip(f"stage {self.config.get('stage')!r} has no generator with a VAE")
    if self._inputs is None:
      batch = next(train_data.make_iterator(self.config, "validation", batch_size=self.num))
      if "video" not in batch:
        return self._skip("the validation data holds latents only (no first frame in pixels)")
      video = _as_uint8(np.asarray(batch["video"])[: self.num])
      length = (video.shape[1] - 1) // 4
      if length < 1:
        return self._skip(f"validation clips of {video.shape[1]} frames are too short")
      controls = None
      if stage.model_config.control_channels:
        raw = np.asarray(batch["controls"], np.float32)[: self.num, 1:1 + 4 * length]
        controls = raw.reshape(raw.shape[0], length, 4, raw.shape[-1])
      self._inputs = (video[:, : 1 + 4 * length], controls, np.asarray(batch["text_tokens"])[: self.num], length)
    video, controls, prompt, length = self._inputs
    from apt2_jax.generation.stream import StreamSpec
    options, guidance = _options(self.config)
    encoding = self.config.data.get("control_encoding", "raw") if controls is not None else ""
    spec = StreamSpec(stage.model_config, inputs.vae.config, options, guidance, encoding)
    params = state.get("ema_params", state["params"])
    generated = _compiled(spec, length)(params, stage.frozen["vae"], video[:, 0], prompt, controls,
                                        jnp.int32(int(self.config.get("seed", 0))))
    generated = np.asarray(jax.device_get(generated), np.uint8)
    return {"rollout": np.concatenate([generated, video], axis=3)}  # left: generated, right: truth
