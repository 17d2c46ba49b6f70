"""References that go through the same representation as the models.

Every model's frames are its VAE's decodes, so the references are passed through the same VAE
(the first model's; encode + decode, `VAEStream`: the causal VAE's streaming encoder and decoder,
which equal its whole-clip encode/decode, in bounded memory for any duration):

  vae_ceiling    the VAE's reconstruction of the oracle: the ceiling of any model decoded by this VAE.
  copy_last      frame t is the VAE's reconstruction of oracle frame t-1 (a model that copies its last
                 frame, at the VAE's best).
  frozen_frame0  the VAE's reconstruction of a still video of oracle frame 0 (a model that ignores the
                 controls).
  flat_colour    every frame the mean colour of oracle frame 0 (no VAE): what a blurry model reaches;
                 the VAE must beat it by a clear margin (`VAE_MARGIN_DB`) or the evaluation cannot tell
                 a model that draws the world from one that paints a flat colour.

`world_references` computes all four curves (psnr, ssim per video frame) of one world.
`vae_reconstruction` / `frozen_frame_curves` are the whole-clip and raw-pixel helpers.
"""
from __future__ import annotations

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from apt2_jax.evaluation.metrics import PSNR_CAP, psnr, ssim
from apt2_jax.generation import stream
from apt2_jax.models import vae as vae_lib

REFERENCE_SECONDS = 4.0   # `vae_reconstruction` in the report: the VAE ceiling's first 4 s of each world
FRAMES_PER_LATENT = stream.FRAMES_PER_STEP
VAE_MARGIN_DB = 3.0       # "clear margin": the VAE ceiling's PSNR must beat the flat colour's by this
REFERENCES = ("vae_ceiling", "copy_last", "frozen_frame0", "flat_colour")

DEFINITIONS = f"""References (per set; report["references"], the summary's reference table), each scored like
a model (psnr, ssim per video frame vs the oracle; summaries per duration):
  vae_ceiling     the first model's VAE encoding + decoding the oracle as one causal clip (streaming
                  encoder and decoder, = the whole-clip encode/decode): the ceiling of any model behind
                  this VAE. `vae_reconstruction` (the threshold of `horizon_vs_vae_s`) is its mean over
                  the first {REFERENCE_SECONDS:g} s.
  copy_last       frame t = the VAE's reconstruction of oracle frame t-1 (frame 0: its own).
  frozen_frame0   the VAE's reconstruction of a still video of oracle frame 0 (the floor of a model that
                  ignores the controls; drawn in the drift plots).
  flat_colour     every frame the mean colour of oracle frame 0, no VAE.
  vae_vs_flat     the VAE ceiling's PSNR minus the flat colour's (means over the rollout and the set's
                  worlds); `clear_margin`: at least {VAE_MARGIN_DB:g} dB."""


# ------------------------------------------------------------------------------------------------
# The VAE, streaming
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

  return vae, first, chunk


class VAEStream:
  """The VAE's reconstruction of a video streamed through its causal encoder and decoder:
  `start(frame0 [H, W, 3])` -> uint8 [H, W, 3]; `chunk(frames [4L, H, W, 3])` -> uint8 [4L, H, W, 3]
  (the last chunk may be short: padded by repeating its last frame, the padding dropped).
  `model`: anything with `vae_config` and `vae_params` (a `ModelSpec`, a `generation.Generator`)."""

  def __init__(self, model, chunk_latents: int = 24):
    self.params = model.vae_params
    self.vae, self._first, self._chunk = _stream_functions(model.vae_config)
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

  def caches(self):
    return self.enc, self.dec


