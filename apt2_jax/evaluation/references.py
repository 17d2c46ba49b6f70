"""References: "models" whose frames are known, scored like the models, through the models' codec.

The kinds are `drift.REFERENCES` (`drift.reference_frames` builds their frames from the oracle):
the oracle itself (through the codec: the codec's ceiling, the best frames the models'
representation can hold), warp-last (the one-step ceiling), the true frame one latent step back,
frame 0's flat colour, frozen frame 0 and warp-frame-0. The two warp references need the world's
exact warp (the torus); where a world has none (camera, panorama, puppet, bouncing) they are
absent. The horizon's threshold comes from them (`horizon.threshold_from_references`).

Every model's frames are its codec's decodes, so each reference's frames pass through the same
codec (`codec_roundtrip`): the pixel codecs (space-to-depth, PCA), which hold nothing across latent
frames, encode and decode the whole clip in one jitted call; a learned VAE streams it through its
causal encoder and decoder (`VAEStream`, chunks of latent frames, bounded memory for any duration;
equal to its whole-clip encode/decode within one grey level).

`vae_vs_flat`: the codec's ceiling against frame 0's flat colour (whole-frame PSNR). A codec that
does not beat the flat colour by `VAE_MARGIN_DB` cannot tell a model that draws the world from
one that paints a flat colour.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from apt2_jax.evaluation import drift
from apt2_jax.generation import stream
from apt2_jax.models import vae as vae_lib

FRAMES_PER_LATENT = stream.FRAMES_PER_STEP
VAE_MARGIN_DB = 3.0       # "clear margin": the codec ceiling's PSNR must beat the flat colour's by this
REFERENCES = drift.REFERENCES


# ------------------------------------------------------------------------------------------------
# The codec
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _stream_functions(vae_config: vae_lib.VAEConfig):
  """(first, chunk) jitted once per VAE config: frame 0 alone, then `L` latent steps of 4 frames
  (a `lax.scan` carrying the encoder's and the decoder's caches)."""
  vae = vae_lib.VAE(vae_config)

  @jax.jit
  def first(params, frame0):                        # frame0 float [1, 1, H, W, 3]
    (mean, _), enc = vae.apply(params, frame0, None, True, method=vae_lib.VAE.encode_chunk)
    decode_cache = vae_lib.init_decode_cache(vae, 1, mean.shape[2], mean.shape[3])
    out, decode_cache = vae.apply(params, mean, decode_cache, True, method=vae_lib.VAE.decode_step)
    return stream.to_uint8(out), enc, decode_cache

  @jax.jit
  def chunk(params, frames, enc, decode_cache):    # frames float [1, 4L, H, W, 3]
    b, n, h, w, c = frames.shape
    groups = frames.reshape(b, n // FRAMES_PER_LATENT, FRAMES_PER_LATENT, h, w, c).swapaxes(0, 1)

    def body(carry, group):
      enc, dec = carry
      (mean, _), enc = vae.apply(params, group, enc, False, method=vae_lib.VAE.encode_chunk)
      out, dec = vae.apply(params, mean, dec, False, method=vae_lib.VAE.decode_step)
      return (enc, dec), stream.to_uint8(out)

    (enc, decode_cache), outs = jax.lax.scan(body, (enc, decode_cache), groups)
    return outs.swapaxes(0, 1).reshape(b, n, h, w, c), enc, decode_cache

  return first, chunk


class VAEStream:
  """A video's reconstruction streamed through the VAE's causal encoder and decoder:
  `start(frame0 [H, W, 3])` -> uint8 [H, W, 3]; `chunk(frames [4L, H, W, 3])` -> uint8 [4L, H, W, 3]
  (a short chunk is padded by repeating its last frame, the padding dropped).
  `model`: anything with `vae_config` and `vae_params` (a `ModelSpec`, a `generation.Generator`)."""

  def __init__(self, model, chunk_latents: int = 24):
    self.params = model.vae_params
    self._first, self._chunk = _stream_functions(model.vae_config)
    self.chunk_latents = int(chunk_latents)
    self.enc = self.dec = None

  def start(self, frame0: np.ndarray) -> np.ndarray:
    out, self.enc, self.dec = self._first(self.params, stream.from_uint8(jnp.asarray(frame0))[None, None])
    return np.asarray(out[0, 0])

  def chunk(self, frames: np.ndarray) -> np.ndarray:
    n, size = len(frames), FRAMES_PER_LATENT * self.chunk_latents
    if n > size or n % FRAMES_PER_LATENT:
      raise ValueError(f"VAEStream.chunk takes 4k <= {size} frames, got {n}")
    if n < size:
      frames = np.concatenate([frames, np.repeat(frames[-1:], size - n, axis=0)])
    out, self.enc, self.dec = self._chunk(self.params, stream.from_uint8(jnp.asarray(frames))[None], self.enc, self.dec)
    return np.asarray(out[0, :n])

  def video(self, frames: np.ndarray) -> np.ndarray:
    """The reconstruction of a whole video uint8 `[1 + 4k, H, W, 3]` (a memory map is fine),
    chunk by chunk."""
    out = [self.start(np.asarray(frames[0]))[None]]
    size = FRAMES_PER_LATENT * self.chunk_latents
    out += [self.chunk(np.asarray(frames[a:a + size])) for a in range(1, len(frames), size)]
    return np.concatenate(out)


@functools.lru_cache(maxsize=4)
def _whole_clip(vae_config: vae_lib.VAEConfig):
  vae = vae_lib.VAE(vae_config)

  @jax.jit
  def fn(params, video):
    mean, _ = vae.apply(params, stream.from_uint8(video[None]), method=vae_lib.VAE.encode)
    return stream.to_uint8(vae.apply(params, mean, method=vae_lib.VAE.decode))[0]

  return fn


def codec_roundtrip(model, chunk_latents: int = 24) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 video `[1 + 4k, H, W, 3]` -> the same video encoded and decoded by `model`'s codec
  (anything with `vae_config` and `vae_params`): the whole clip at once for a pixel codec, streamed
  `chunk_latents` latent frames at a time for a learned VAE (module docstring)."""
  if model.vae_config.codec == "learned":
    return lambda video: VAEStream(model, chunk_latents).video(video)
  fn = _whole_clip(model.vae_config)
  return lambda video: np.asarray(fn(model.vae_params, np.asarray(video)))


