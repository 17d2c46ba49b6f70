"""A lossless, parameter-free pixel codec with the causal VAE's interface (codec "space_to_depth").

`apt2_jax.models.vae.VAE` dispatches here when `VAEConfig.codec == "space_to_depth"` (the named
size `vae_config("pixels")`), so every VAE call site (`encode`, `decode`, `decode_step`,
`encode_chunked`, `init_decode_cache`, `normalize_latents`, ...) works unchanged. It exists so that
the testbed has no lossy ceiling: the oracle frame is reachable exactly in latent space.

Layout (the VAE's temporal and spatial factors, 4 and 8):
  latent frame 0      = video frame 0 repeated into the 4 temporal slots (causal, like the VAE: the
                        first image is its own latent frame); decoded back to 1 video frame (the
                        mean of the 4 slots, exact when they are equal).
  latent frame j >= 1 = video frames 4j-3 .. 4j.
Every 8x8 pixel block of the 4 frames is stacked into channels, `(t, dy, dx, rgb)`-major:

  channel = ((t * 8 + dy) * 8 + dx) * 3 + c,      Z_DIM = 4 * 8 * 8 * 3 = 768,

so video `[B, 1+4k, H, W, 3]` <-> latents `[B, 1+k, H/8, W/8, 768]` (64x64, 33 frames ->
`[B, 9, 8, 8, 768]`: 16 tokens per latent frame under the DiT's 2x2 patch). The RGB channel of
latent channel i is `i % 3`.

Exactness: `decode(encode(x)) == x` bit for bit (reshapes and transposes only; frame 0 is
`((a + a) + (a + a)) * 0.25 == a`). Through `normalize_latents` / `denormalize_latents` the float
round trip is within an ulp, so uint8 frames (`(x + 1) * 127.5`, rounded) come back exactly.

Posterior: the codec is deterministic; `encode` returns `logvar = LOGVAR` (the VAE's clip floor,
-30) everywhere, and `VAE.__call__` never samples.

Decode cache: `{"latent_frames": int32 [B]}` (latent frames decoded so far), fixed shape, so the
jitted, donating `vae.decode_step` streams as with the learned VAE.

Latent statistics (`PANORAMA_RGB_MEAN`, `PANORAMA_RGB_STD`): per RGB channel over rendered clips of
the panorama world's training distribution (`apt2_jax.data.panorama`, 64x64, 33 frames; video in
[-1, 1]), tiled to the 768 channels by `latent_stats` (channels of one colour are exchangeable:
every pixel of every frame of a block). `tests/test_testbed.py` re-measures them.
"""
from __future__ import annotations

import functools
import os

import jax.numpy as jnp
import numpy as np

CODECS = ("learned", "space_to_depth", "pca", "pca_torus")
TEMPORAL_FACTOR = 4   # = vae.TEMPORAL_FACTOR
SPATIAL_FACTOR = 8    # = vae.SPATIAL_FACTOR
Z_DIM = TEMPORAL_FACTOR * SPATIAL_FACTOR * SPATIAL_FACTOR * 3
LOGVAR = -30.0

# Measured with `measure_rgb_stats` on 1024 panorama-world training clips (`World.sample` of seeds
# split_seed('train', 0..1023), 64x64, 33 frames; video / 127.5 - 1). One palette per clip, so 64
# clips are not enough (their means differ by ~0.1 between sets).
PANORAMA_RGB_MEAN = (0.1322, 0.0875, -0.0078)
PANORAMA_RGB_STD = (0.4353, 0.3197, 0.3308)


def latent_stats(rgb_mean=PANORAMA_RGB_MEAN, rgb_std=PANORAMA_RGB_STD):
  """Per-channel (latents_mean, latents_std), tuples of Z_DIM floats, from per-RGB statistics."""
  reps = Z_DIM // 3
  return tuple(float(v) for v in rgb_mean) * reps, tuple(float(v) for v in rgb_std) * reps


def config_fields() -> dict:
  """The VAEConfig fields of the named size `pixels`."""
  mean, std = latent_stats()
  return dict(codec="space_to_depth", z_dim=Z_DIM, latents_mean=mean, latents_std=std)