def _same(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def still_video_chunks(model, frame0: np.ndarray, num_frames: int, chunk_latents: int = 24) -> Iterator[np.ndarray]:
  """The VAE's streaming reconstruction of `num_frames` copies of `frame0`, chunk by chunk (frame 0,
  then up to `4 chunk_latents` frames per chunk). Once a chunk leaves the caches exactly as it found
  them (a still input fills the causal caches' finite window), every later chunk is the same: it is
  repeated without running the VAE."""
  s = VAEStream(model, chunk_latents)
  yield s.start(frame0)[None]
  size = FRAMES_PER_LATENT * chunk_latents
  still = np.broadcast_to(frame0, (size,) + frame0.shape)
  done, steady = 1, None
  while done < num_frames:
    n = min(size, num_frames - done)
    if steady is None:
      before = jax.tree.map(np.asarray, s.caches())
      out = s.chunk(np.ascontiguousarray(still))
      if _same(before, s.caches()):
        steady = out
      yield out[:n]
    else:
      yield steady[:n]
    done += n


def vae_reconstruction(model, frames: np.ndarray) -> np.ndarray:
  """uint8 `[1+4k, H, W, 3]` -> `model`'s VAE whole-clip reconstruction (posterior mean), uint8."""
  return _whole_clip(model.vae_config)(model.vae_params, stream.from_uint8(jnp.asarray(frames))[None])[0]


@functools.lru_cache(maxsize=4)
def _whole_clip(vae_config: vae_lib.VAEConfig):
  vae = vae_lib.VAE(vae_config)
  fn = jax.jit(lambda p, v: stream.to_uint8(vae.apply(p, vae.apply(p, v, method=vae_lib.VAE.encode)[0],
                                                      method=vae_lib.VAE.decode)))
  return lambda p, v: np.asarray(fn(p, v))


def reference_frames(num_frames: int, fps: float) -> int:
  """Video frames of `vae_reconstruction` in the report: whole latent frames covering `REFERENCE_SECONDS`."""
  latents = max(1, int(REFERENCE_SECONDS * fps) // FRAMES_PER_LATENT)
  return min(num_frames, 1 + FRAMES_PER_LATENT * latents)


# ------------------------------------------------------------------------------------------------
# One world's references
# ------------------------------------------------------------------------------------------------


def _scores(frames: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  return psnr(frames, ref, cap=PSNR_CAP), ssim(frames, ref)


def flat_colour(frame0: np.ndarray) -> np.ndarray:
  """Frame 0's mean colour as a flat uint8 image of its shape."""
  colour = np.round(np.asarray(frame0, np.float64).reshape(-1, 3).mean(0)).astype(np.uint8)
  return np.broadcast_to(colour, frame0.shape)


def world_references(model, oracle, chunk_latents: int = 24) -> dict[str, dict[str, np.ndarray]]:
  """{reference: {"psnr", "ssim": float [T]}} of one world's oracle (uint8 [T = 1+4k, H, W, 3], a
  memory map is fine), the VAE parts through `model`'s VAE, chunk by chunk (bounded memory)."""
  n = len(oracle)
  curves = {k: {"psnr": [], "ssim": []} for k in REFERENCES}

  def add(name, frames, ref):
    p, s = _scores(frames, ref)
    curves[name]["psnr"].append(p)
    curves[name]["ssim"].append(s)

  frame0 = np.asarray(oracle[0])
  vae = VAEStream(model, chunk_latents)
  recon0 = vae.start(frame0)[None]
  add("vae_ceiling", recon0, frame0[None])
  add("copy_last", recon0, frame0[None])
  flat = flat_colour(frame0)
  add("flat_colour", flat[None], frame0[None])
  last = recon0[-1]
  size = FRAMES_PER_LATENT * vae.chunk_latents
  for a in range(1, n, size):
    ref = np.asarray(oracle[a:a + size])
    recon = vae.chunk(ref)
    add("vae_ceiling", recon, ref)
    add("copy_last", np.concatenate([last[None], recon[:-1]]), ref)
    add("flat_colour", np.broadcast_to(flat, ref.shape), ref)
    last = recon[-1]
  a = 0
  for frames in still_video_chunks(model, frame0, n, chunk_latents):
    add("frozen_frame0", frames, np.asarray(oracle[a:a + len(frames)]))
    a += len(frames)
  return {k: {m: np.concatenate(v) for m, v in c.items()} for k, c in curves.items()}


def vae_vs_flat(vae_curves, flat_curves) -> dict:
  """The VAE ceiling against the flat colour over a set's worlds (each a `world_references` curve
  dict): per world and mean PSNRs, the margin (mean VAE minus mean flat) and whether it is clear
  (`VAE_MARGIN_DB`)."""
  worlds = [{"vae_psnr": float(np.mean(v["psnr"])), "flat_psnr": float(np.mean(f["psnr"])),
             "margin_db": float(np.mean(v["psnr"]) - np.mean(f["psnr"]))} for v, f in zip(vae_curves, flat_curves)]
  vae, flat = float(np.mean([w["vae_psnr"] for w in worlds])), float(np.mean([w["flat_psnr"] for w in worlds]))
  return {"vae_psnr": vae, "flat_psnr": flat, "margin_db": vae - flat, "clear_margin": bool(vae - flat >= VAE_MARGIN_DB),
          "threshold_db": VAE_MARGIN_DB, "worlds": worlds}


def frozen_frame_curves(oracle: np.ndarray, chunk: int = 96) -> dict[str, np.ndarray]:
  """PSNR/SSIM of raw frame 0 repeated forever (no VAE; `world_references` has the VAE's)."""
  first = np.asarray(oracle[0])
  curves = {"psnr": [], "ssim": []}
  for a in range(0, len(oracle), chunk):
    ref = np.asarray(oracle[a:a + chunk])
    p, s = _scores(np.broadcast_to(first, ref.shape), ref)
    curves["psnr"].append(p)
    curves["ssim"].append(s)
  return {k: np.concatenate(v) for k, v in curves.items()}