# ------------------------------------------------------------------------------------------------
# One world's references
# ------------------------------------------------------------------------------------------------


def reference_curves(target, window: int, roundtrip: Optional[Callable] = None,
                     ssim: bool = False) -> dict[str, dict]:
  """`drift.frame_metrics` of every reference (`REFERENCES`; the warp ones only where the world has
  an exact warp) on one world (`oracle.Target`); with `roundtrip` (`codec_roundtrip`) each
  reference's frames go through the models' codec first."""
  out = {}
  for kind in REFERENCES:
    if kind in drift.WARP_REFERENCES and target.warp is None:
      continue
    frames = drift.reference_frames(target.oracle, kind, target.warp)
    if roundtrip is not None:
      frames = roundtrip(frames)
    out[kind] = drift.frame_metrics(frames, target.oracle, target.recent[window], target.homographies,
                                    known=target.known, background=target.background, ssim=ssim)
  return out


def vae_vs_flat(oracle_curves, flat_curves) -> dict:
  """The codec's ceiling (the "oracle" reference through the codec) against frame 0's flat colour
  over a set's worlds (per-world `frame_metrics`, whole-frame `psnr` of the generated frames): per
  world and mean PSNRs, the margin (mean ceiling minus mean flat) and whether it is clear
  (`VAE_MARGIN_DB`)."""
  mean = lambda c: float(np.mean(np.asarray(c["psnr"], np.float64)[1:]))
  worlds = [{"vae_psnr": mean(v), "flat_psnr": mean(f), "margin_db": mean(v) - mean(f)}
            for v, f in zip(oracle_curves, flat_curves)]
  vae, flat = float(np.mean([w["vae_psnr"] for w in worlds])), float(np.mean([w["flat_psnr"] for w in worlds]))
  return {"vae_psnr": vae, "flat_psnr": flat, "margin_db": vae - flat, "clear_margin": bool(vae - flat >= VAE_MARGIN_DB),
          "threshold_db": VAE_MARGIN_DB, "worlds": worlds}