def pca_config_fields(codec: str = "pca", whiten: bool = False) -> dict:
  """The VAEConfig fields of the PCA codecs' named sizes.

  `pixels_pca` (codec "pca", the panorama's basis): unit-variance latents (each component divided
  by its std over the fitting clips). `pixels_pca_torus` (codec "pca_torus"): one scale for every
  component (their root-mean-square std), so that a latent MSE is the pixel MSE inside the basis'
  span up to a constant: the basis is orthonormal, and a per-component scale would weigh the
  faint components (fine detail) as much as the main ones. `pixels_pca_torus_white` (`whiten`):
  unit-variance latents, so the model sees the faint components at the main ones' scale, with
  per-channel loss weights `std_c^2 / mean(std^2)` (`pixel_loss_weights`): its latent MSE is the
  same pixel MSE as `pixels_pca_torus`'s."""
  _, _, std = pca_basis(codec)
  if codec == "pca" or whiten:
    scale = tuple(float(v) for v in std)
  else:
    scale = (float(np.sqrt(np.mean(np.square(std)))),) * PCA_RANK
  fields = dict(codec=codec, z_dim=PCA_RANK, latents_mean=(0.0,) * PCA_RANK, latents_std=scale)
  if whiten:
    fields["loss_weights"] = pixel_loss_weights(std)
  return fields


def pixel_loss_weights(latents_std) -> tuple[float, ...]:
  """Per-channel weights that turn a latent MSE into the pixel MSE (up to a constant) for an
  orthonormal linear codec whose channel c is scaled by `latents_std[c]`: `std_c^2 / mean(std^2)`."""
  var = np.square(np.asarray(latents_std, np.float64))
  return tuple(float(v) for v in var / var.mean())


def check_config(codec: str, z_dim: int) -> None:
  if codec not in CODECS:
    raise ValueError(f"VAEConfig.codec={codec!r} is not one of {CODECS}")
  if codec == "space_to_depth" and z_dim != Z_DIM:
    raise ValueError(f"VAEConfig.codec='space_to_depth' needs z_dim={Z_DIM} "
                     f"(4 frames x 8 x 8 pixels x RGB), got {z_dim}")
  if codec in ("pca", "pca_torus") and z_dim != PCA_RANK:
    raise ValueError(f"VAEConfig.codec='pca' needs z_dim={PCA_RANK} (the stored basis' rank), got {z_dim}")


# ------------------------------------------------------------------------------------------------
# The PCA codec: space-to-depth, then the top PCA_RANK principal components of the 768-value blocks
# ------------------------------------------------------------------------------------------------
# A fixed linear codec (a linear "VAE"): latent = (block - mean) @ basis.T, block = latent @ basis +
# mean. Fitted once by `fit_pca` on the panorama world's training clips and stored in PCA_FILE;
# `tests/test_testbed.py` re-fits it on fewer clips and checks the held-out PSNR.
PCA_RANK = 32
PCA_FILE = os.path.join(os.path.dirname(__file__), "pca_panorama.npz")
# codec -> (basis file, the world it was fitted on)
PCA_FILES = {"pca": (PCA_FILE, "panorama"),
             "pca_torus": (os.path.join(os.path.dirname(__file__), "pca_torus.npz"), "torus")}


@functools.lru_cache(maxsize=4)
def pca_basis(codec: str = "pca"):
  """(basis float32 [PCA_RANK, 768], mean [768], component std [PCA_RANK]) of a PCA codec."""
  with np.load(PCA_FILES[codec][0]) as f:
    return (np.asarray(f["basis"], np.float32), np.asarray(f["mean"], np.float32),
            np.asarray(f["std"], np.float32))


