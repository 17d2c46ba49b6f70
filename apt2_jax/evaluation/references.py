"""References that go through the same representation as the models.

  vae_reconstruction   the VAE's whole-clip reconstruction of the oracle's first
                       `REFERENCE_SECONDS`: the ceiling of any model decoded by this VAE.
  frozen_frame_curves  a "model" that repeats frame 0: the floor of one that ignores the controls.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from apt2_jax.evaluation.metrics import PSNR_CAP, psnr, ssim
from apt2_jax.generation import stream
from apt2_jax.models import vae as vae_lib

REFERENCE_SECONDS = 4.0   # the VAE-reconstruction reference covers the first 4 s of each world
FRAMES_PER_LATENT = stream.FRAMES_PER_STEP


@functools.lru_cache(maxsize=4)
def _reconstruct_function(vae_config: vae_lib.VAEConfig):
  """One jitted encode+decode per VAE config (compiled once for all held-out worlds)."""
  vae = vae_lib.VAE(vae_config)
  return jax.jit(lambda p, v: vae.apply(p, vae.apply(p, v, method=vae_lib.VAE.encode)[0],
                                        method=vae_lib.VAE.decode))


def vae_reconstruction(model, frames: np.ndarray) -> np.ndarray:
  """uint8 `[1+4k, H, W, 3]` -> `model`'s VAE whole-clip reconstruction (posterior mean), uint8.

  `model`: anything with `vae_config` and `vae_params` (a `ModelSpec`, a `generation.Generator`).
  """
  out = _reconstruct_function(model.vae_config)(model.vae_params, stream.from_uint8(jnp.asarray(frames))[None])[0]
  return np.asarray(stream.to_uint8(out))


def reference_frames(num_frames: int, fps: float) -> int:
  """Video frames of the VAE reference: whole latent frames covering `REFERENCE_SECONDS`."""
  latents = max(1, int(REFERENCE_SECONDS * fps) // FRAMES_PER_LATENT)
  return min(num_frames, 1 + FRAMES_PER_LATENT * latents)


def vae_reference(model, oracle, fps: float) -> dict:
  """PSNR/SSIM of the VAE's reconstruction of the oracle's first `REFERENCE_SECONDS`."""
  frames = np.array(oracle[:reference_frames(len(oracle), fps)])
  recon = vae_reconstruction(model, frames)
  return {"psnr": float(np.mean(psnr(recon, frames, cap=PSNR_CAP))),
          "ssim": float(np.mean(ssim(recon, frames))), "frames": int(len(frames))}


def frozen_frame_curves(oracle: np.ndarray, chunk: int = 96) -> dict[str, np.ndarray]:
  """PSNR/SSIM of a "model" that repeats frame 0 forever: the floor a generator that ignores the
  controls reaches, and what the drift curves should beat once the camera has moved."""
  first = np.asarray(oracle[0])
  curves = {"psnr": [], "ssim": []}
  for a in range(0, len(oracle), chunk):
    ref = np.asarray(oracle[a:a + chunk])
    same = np.broadcast_to(first, ref.shape)
    curves["psnr"].append(psnr(same, ref, cap=PSNR_CAP))
    curves["ssim"].append(ssim(same, ref))
  return {k: np.concatenate(v) for k, v in curves.items()}