def fit_pca(num_clips: int = 128, rank: int = PCA_RANK, frames: int = 33, blocks: int = 40_000,
            heldout_clips: int = 16, seed: int = 0, world: str = "panorama"):
  """Fits the PCA codec on `num_clips` training clips of `world` (64x64, `frames` frames; `blocks`
  random 8x8x4-frame blocks) and measures it on `heldout_clips` validation clips.

  Returns (basis [rank, 768], mean [768], std [rank], held-out PSNR in dB of encode -> decode)."""
  from apt2_jax.data import world_base, worlds

  world = worlds.make_world(world, world_base.WorldConfig(height=64, width=64))

  def blocks_of(split, n):
    videos = np.stack([world.sample(seed=world_base.split_seed(split, k), num_frames=frames)["video"]
                       for k in range(n)]).astype(np.float32) / 127.5 - 1.0
    groups = videos[:, 1:].reshape(n, (frames - 1) // TEMPORAL_FACTOR, TEMPORAL_FACTOR, 64, 64, 3)
    return np.asarray(space_to_depth(groups)).reshape(-1, Z_DIM)

  x = blocks_of("train", num_clips)
  x = x[np.random.default_rng(seed).choice(len(x), min(blocks, len(x)), replace=False)]
  mean = x.mean(0)
  _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
  basis = vt[:rank].astype(np.float32)
  std = (s[:rank] / np.sqrt(len(x))).astype(np.float32)
  y = blocks_of("validation", heldout_clips)
  rec = ((y - mean) @ basis.T) @ basis + mean
  psnr = float(10 * np.log10(4.0 / np.mean(np.square(rec - y))))
  return basis, mean.astype(np.float32), std, psnr


def _project(x, codec):
  if codec not in PCA_FILES:
    return x
  basis, mean, _ = pca_basis(codec)
  return jnp.einsum("...c,kc->...k", x - jnp.asarray(mean), jnp.asarray(basis))


def _unproject(z, codec):
  if codec not in PCA_FILES:
    return z
  basis, mean, _ = pca_basis(codec)
  return jnp.einsum("...k,kc->...c", z, jnp.asarray(basis)) + jnp.asarray(mean)


def space_to_depth(groups):
  """`[B, F, 4, H, W, 3]` (4-frame groups) -> `[B, F, H/8, W/8, 768]`."""
  b, f, t, h, w, c = groups.shape
  s = SPATIAL_FACTOR
  x = groups.reshape(b, f, t, h // s, s, w // s, s, c)
  x = jnp.transpose(x, (0, 1, 3, 5, 2, 4, 6, 7))          # [B, F, h, w, t, dy, dx, c]
  return x.reshape(b, f, h // s, w // s, t * s * s * c)


def depth_to_space(z):
  """Inverse of `space_to_depth`: `[B, F, h, w, 768]` -> `[B, F, 4, 8h, 8w, 3]`."""
  b, f, h, w, _ = z.shape
  s, t = SPATIAL_FACTOR, TEMPORAL_FACTOR
  x = z.reshape(b, f, h, w, t, s, s, 3)
  x = jnp.transpose(x, (0, 1, 4, 2, 5, 3, 6, 7))          # [B, F, t, h, dy, w, dx, c]
  return x.reshape(b, f, t, h * s, w * s, 3)


def encode(video, first: bool = True):
  """Video `[B, 1+4k (first) or 4k, H, W, 3]` -> latents `[B, (1+)k, H/8, W/8, 768]`."""
  b, n, h, w, c = video.shape
  parts = []
  if first:
    parts.append(jnp.broadcast_to(video[:, :1, None], (b, 1, TEMPORAL_FACTOR, h, w, c)))
    video = video[:, 1:]
    n -= 1
  if n:
    parts.append(video.reshape(b, n // TEMPORAL_FACTOR, TEMPORAL_FACTOR, h, w, c))
  groups = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
  return space_to_depth(groups)


def decode(z, first: bool = True):
  """Latents `[B, F, h, w, 768]` -> video `[B, 1+4(F-1) (first) or 4F, 8h, 8w, 3]`."""
  groups = depth_to_space(z)
  b, f, t, h, w, c = groups.shape
  if not first:
    return groups.reshape(b, f * t, h, w, c)
  g0 = groups[:, 0]
  frame0 = ((g0[:, 0] + g0[:, 1]) + (g0[:, 2] + g0[:, 3])) * 0.25   # exact for equal slots
  rest = groups[:, 1:].reshape(b, (f - 1) * t, h, w, c)
  return jnp.concatenate([frame0[:, None], rest], axis=1)


def posterior(video, first: bool = True, codec: str = "space_to_depth"):
  """(mean, logvar) of the deterministic codec: the latents and `LOGVAR` everywhere."""
  mean = _project(encode(video, first), codec)
  return mean, jnp.full_like(mean, LOGVAR)


def decode_step(z, cache, first: bool, clip: bool = True, codec: str = "space_to_depth"):
  """`VAE.decode_step` of the codec: (video, cache) with cache `{"latent_frames": int32 [B]}`."""
  video = decode(_unproject(z, codec), first)
  if clip:
    video = jnp.clip(video, -1.0, 1.0)
  count = (jnp.zeros((z.shape[0],), jnp.int32) if cache is None
           else jnp.asarray(cache["latent_frames"], jnp.int32))
  return video, {"latent_frames": count + z.shape[1]}


def measure_rgb_stats(videos) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-RGB (mean, std) of the latents of uint8 videos `[T, H, W, 3]` in [-1, 1] (numpy): frame 0
  counts 4 times, as it fills the 4 slots of latent frame 0."""
  x = np.concatenate([np.concatenate([np.repeat(np.asarray(v[:1]), TEMPORAL_FACTOR - 1, 0), v])
                      .reshape(-1, 3).astype(np.float64) for v in videos]) / 127.5 - 1.0
  return tuple(float(v) for v in x.mean(0)), tuple(float(v) for v in x.std(0))
