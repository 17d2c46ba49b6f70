"""Drift and control error against the synthetic worlds' oracle, side by side for several models.

    specs = {"diffusion_32": model_spec_from_workdir(STAGE1, vae_workdir=VAE, num_steps=32,
                                                     shift=24.0, guidance=3.0),
             "aapt": model_spec_from_workdir(STAGE4, vae_workdir=VAE)}
    report = evaluate_models(specs, world="camera", num_worlds=2, seconds=(60, 300), out_dir=DIR)

For each held-out `test` world (`worlds.split_seed("test", k)`) we draw one long control
trajectory, render the oracle (the frames a perfect model draws for those controls), encode the
oracle's frame 0 with each model's VAE and stream the model through the unchanged
`apt2_jax.rollout.rollout` in fixed-size chunks that carry the KV cache, decoding each latent frame
with the VAE's streaming `decode_step`: memory stays bounded for any duration. Every model of a
world sees the same controls and the same per-step noise (`stream_noise(seed, i)`, as the
`StreamingGenerator` draws it), so the comparison is paired.

Metrics (per video frame unless said otherwise; frames are uint8 RGB):
  psnr, ssim              generated frame vs oracle frame, whole image. PSNR = 10 log10(255^2 /
                          MSE) over all pixels and channels, capped at `PSNR_CAP` dB (identical
                          frames); SSIM: Wang et al. with a 7x7 uniform window, sample covariance,
                          K1 = 0.01, K2 = 0.03, per channel then averaged (skimage's defaults).
  psnr_visible,           the same over the *region visible in frame 0*. Camera world: a pixel
  ssim_visible            of frame t is in it when every surface its ray meets (the ground and the
                          canopy/cloud layers in front of it; the sky direction when it misses the
                          ground) projects inside frame 0's image, in front of camera 0. Computed
                          exactly from the world's poses and pinhole rays (`visible_mask`); it is
                          a view-frustum test, so points hidden in frame 0 by the semi-transparent
                          canopy still count as seen. Static-camera worlds (puppet, bouncing): the
                          whole frame. `visible_fraction` is the region's share of the frame.
  control_error_px        camera world, per latent step j (video frames 4j-4 -> 4j): the image
                          translation measured by phase correlation (`phase_correlation`, Hann
                          window, sub-pixel peak) on the generated pair, minus the same estimate
                          on the oracle pair, Euclidean norm in pixels. Zoom, roll and forward
                          motion are not translations; the estimator's bias on them cancels
                          because the oracle goes through the same estimator for the commanded
                          motion. `oracle_motion_px` (its magnitude on the oracle) gives the scale.
  figure_psnr, figure_iou,  puppet world, the pose error without a keypoint detector: the
  figure_centroid_error_px  figure is every pixel that differs from the world's background (the
                          oracle rendered with every keypoint off screen) by more than
                          `FIGURE_THRESHOLD` (sum over RGB). figure_psnr: PSNR over the oracle's
                          figure pixels; figure_iou: IoU of the generated and the oracle figure
                          masks; centroid error: distance between the masks' centroids (pixels).
                          A drifting background lowers the IoU, as it should.
Summaries (`summarize`): means over the whole run, the first and the last 10 s, and the good
horizon: the first time the trailing 1-second mean of PSNR falls below `good_psnr` dB (the
duration when it never does, with `good_horizon_reached_end`). With several `seconds`, one
rollout of the longest duration is run and each shorter duration is summarised on its prefix
(the controls and the noise of a shorter run are a prefix of the longer one's).

References (`report["references"]`, and a line under the summary table): `vae_reconstruction`,
PSNR/SSIM of the VAE's whole-clip reconstruction of the oracle's first `REFERENCE_SECONDS` (the
ceiling of any model decoded by this VAE), and `frozen_frame0`, the curves of a "model" that
repeats frame 0 (the floor of one that ignores the controls; drawn in the drift plots).

Throughput: each sampler is compiled ahead of time (`jit(...).lower(...).compile()`), then the
DiT chunks and the VAE decode steps are timed with `block_until_ready` on one stream (batch 1):
`dit_step_s` and `decode_step_s` (including the copy of the 4 frames to the host) per latent
frame, and `frames_per_s` of video.
Figures from `apt2_jax.benchmark` can be passed in `ModelSpec.benchmark` and are copied alongside.

Outputs under `out_dir`: `report.json` (all numbers, curves per model and world and their mean
over worlds), `drift_psnr.png`, `drift_ssim.png`, `control_error.png` (camera) or
`figure_error.png` (puppet), and `videos/`: `{model}_world{k}.mp4` (the whole rollout, generated |
oracle), `{model}_world{k}.gif` (the first seconds, under 1 MB) and `world{k}_all.gif` (oracle
and every model side by side).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from apt2_jax import media
from apt2_jax.data import captions
from apt2_jax.data import worlds as worlds_lib
from apt2_jax.models import CausalDiT, DiTConfig, kv_cache
from apt2_jax.models import vae as vae_lib
from apt2_jax.rollout import RolloutOptions, rollout

PSNR_CAP = 100.0            # dB reported for identical frames (JSON has no inf)
FIGURE_THRESHOLD = 48       # puppet figure mask: sum over RGB of |frame - background| (uint8)
GIF_MAX_BYTES = 1_000_000
FRAMES_PER_LATENT = vae_lib.TEMPORAL_FACTOR
SUMMARY_WINDOW_S = 10.0
RELATIVE_HORIZON_DB = 3.0   # `horizon_vs_vae_s`: PSNR within this many dB of the VAE's ceiling


# ================================================================================================
# Metrics (numpy; frames uint8 [..., H, W, 3])
# ================================================================================================

def psnr(a, b, mask=None, *, cap: Optional[float] = None) -> np.ndarray:
  """PSNR in dB of uint8 frames `[..., H, W, 3]`, one value per frame: `[...]`.

  `mask` `[..., H, W]` (bool) restricts the error to its pixels (NaN where it is empty). Identical
  frames give inf, or `cap` when given.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.shape[-1] != 3:
    raise ValueError(f"psnr needs two [..., H, W, 3] arrays of one shape, got {a.shape}, {b.shape}")
  err = np.square(a - b).sum(-1)  # [..., H, W]
  if mask is None:
    mse = err.mean(axis=(-2, -1)) / 3.0
  else:
    mask = np.broadcast_to(np.asarray(mask, bool), err.shape)
    count = mask.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
      mse = np.where(mask, err, 0.0).sum(axis=(-2, -1)) / (3.0 * count)
  with np.errstate(divide="ignore"):
    out = 10.0 * np.log10(255.0 ** 2 / mse)
  if cap is not None:
    out = np.where(np.isnan(out), np.nan, np.minimum(out, cap))
  return out


def ssim_map(a, b, win_size: int = 7) -> np.ndarray:
  """SSIM map of uint8 frames `[..., H, W, 3]`, averaged over channels: `[..., H, W]`.

  skimage's `structural_similarity` defaults (7x7 uniform window, sample covariance, K1 = 0.01,
  K2 = 0.03, data range 255); the map is valid `win_size // 2` pixels in from the border.
  """
  from scipy import ndimage
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  size = (1,) * (a.ndim - 3) + (win_size, win_size, 1)
  filt = lambda x: ndimage.uniform_filter(x, size=size, mode="reflect")
  n = win_size ** 2
  cov_norm = n / (n - 1.0)
  ux, uy = filt(a), filt(b)
  vx = cov_norm * (filt(a * a) - ux * ux)
  vy = cov_norm * (filt(b * b) - uy * uy)
  vxy = cov_norm * (filt(a * b) - ux * uy)
  c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
  s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
  return s.mean(-1)


def ssim(a, b, mask=None, win_size: int = 7) -> np.ndarray:
  """Mean SSIM per frame `[...]` of uint8 frames `[..., H, W, 3]`, over `mask` if given.

  The border `win_size // 2` pixels are left out (as skimage does); NaN where the mask is empty.
  """
  return masked_mean_ssim(ssim_map(a, b, win_size), mask, win_size)


def masked_mean_ssim(s, mask=None, win_size: int = 7) -> np.ndarray:
  """Mean of an `ssim_map` `[..., H, W]` per frame, over `mask` and away from the border."""
  pad = win_size // 2
  inner = np.zeros(s.shape[-2:], bool)
  inner[pad:s.shape[-2] - pad, pad:s.shape[-1] - pad] = True
  m = np.broadcast_to(inner, s.shape) if mask is None else np.asarray(mask, bool) & inner
  with np.errstate(invalid="ignore"):
    return np.where(m, s, 0.0).sum(axis=(-2, -1)) / m.sum(axis=(-2, -1))


def _gray(frame) -> np.ndarray:
  f = np.asarray(frame, np.float64)
  return f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114 if f.ndim == 3 else f


def phase_correlation(a, b) -> np.ndarray:
  """Translation `(dy, dx)` in pixels such that `b(y, x) ~ a(y - dy, x - dx)` (image content
  moved by `(dy, dx)` from `a` to `b`).

  `a`, `b`: `[H, W]` or `[H, W, 3]` frames. Normalised cross-power spectrum of the Hann-windowed,
  mean-removed grey images; the peak is refined to sub-pixel precision with a parabola through
  its neighbours along each axis. Recovers an integer shift of a textured image to a few
  hundredths of a pixel (the window makes the sub-pixel fit slightly biased).
  """
  a, b = _gray(a), _gray(b)
  h, w = a.shape
  window = np.outer(np.hanning(h), np.hanning(w))
  fa = np.fft.fft2((a - a.mean()) * window)
  fb = np.fft.fft2((b - b.mean()) * window)
  cross = fb * np.conj(fa)
  cross /= np.maximum(np.abs(cross), 1e-12)
  corr = np.real(np.fft.ifft2(cross))
  py, px = np.unravel_index(int(np.argmax(corr)), corr.shape)

  def refine(minus, centre, plus):
    denom = minus - 2 * centre + plus
    return 0.0 if abs(denom) < 1e-12 else float(np.clip(0.5 * (minus - plus) / denom, -0.5, 0.5))

  dy = py + refine(corr[(py - 1) % h, px], corr[py, px], corr[(py + 1) % h, px])
  dx = px + refine(corr[py, (px - 1) % w], corr[py, px], corr[py, (px + 1) % w])
  dy = dy - h if dy > h / 2 else dy
  dx = dx - w if dx > w / 2 else dx
  return np.array([dy, dx])


def figure_mask(frames, background) -> np.ndarray:
  """Puppet figure pixels `[..., H, W]`: where uint8 `frames` differ from `background`."""
  diff = np.abs(np.asarray(frames, np.int32) - np.asarray(background, np.int32)).sum(-1)
  return diff > FIGURE_THRESHOLD


def _centroid(mask) -> np.ndarray:
  """`[..., 2]` (y, x) centroid of each mask `[..., H, W]`; NaN when empty."""
  h, w = mask.shape[-2:]
  ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
  count = mask.sum(axis=(-2, -1))
  with np.errstate(invalid="ignore", divide="ignore"):
    cy = (mask * ys[:, None]).sum(axis=(-2, -1)) / count
    cx = (mask * xs[None, :]).sum(axis=(-2, -1)) / count
  return np.stack([cy, cx], -1)


def figure_metrics(generated, oracle, background) -> dict[str, np.ndarray]:
  """Puppet pose error per frame (see the module docstring): figure_psnr, figure_iou, centroid."""
  gen_mask, ref_mask = figure_mask(generated, background), figure_mask(oracle, background)
  inter = (gen_mask & ref_mask).sum(axis=(-2, -1))
  union = (gen_mask | ref_mask).sum(axis=(-2, -1))
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
  centroid = np.linalg.norm(_centroid(gen_mask) - _centroid(ref_mask), axis=-1)
  return {"figure_psnr": psnr(generated, oracle, ref_mask, cap=PSNR_CAP), "figure_iou": iou,
          "figure_centroid_error_px": centroid}


# ================================================================================================
# Worlds: long test trajectories, the oracle, the region visible in frame 0
# ================================================================================================

@dataclasses.dataclass
class TestWorld:
  """One held-out world and its trajectory. `controls` float32 [video_frames, control_dim]."""
  index: int
  seed: int
  trajectory: str
  caption: str
  text_tokens: np.ndarray
  controls: np.ndarray
  hover_segments: int = 0   # camera: 10 s segments that had to hover (no trajectory fitted)


def _camera_within_limits(world, controls, rotation, position, log_focal) -> bool:
  cfg = world.config
  if np.any(np.abs(controls) > worlds_lib.CAMERA_CONTROL_LIMITS * max(cfg.speed, 1.0)):
    return False
  rotations, positions, log_focals = worlds_lib.compose_camera(controls, rotation, position, log_focal)
  off_nadir = np.arccos(np.clip(-rotations[:, 2, 2], -1, 1))
  lo, hi = cfg.altitude_range
  return bool(np.all(off_nadir <= cfg.max_off_nadir) and np.all(positions[:, 2] >= lo)
              and np.all(positions[:, 2] <= hi) and np.all(log_focals >= cfg.zoom_range[0])
              and np.all(log_focals <= cfg.zoom_range[1]))


def long_controls(world, rng: np.random.Generator, num_frames: int, seed: int, trajectory: str,
                  segment_s: float = 10.0, fps: float = 24.0) -> tuple[np.ndarray, int]:
  """A trajectory of `num_frames` video frames for a long rollout: (controls, hover segments).

  The camera world's `random_controls` checks its limits (altitude, tilt, zoom) from the start
  pose over the whole length, which a minute-long random walk almost never satisfies (it then
  returns a still camera). So the camera's trajectory is drawn in `segment_s` segments, each
  continuing from the pose the previous ones reached and redrawn until it stays inside the
  limits (a segment that never does hovers). Other worlds draw the whole length at once. A
  shorter run's controls are a prefix of a longer run's (same rng draws, segment by segment).
  """
  if world.name != "camera":
    return np.asarray(world.random_controls(rng, num_frames, trajectory=trajectory, seed=seed),
                      np.float32), 0
  scene = world._scene(seed)  # pylint: disable=protected-access
  rotation, position, log_focal = scene["rotation"], scene["position"], 0.0
  seg = max(1, int(round(segment_s * fps)))
  parts, hover = [np.zeros((1, 5), np.float32)], 0
  while sum(len(p) for p in parts) < num_frames:
    for _ in range(8):
      c = np.asarray(world.random_controls(rng, seg + 1, trajectory=trajectory, seed=seed),
                     np.float32)[1:]
      if np.any(c) and _camera_within_limits(world, c, rotation, position, log_focal):
        break
    else:
      c, hover = np.zeros((seg, 5), np.float32), hover + 1
    rotations, positions, log_focals = worlds_lib.compose_camera(c, rotation, position, log_focal)
    rotation, position, log_focal = rotations[-1], positions[-1], float(log_focals[-1])
    parts.append(c)
  return np.concatenate(parts)[:num_frames], hover


def held_out_worlds(world, num_worlds: int, num_frames: int, fps: float = 24.0) -> list[TestWorld]:
  """The first `num_worlds` worlds of the held-out `test` split, each with a long trajectory."""
  out = []
  for k in range(num_worlds):
    seed = worlds_lib.split_seed("test", k)
    rng = np.random.default_rng([seed, 1])
    pool = world.trajectory_pools[worlds_lib.seed_split(seed)]
    trajectory = str(pool[rng.integers(len(pool))])
    controls, hover = long_controls(world, rng, num_frames, seed, trajectory, fps=fps)
    caption = world.caption(seed, trajectory)
    out.append(TestWorld(k, seed, trajectory, caption, captions.tokenize(caption), controls, hover))
  return out


def render_oracle(world, controls, seed: int, start: int, stop: int) -> np.ndarray:
  """Oracle frames `[start, stop)` of `controls`, uint8 `[stop - start, H, W, 3]`.

  The camera world renders frame by frame from the composed poses and the puppet world from each
  frame's keypoints, so a chunk costs only its own frames; other worlds render the prefix
  (`evaluate_models` renders them in one call).
  """
  if world.name == "camera":
    scene = world._scene(seed)  # pylint: disable=protected-access
    rotations, positions, log_focals = world.poses(controls[:stop], seed)
    frames = [world._render_frame(scene, rotations[t], positions[t], log_focals[t])  # pylint: disable=protected-access
              for t in range(start, stop)]
    return np.clip(np.round(np.stack(frames) * 255.0), 0, 255).astype(np.uint8)
  if world.name == "puppet":
    return world.render(controls[start:stop], seed)
  return world.render(controls[:stop], seed)[start:]


def world_background(world, seed: int) -> Optional[np.ndarray]:
  """Puppet world: the background alone (every keypoint rendered far off screen), uint8."""
  if world.name != "puppet":
    return None
  return world.render(np.full((1, world.control_dim), -10.0, np.float32), seed)[0]


def visible_mask(world, controls, seed: int, start: int, stop: int) -> np.ndarray:
  """Pixels of frames `[start, stop)` whose world point was in view in frame 0: bool [T, H, W].

  Camera world only (see the module docstring); other worlds have a still camera: all True.
  """
  cfg = world.config
  shape = (stop - start, cfg.height, cfg.width)
  if world.name != "camera":
    return np.ones(shape, bool)
  heights = getattr(worlds_lib, "_LAYER_HEIGHTS", (0.0, 0.3, 0.9))
  rotations, positions, log_focals = world.poses(controls[:stop], seed)
  r0, p0 = rotations[0], positions[0]
  focal0 = 0.5 * cfg.width / np.tan(np.deg2rad(cfg.fov_deg) / 2) * np.exp(log_focals[0])

  def in_view0(camera_coords):  # [H, W, 3] in camera 0's frame
    z = camera_coords[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
      u = focal0 * camera_coords[..., 0] / z
      v = focal0 * camera_coords[..., 1] / z
    return (z > 1e-9) & (np.abs(u) <= cfg.width / 2) & (np.abs(v) <= cfg.height / 2)

  out = np.empty(shape, bool)
  for i, t in enumerate(range(start, stop)):
    rays = world.pixel_rays(log_focals[t]) @ rotations[t].T  # world directions [H, W, 3]
    position = positions[t]
    visible = np.ones(shape[1:], bool)
    ground_hit = np.zeros(shape[1:], bool)
    for height in heights:
      with np.errstate(divide="ignore", invalid="ignore"):
        s = (height - position[2]) / rays[..., 2]
      hit = np.isfinite(s) & (s > 1e-6)
      if height == heights[0]:
        ground_hit = hit
      points = position + np.where(hit, s, 0.0)[..., None] * rays
      visible &= ~hit | in_view0((points - p0) @ r0)
    # Rays that miss the ground end in the sky, which is at infinity: only the direction counts.
    visible &= ground_hit | in_view0(rays @ r0)
    out[i] = visible
  return out


# ================================================================================================
# Models
# ================================================================================================

@dataclasses.dataclass
class ModelSpec:
  """A generator to evaluate: the DiT, its sampler and the VAE that encodes frame 0 and decodes.

  Attributes:
    dit_config, params: the causal DiT and its parameters (a plain pytree, no 'params' wrapper).
    vae_config, vae_params: the VAE (`vae_params` = `{'params': ...}`).
    num_steps, shift, cache_from: the per-frame Euler sampler (`RolloutOptions`); 1 step = the
      one-step AAPT generator.
    guidance: classifier-free guidance weight (1 = off; otherwise a doubled batch, `GuidedDiT`).
    recycle: False for the no-recycling ablation.
    text_len: caption tokens fed to the model (the training run's `config.data.text_len`).
    height, width: the training resolution (defaults of `evaluate_models`), or None.
    benchmark: throughput figures from `apt2_jax.benchmark`, copied into the report.
    source: where it came from (a workdir), for the report.
  """
  dit_config: DiTConfig
  params: Any
  vae_config: vae_lib.VAEConfig
  vae_params: Any
  num_steps: int = 1
  shift: float = 1.0
  guidance: float = 1.0
  recycle: bool = True
  cache_from: str = "first"
  text_len: int = captions.MAX_LEN
  height: Optional[int] = None
  width: Optional[int] = None
  benchmark: Optional[dict] = None
  source: str = ""

  @property
  def options(self) -> RolloutOptions:
    return RolloutOptions(num_steps=int(self.num_steps), shift=float(self.shift),
                          recycle=bool(self.recycle), cache_from=self.cache_from)

  @property
  def forward_passes_per_frame(self) -> int:
    n = int(self.num_steps) + (1 if self.num_steps > 1 and self.cache_from == "clean" else 0)
    return n * (2 if self.guidance != 1.0 else 1)

  def describe(self) -> dict:
    return {"num_steps": int(self.num_steps), "shift": float(self.shift),
            "guidance": float(self.guidance), "recycle": bool(self.recycle),
            "cache_from": self.cache_from, "forward_passes_per_frame": self.forward_passes_per_frame,
            "source": self.source, "dit": {"dim": self.dit_config.dim,
                                           "num_layers": self.dit_config.num_layers,
                                           "window": self.dit_config.window,
                                           "control_channels": self.dit_config.control_channels}}


_VAE_CACHE: dict[str, tuple] = {}


def _load_vae(path: Optional[str], config) -> tuple[vae_lib.VAEConfig, Any]:
  if path:
    if path not in _VAE_CACHE:
      from apt2_jax.stages import vae as vae_stage
      model, params = vae_stage.load_vae(path)
      _VAE_CACHE[path] = (model.config, params if "params" in params else {"params": params})
    return _VAE_CACHE[path]
  from apt2_jax.stages.common import vae_config_from
  block = config.get("vae") or {}
  logging.warning("no VAE given and config.vae.checkpoint is empty: decoding with a RANDOM %r VAE",
                  block.get("size", "tiny"))
  cfg = vae_config_from(block)
  return cfg, vae_lib.init_params(vae_lib.VAE(cfg), jax.random.key(0), 16, 16)


def model_spec_from_workdir(workdir: str, *, vae_workdir: Optional[str] = None, num_steps: int = 1,
                            shift: float = 1.0, guidance: float = 1.0, recycle: bool = True,
                            key: str = "ema_params", cache_from: str = "first") -> ModelSpec:
  """A `ModelSpec` from a training workdir (any stage): `key` parameters, `config.model`.

  `vae_workdir`: a `vae`/`vae_distill` workdir or a diffusers AutoencoderKLWan folder; None uses
  the run's `config.vae.checkpoint` (a random VAE, with a warning, when that is empty too).
  """
  from apt2_jax import checkpointing
  params, config = checkpointing.load_params(workdir, key=key)
  dit_config = DiTConfig.from_dict(dict(config.model))
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(dit_config.param_dtype)), params)
  vae_path = vae_workdir or (config.get("vae") or {}).get("checkpoint", "")
  vae_config, vae_params = _load_vae(vae_path, config)
  if vae_config.z_dim != dit_config.latent_channels:
    raise ValueError(f"{workdir}: the VAE has {vae_config.z_dim} latent channels, the DiT "
                     f"{dit_config.latent_channels}")
  data = config.get("data") or {}
  return ModelSpec(dit_config, params, vae_config, vae_params, num_steps=num_steps, shift=shift,
                   guidance=guidance, recycle=recycle, cache_from=cache_from,
                   text_len=int(data.get("text_len", 16) or 16),
                   height=int(data["height"]) if data.get("height") else None,
                   width=int(data["width"]) if data.get("width") else None, source=str(workdir))


def model_controls(spec: ModelSpec, world_name: str, controls, start: int, stop: int,
                   latent_hw: tuple[int, int]) -> Optional[np.ndarray]:
  """Control input of latent frames `[start, stop)` (>= 1): float32 `[stop - start, h, w, Cc]`.

  Latent frame j covers video frames 4j-3 .. 4j (`stages.common.latent_controls`); the layout of
  the channels is `inference.controls.control_maps` (the trainer's 4 x control_dim, or maps).
  Latent frames past the end of `controls` repeat no motion (chunk padding).
  """
  channels = spec.dit_config.control_channels
  if not channels:
    return None
  from apt2_jax.inference import controls as controls_lib
  kind = controls_lib.WORLD_CONTROL_TYPES[world_name]
  d = controls.shape[1]
  out = []
  for j in range(start, stop):
    rows = controls[4 * j - 3:4 * j + 1]
    if len(rows) < FRAMES_PER_LATENT:
      rows = np.concatenate([rows, np.repeat(controls[-1:] * (kind == "pose"),
                                             FRAMES_PER_LATENT - len(rows), 0)])
    rows = rows.reshape(FRAMES_PER_LATENT, d)
    if kind == "pose":
      rows = rows.reshape(FRAMES_PER_LATENT, -1, 2)
    out.append(controls_lib.control_maps(kind, rows, latent_hw, channels))
  return np.stack(out).astype(np.float32)


def stream_noise(seed, start, length, shape):
  """Noise of steps `start .. start + length - 1`, `[B, length, h, w, C]` for `shape` =
  `[B, 1, h, w, C]`: step i draws `normal(fold_in(key(seed), i), shape)`, exactly the
  `StreamingGenerator`'s noise, so a chunked stream equals an uninterrupted one."""
  draw = lambda i: jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), shape, jnp.float32)
  noise = jax.vmap(draw)(start + jnp.arange(length))  # [L, B, 1, h, w, C]
  return jnp.swapaxes(noise[:, :, 0], 0, 1)


@dataclasses.dataclass
class _StreamFunctions:
  """Jitted stream functions of one (DiT, VAE, sampler, chunk, size) combination, with the
  ahead-of-time compiled chunk and later-frame decode once they have been built."""
  text: Any
  chunk: Any
  encode: Any
  decode: Any
  compiled_chunk: Any = None
  compiled_decode: Any = None


@functools.lru_cache(maxsize=16)
def _stream_functions(dit_config: DiTConfig, vae_config: vae_lib.VAEConfig, options: RolloutOptions,
                      guidance: float, chunk_frames: int, h: int, w: int) -> _StreamFunctions:
  """Shared by every `Sampler` of the same configs (models that differ only in parameters
  compile once). Unsharded: everything runs where the parameters live. Donated: the KV cache
  (chunk) and the decoder's feature cache (decode)."""
  c, window = dit_config, dit_config.window
  guided = guidance != 1.0
  model = CausalDiT(c)
  if guided:
    from apt2_jax.stages.common import GuidedDiT
    net = GuidedDiT(c, float(guidance))
  else:
    net = model

  def text_fn(params, tokens):
    if c.caption_vocab_size:
      text = tokens
    else:  # a text-embedding model (Wan): no prompt, one zero embedding
      text = jnp.zeros((tokens.shape[0], 1, c.text_dim), jnp.float32)
    if guided:  # [conditional | unconditional], as `stages.common.stream_sample`
      text = jnp.concatenate([text, jnp.zeros_like(text)], axis=0)
    return model.apply({"params": params}, text, method=CausalDiT.encode_text)

  def chunk_fn(params, cache, recycled, text_kv, seed, start, controls):
    noise = stream_noise(seed, start, chunk_frames, (1, 1, h, w, c.latent_channels))
    p = {"inner": params} if guided else params
    frames, cache = rollout(net, p, recycled, text_kv, noise, controls, cache=cache, options=options)
    # Keep the index bounded: the cache layout depends only on min(i, N + 1) and i mod N.
    index = cache["index"]
    cache = dict(cache, index=index - window * jnp.maximum((index - (window + 1)) // window, 0))
    nxt = frames[:, -1:] if options.recycle else jnp.zeros_like(frames[:, -1:])
    return frames, cache, nxt

  vae = vae_lib.VAE(vae_config)

  def encode_fn(vae_params, image):
    video = image.astype(jnp.float32)[:, None] / 127.5 - 1.0
    mean, _ = vae.apply(vae_params, video, method=vae_lib.VAE.encode)
    return vae_lib.normalize_latents(mean, vae_config)

  def decode_fn(vae_params, cache, latent, first):
    z = vae_lib.denormalize_latents(latent, vae_config)
    video, cache = vae.apply(vae_params, z, cache, first, method=vae_lib.VAE.decode_step)
    return jnp.round((jnp.clip(video, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8), cache

  return _StreamFunctions(jax.jit(text_fn), jax.jit(chunk_fn, donate_argnums=(1,)),
                          jax.jit(encode_fn), jax.jit(decode_fn, static_argnums=(3,), donate_argnums=(1,)))


class Sampler:
  """A model's compiled stream: `start(first_image, ...)`, then `chunk(controls, n)` -> frames.

  The DiT runs `chunk_frames` latent frames per call through `rollout` carrying the KV cache
  (the last chunk is padded); the VAE decodes one latent frame per `decode_step`. Both caches
  have fixed shapes, so a 5-minute stream holds no more memory than a 5-second one. Times are
  accumulated in `dit_time` / `decode_time` (seconds, compile excluded: both are compiled ahead
  of time before the first timed call).
  """

  def __init__(self, spec: ModelSpec, height: int, width: int, chunk_frames: int):
    if height % 16 or width % 16:
      raise ValueError(f"height={height} and width={width} must be multiples of 16 (VAE 8 x patch 2)")
    self.spec, self.chunk_frames = spec, int(chunk_frames)
    self.h, self.w = height // vae_lib.SPATIAL_FACTOR, width // vae_lib.SPATIAL_FACTOR
    self.vae = vae_lib.VAE(spec.vae_config)
    self.batch = 2 if spec.guidance != 1.0 else 1
    self.fns = _stream_functions(spec.dit_config, spec.vae_config, spec.options, float(spec.guidance),
                                 self.chunk_frames, self.h, self.w)
    self.dit_time = self.decode_time = 0.0
    self.dit_frames = self.decode_frames = 0

  def _compile(self, args):
    fns = self.fns
    if fns.compiled_chunk is None:
      fns.compiled_chunk = fns.chunk.lower(*args).compile()
    if fns.compiled_decode is None:
      latent = jax.ShapeDtypeStruct((1, 1, self.h, self.w, self.spec.dit_config.latent_channels), jnp.float32)
      cache = jax.eval_shape(lambda: vae_lib.init_decode_cache(self.vae, 1, self.h, self.w))
      fns.compiled_decode = fns.decode.lower(self.spec.vae_params, cache, latent, False).compile()

  def encode(self, image: np.ndarray):
    """uint8 `[H, W, 3]` -> the normalised latent frame `[1, 1, h, w, C]`."""
    return self.fns.encode(self.spec.vae_params, jnp.asarray(image)[None])

  def start(self, image: np.ndarray, tokens: np.ndarray, seed: int) -> np.ndarray:
    """Encodes uint8 `[H, W, 3]` frame 0; returns its decoded uint8 `[1, H, W, 3]`."""
    spec = self.spec
    latent0 = self.encode(image)
    self.text_kv = self.fns.text(spec.params, jnp.asarray(tokens, jnp.int32)[None])
    self.cache = kv_cache.init_cache(spec.dit_config, self.batch, self.h, self.w)
    self.recycled = latent0.astype(jnp.float32)
    self.seed, self.index = int(seed), 0
    self.decode_cache = vae_lib.init_decode_cache(self.vae, 1, self.h, self.w)
    frame0, self.decode_cache = self.fns.decode(spec.vae_params, self.decode_cache, latent0, True)
    return np.asarray(frame0[0])

  def chunk(self, controls: Optional[np.ndarray], num_frames: int) -> Iterator[np.ndarray]:
    """Generates the next `chunk_frames` latent frames; yields the first `num_frames` decoded,
    each uint8 `[4, H, W, 3]`. `controls`: `[chunk_frames, h, w, Cc]` or None."""
    spec = self.spec
    ctrl = None if controls is None else jnp.asarray(controls)[None]
    args = (spec.params, self.cache, self.recycled, self.text_kv, jnp.int32(self.seed),
            jnp.int32(self.index), ctrl)
    self._compile(args)
    t0 = time.perf_counter()
    frames, self.cache, self.recycled = self.fns.compiled_chunk(*args)
    frames.block_until_ready()
    self.dit_time += time.perf_counter() - t0
    self.dit_frames += self.chunk_frames
    self.index += self.chunk_frames
    self.last_latents = frames  # [1, chunk_frames, h, w, C] (tests compare with stream_sample)
    for i in range(num_frames):
      t0 = time.perf_counter()
      video, self.decode_cache = self.fns.compiled_decode(spec.vae_params, self.decode_cache,
                                                          frames[:, i:i + 1])
      video = np.asarray(video[0])
      self.decode_time += time.perf_counter() - t0
      self.decode_frames += 1
      yield video

  def throughput(self) -> dict:
    dit = self.dit_time / max(self.dit_frames, 1)
    dec = self.decode_time / max(self.decode_frames, 1)
    return {"dit_step_s": dit, "decode_step_s": dec,
            "latent_frames_per_s": 1.0 / max(dit + dec, 1e-12),
            "frames_per_s": FRAMES_PER_LATENT / max(dit + dec, 1e-12),
            "dit_only_frames_per_s": FRAMES_PER_LATENT / max(dit, 1e-12),
            "batch": 1, "device": str(jax.devices()[0].device_kind), "source": "measured"}


# ================================================================================================
# Summaries
# ================================================================================================

LATENT_CURVES = ("control_error_px", "oracle_motion_px")  # one value per latent step, not per frame


def good_horizon(curve: np.ndarray, fps: float, threshold: float) -> tuple[float, bool]:
  """(seconds, reached_end): first time the trailing 1 s mean of `curve` drops below `threshold`."""
  curve = np.asarray(curve, np.float64)
  win = max(1, int(round(fps)))
  filled = np.nan_to_num(curve, nan=threshold, posinf=PSNR_CAP)
  csum = np.concatenate([[0.0], np.cumsum(filled)])
  idx = np.arange(len(curve))
  lo = np.maximum(idx + 1 - win, 0)
  mean = (csum[idx + 1] - csum[lo]) / (idx + 1 - lo)
  below = np.nonzero(mean < threshold)[0]
  if len(below) == 0:
    return len(curve) / fps, True
  return float(below[0]) / fps, False


def _nanmean(x) -> Optional[float]:
  x = np.asarray(x, np.float64)
  x = x[np.isfinite(x)]
  return float(x.mean()) if x.size else None


def summarize(curves: Mapping[str, np.ndarray], fps: float, good_psnr: float,
              video_frames: Optional[int] = None, relative_psnr: Optional[float] = None) -> dict:
  """Per-curve means (all, first 10 s, last 10 s) over the first `video_frames` frames, and the
  good horizon of `psnr` (and `psnr_visible`). Latent-step curves (`control_error_px`,
  `oracle_motion_px`) are cut to the matching number of latent steps. With `relative_psnr` (the
  VAE's reconstruction PSNR minus `RELATIVE_HORIZON_DB`), `psnr` also gets `horizon_vs_vae_s`:
  the good horizon at that threshold, meaningful when the VAE itself stays under `good_psnr`."""
  out = {}
  n = video_frames or len(curves["psnr"])
  duration = n / fps
  for name, curve in curves.items():
    curve = np.asarray(curve, np.float64)
    rate = fps / FRAMES_PER_LATENT if name in LATENT_CURVES else fps
    m = (n - 1) // FRAMES_PER_LATENT if name in LATENT_CURVES else n
    curve = curve[:m]
    k = max(1, int(round(SUMMARY_WINDOW_S * rate)))
    out[name] = {"mean": _nanmean(curve), "first_10s": _nanmean(curve[:k]),
                 "last_10s": _nanmean(curve[-k:])}
  for name in ("psnr", "psnr_visible"):
    if name in curves:
      seconds, reached = good_horizon(np.asarray(curves[name])[:n], fps, good_psnr)
      out[name]["good_horizon_s"] = seconds
      out[name]["good_horizon_reached_end"] = reached
  if relative_psnr is not None and "psnr" in curves:
    seconds, reached = good_horizon(np.asarray(curves["psnr"])[:n], fps, relative_psnr)
    out["psnr"]["horizon_vs_vae_s"] = seconds
    out["psnr"]["horizon_vs_vae_reached_end"] = reached
    out["psnr"]["horizon_vs_vae_threshold"] = float(relative_psnr)
  out["duration_s"] = duration
  return out



def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, (np.floating, float)):
    x = float(x)
    return float(f"{x:.6g}") if math.isfinite(x) else None
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, np.bool_):
    return bool(x)
  return x


# ================================================================================================
# Videos and plots
# ================================================================================================

def side_by_side(*panels: np.ndarray, gap: int = 2) -> np.ndarray:
  """Concatenates uint8 `[T, H, W, 3]` panels along the width with white gaps."""
  t, h = panels[0].shape[:2]
  sep = np.full((t, h, gap, 3), 255, np.uint8)
  out = [panels[0]]
  for p in panels[1:]:
    out += [sep, p]
  return np.concatenate(out, axis=2)


def write_small_gif(path: str, frames: np.ndarray, fps: float, max_bytes: int = GIF_MAX_BYTES) -> str:
  """A GIF of `frames` under `max_bytes`: every 2nd frame, then fewer frames until it fits."""
  frames, rate = frames[::2], fps / 2
  while True:
    media.write_gif(path, frames, rate)
    if os.path.getsize(path) <= max_bytes or len(frames) <= 2:
      return path
    frames = frames[: max(2, len(frames) * 2 // 3)]


def _label(frames: np.ndarray, text: str, height: int = 12) -> np.ndarray:
  """Puts a `height`-pixel banner with `text` (pillow's default font) above every frame."""
  from PIL import Image, ImageDraw
  img = Image.new("RGB", (frames.shape[2], height))
  ImageDraw.Draw(img).text((1, 0), text, fill=(255, 255, 255))
  banner = np.asarray(img, np.uint8)
  return np.concatenate([np.broadcast_to(banner, (len(frames),) + banner.shape), frames], axis=1)


def plot_curves(path: str, series: Mapping[str, Mapping[str, np.ndarray]], keys: Sequence[str],
                rate: float, ylabel: str, title: str, average: int = 1, offset: int = 0):
  """One PNG: for each model (colour), each key (solid, dashed, dotted) against seconds.

  Point i of a curve is at `(i + offset) / rate` seconds; `average` > 1 plots block means."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
  styles = ["-", "--", ":", "-."]
  for i, (name, curves) in enumerate(series.items()):
    colour = f"C{i % 10}"
    for key, style in zip(keys, styles):
      if key not in curves:
        continue
      y = np.asarray(curves[key], np.float64)
      if average > 1 and len(y) >= average:
        n = len(y) // average * average
        y = np.nanmean(y[:n].reshape(-1, average), axis=1)
        x = (np.arange(len(y)) * average + (average - 1) / 2 + offset) / rate
      else:
        x = (np.arange(len(y)) + offset) / rate
      ax.plot(x, y, style, color=colour, lw=1.2, label=f"{name} ({key})")
  ax.set_xlabel("seconds")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


# ================================================================================================
# evaluate_models
# ================================================================================================

def _mean_curves(per_world: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  out = {}
  for key in per_world[0]:
    stack = np.stack([np.asarray(w[key], np.float64) for w in per_world])
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN frames (e.g. no figure) stay NaN
      out[key] = np.nanmean(stack, axis=0)
  return out


REFERENCE_SECONDS = 4.0   # the VAE-reconstruction reference covers the first 4 s of each world


@functools.lru_cache(maxsize=4)
def _reconstruct_function(vae_config: vae_lib.VAEConfig):
  """One jitted encode+decode per VAE config (compiled once for all held-out worlds)."""
  vae = vae_lib.VAE(vae_config)
  return jax.jit(lambda p, v: vae.apply(p, vae.apply(p, v, method=vae_lib.VAE.encode)[0],
                                        method=vae_lib.VAE.decode))


def vae_reconstruction(spec: ModelSpec, frames: np.ndarray) -> np.ndarray:
  """uint8 `[1+4k, H, W, 3]` -> the VAE's whole-clip reconstruction (posterior mean), uint8."""
  video = jnp.asarray(frames, jnp.float32)[None] / 127.5 - 1.0
  out = _reconstruct_function(spec.vae_config)(spec.vae_params, video)[0]
  return np.asarray(jnp.round((jnp.clip(out, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8))


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


def evaluate_models(models: Mapping[str, ModelSpec], *, world: str = "camera", num_worlds: int = 2,
                    seconds: float | Sequence[float] = 60.0, fps: float = 24.0,
                    height: Optional[int] = None, width: Optional[int] = None,
                    out_dir: str = "eval", seed: int = 0, progress: bool = True,
                    good_psnr: float = 20.0, chunk_frames: int = 24, gif_seconds: float = 4.0,
                    write_videos: bool = True, world_config: Optional[Mapping[str, Any]] = None) -> dict:
  """Streams every model on the same held-out worlds and compares it with the oracle.

  Args:
    models: name -> ModelSpec (e.g. `model_spec_from_workdir`).
    world: "camera", "puppet" or "bouncing".
    num_worlds: test worlds (`split_seed("test", k)`, k < num_worlds).
    seconds: rollout duration(s); the longest is run, each is summarised on its prefix.
      `seconds * fps` video frames, rounded up to whole latent frames (+ frame 0).
    height, width: pixels (multiples of 16); default: the first model's training resolution.
    seed: the noise seed (the same for every model; fold_in'd with the world index).
    good_psnr: dB threshold of the good horizon.
    chunk_frames: latent frames per compiled DiT call (bounded memory; the last is padded).
    gif_seconds: length of the GIFs (the MP4s hold the whole rollout).
    world_config: extra `WorldConfig` fields (e.g. speed) for the worlds.
  Returns:
    the report (also written to `out_dir/report.json`), see the module docstring.
  """
  if not models:
    raise ValueError("evaluate_models needs at least one model")
  first = next(iter(models.values()))
  height = int(height or first.height or 64)
  width = int(width or first.width or 64)
  durations = sorted({float(s) for s in (seconds if isinstance(seconds, (list, tuple)) else [seconds])})
  if durations[0] <= 0:
    raise ValueError(f"seconds={seconds} must be positive")
  latent_steps = max(1, math.ceil(durations[-1] * fps / FRAMES_PER_LATENT))  # generated latent frames
  num_frames = 1 + FRAMES_PER_LATENT * latent_steps
  wcfg = worlds_lib.WorldConfig(height=height, width=width, num_frames=num_frames, **dict(world_config or {}))
  env = worlds_lib.make_world(world, wcfg)
  os.makedirs(out_dir, exist_ok=True)
  video_dir = os.path.join(out_dir, "videos")
  if write_videos:
    os.makedirs(video_dir, exist_ok=True)
  from tqdm import tqdm
  bar = lambda **kw: tqdm(disable=not progress, file=sys.stderr, dynamic_ncols=True, **kw)

  tests = held_out_worlds(env, num_worlds, num_frames, fps)
  samplers = {name: Sampler(spec, height, width, chunk_frames) for name, spec in models.items()}
  results = {name: [] for name in models}
  gif_frames = max(2, int(round(gif_seconds * fps)))
  references = {"vae_reconstruction": [], "frozen_frame0": []}
  scratch = tempfile.mkdtemp(prefix="oracle_", dir=out_dir)
  try:
    for tw in tests:
      # ---- the oracle of this world: rendered once into a memory-mapped file (bounded memory)
      oracle = np.lib.format.open_memmap(os.path.join(scratch, f"oracle{tw.index}.npy"), "w+",
                                         np.uint8, (num_frames, height, width, 3))
      visible = np.lib.format.open_memmap(os.path.join(scratch, f"visible{tw.index}.npy"), "w+",
                                          bool, (num_frames, height, width))
      with bar(total=num_frames, desc=f"oracle world {tw.index}", unit="frame") as b:
        # Camera and puppet frames render independently; other worlds simulate from frame 0.
        step = 96 if world in ("camera", "puppet") else num_frames
        for a in range(0, num_frames, step):
          z = min(num_frames, a + step)
          oracle[a:z] = render_oracle(env, tw.controls, tw.seed, a, z)
          visible[a:z] = visible_mask(env, tw.controls, tw.seed, a, z)
          b.update(z - a)
      background = world_background(env, tw.seed)
      # ---- references: the VAE's reconstruction of the oracle (the ceiling of any model behind
      # this VAE) and a frozen frame 0 (the floor of a model that ignores the controls)
      n_ref = min(num_frames, 1 + FRAMES_PER_LATENT * max(1, int(REFERENCE_SECONDS * fps) // FRAMES_PER_LATENT))
      ref_frames = np.array(oracle[:n_ref])
      recon = vae_reconstruction(first, ref_frames)
      references["vae_reconstruction"].append(
          {"psnr": float(np.mean(psnr(recon, ref_frames, cap=PSNR_CAP))),
           "ssim": float(np.mean(ssim(recon, ref_frames))), "frames": int(n_ref)})
      references["frozen_frame0"].append(frozen_frame_curves(oracle))
      oracle_motion = np.array([phase_correlation(oracle[4 * j - 4], oracle[4 * j])
                                for j in range(1, latent_steps + 1)]) if world == "camera" else None
      panels = {"oracle": [np.array(oracle[:gif_frames])]}
      noise_seed = int(np.random.SeedSequence([seed, tw.index]).generate_state(1)[0] & 0x7FFFFFFF)

      for name, spec in models.items():
        sampler = samplers[name]
        frame0 = sampler.start(np.array(oracle[0]), tw.text_tokens[:spec.text_len], noise_seed)
        curves = {k: [] for k in ("psnr", "ssim", "psnr_visible", "ssim_visible", "visible_fraction")}
        extra = {k: [] for k in ("figure_psnr", "figure_iou", "figure_centroid_error_px")}
        motion = []
        stem = os.path.join(video_dir, f"{name}_world{tw.index}")
        writer = media.VideoWriter(stem + ".mp4", fps) if write_videos else None
        kept = []

        def consume(frames, a):
          ref = np.asarray(oracle[a:a + len(frames)])
          vis = np.asarray(visible[a:a + len(frames)])
          curves["psnr"].append(psnr(frames, ref, cap=PSNR_CAP))
          smap = ssim_map(frames, ref)
          curves["ssim"].append(masked_mean_ssim(smap))
          curves["psnr_visible"].append(psnr(frames, ref, vis, cap=PSNR_CAP))
          curves["ssim_visible"].append(masked_mean_ssim(smap, vis))
          curves["visible_fraction"].append(vis.mean(axis=(-2, -1)))
          if background is not None:
            for k, v in figure_metrics(frames, ref, background).items():
              extra[k].append(v)
          if writer is not None:
            writer.write(side_by_side(frames, ref))
          if sum(len(k) for k in kept) < gif_frames:
            kept.append(frames)

        consume(frame0, 0)
        previous = frame0[-1]
        done = 0
        with bar(total=latent_steps, desc=f"{name} world {tw.index}", unit="latent frame") as b:
          while done < latent_steps:
            n = min(chunk_frames, latent_steps - done)
            ctrl = model_controls(spec, world, tw.controls, done + 1, done + 1 + chunk_frames,
                                  (sampler.h, sampler.w))
            for video in sampler.chunk(ctrl, n):
              done += 1
              consume(video, 1 + 4 * (done - 1))
              if oracle_motion is not None:
                motion.append(phase_correlation(previous, video[-1]))
              previous = video[-1]
              b.update(1)
        if writer is not None:
          writer.close()
        out = {k: np.concatenate(v) for k, v in curves.items()}
        if background is not None:
          out.update({k: np.concatenate(v) for k, v in extra.items()})
        if oracle_motion is not None:
          out["control_error_px"] = np.linalg.norm(np.array(motion) - oracle_motion, axis=-1)
          out["oracle_motion_px"] = np.linalg.norm(oracle_motion, axis=-1)
        entry = {"world_index": tw.index, "seed": tw.seed, "trajectory": tw.trajectory,
                 "caption": tw.caption, "hover_segments": tw.hover_segments, "curves": out}
        if write_videos:
          kept_frames = np.concatenate(kept)[:gif_frames]
          write_small_gif(stem + ".gif", side_by_side(kept_frames, np.array(oracle[:len(kept_frames)])), fps)
          entry["videos"] = {"mp4": os.path.relpath(stem + ".mp4", out_dir),
                             "gif": os.path.relpath(stem + ".gif", out_dir)}
          panels[name] = [kept_frames]
        results[name].append(entry)
      if write_videos:
        labelled = [_label(np.concatenate(v)[:gif_frames], k) for k, v in panels.items()]
        n = min(len(p) for p in labelled)
        write_small_gif(os.path.join(video_dir, f"world{tw.index}_all.gif"),
                        side_by_side(*[p[:n] for p in labelled]), fps)
      del oracle, visible
  finally:
    shutil.rmtree(scratch, ignore_errors=True)

  # ---- the report
  report = {"config": {"world": world, "num_worlds": num_worlds, "seconds": durations, "fps": fps,
                       "height": height, "width": width, "seed": seed,
                       "latent_frames": latent_steps + 1, "video_frames": num_frames,
                       "chunk_frames": chunk_frames, "good_psnr": good_psnr, "psnr_cap": PSNR_CAP,
                       "world_seeds": [t.seed for t in tests],
                       "world_config": dataclasses.asdict(wcfg),
                       "definitions": __doc__.split("Metrics", 1)[1].split("Throughput")[0].strip()},
            "models": {}}
  mean_curves = {}
  vae_ref = references["vae_reconstruction"]
  relative = float(np.mean([r["psnr"] for r in vae_ref])) - RELATIVE_HORIZON_DB
  frames_of = lambda d: min(num_frames, 1 + FRAMES_PER_LATENT * math.ceil(d * fps / FRAMES_PER_LATENT))
  for name, spec in models.items():
    per_world = results[name]
    for e in per_world:
      e["summary"] = {f"{d:g}s": summarize(e["curves"], fps, good_psnr, frames_of(d), relative)
                      for d in durations}
    mean_curves[name] = _mean_curves([e["curves"] for e in per_world])
    throughput = samplers[name].throughput()
    report["models"][name] = {
        "sampler": spec.describe(),
        "throughput": throughput,
        "benchmark": spec.benchmark,
        "summary": {f"{d:g}s": summarize(mean_curves[name], fps, good_psnr, frames_of(d), relative)
                    for d in durations},
        "mean_curves": mean_curves[name],
        "worlds": per_world,
    }

  frozen = _mean_curves(references["frozen_frame0"])
  report["references"] = {
      "vae_reconstruction": {"psnr": float(np.mean([r["psnr"] for r in vae_ref])),
                             "ssim": float(np.mean([r["ssim"] for r in vae_ref])),
                             "seconds": (vae_ref[0]["frames"] - 1) / fps, "worlds": vae_ref},
      "frozen_frame0": {"summary": {f"{d:g}s": summarize(frozen, fps, good_psnr, frames_of(d), relative)
                                    for d in durations},
                        "mean_curves": frozen}}
  with_floor = {**mean_curves, "frozen frame 0 (reference)": frozen}
  plots = {"drift_psnr": plot_curves(os.path.join(out_dir, "drift_psnr.png"), with_floor,
                                     ("psnr", "psnr_visible"), fps, "PSNR (dB)",
                                     f"{world}: PSNR vs oracle (solid: all, dashed: visible in frame 0)",
                                     average=FRAMES_PER_LATENT),
           "drift_ssim": plot_curves(os.path.join(out_dir, "drift_ssim.png"), with_floor,
                                     ("ssim", "ssim_visible"), fps, "SSIM",
                                     f"{world}: SSIM vs oracle (solid: all, dashed: visible in frame 0)",
                                     average=FRAMES_PER_LATENT)}
  if world == "camera":
    plots["control_error"] = plot_curves(
        os.path.join(out_dir, "control_error.png"), mean_curves, ("control_error_px", "oracle_motion_px"),
        fps / FRAMES_PER_LATENT, "pixels per latent step",
        "camera control error (solid: |generated - oracle| motion, dashed: oracle motion)", offset=1)
  elif world == "puppet":
    plots["figure_error"] = plot_curves(
        os.path.join(out_dir, "figure_error.png"), mean_curves, ("figure_centroid_error_px",), fps,
        "pixels", "puppet figure centroid error", average=FRAMES_PER_LATENT)
  report["plots"] = {k: os.path.relpath(v, out_dir) for k, v in plots.items()}
  report = _jsonable(report)
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  text = summary_table(report)
  with open(os.path.join(out_dir, "summary.md"), "w") as f:
    f.write(text + "\n")
  if progress:
    print(text, flush=True)
  return report


def summary_table(report: Mapping[str, Any]) -> str:
  """A Markdown table of each model's summary per duration (means over the held-out worlds)."""
  cfg = report["config"]
  head = ("| model | duration | PSNR mean | PSNR first 10 s | PSNR last 10 s | PSNR visible | SSIM mean | "
          f"good horizon (s, PSNR >= {cfg['good_psnr']:g}) | horizon vs VAE (s, PSNR >= VAE - {RELATIVE_HORIZON_DB:g}) | "
          "control error px (oracle motion px) | fps |")
  lines = [f"{cfg['world']} world, {cfg['num_worlds']} held-out world(s), {cfg['width']}x{cfg['height']}, "
           f"{cfg['fps']:g} fps", "", head, "|" + "---|" * (head.count("|") - 1)]
  fmt = lambda x, f="{:.2f}": "n/a" if x is None else f.format(x)
  for name, m in report["models"].items():
    for dur, sm in m["summary"].items():
      ps, ss = sm.get("psnr", {}), sm.get("ssim", {})
      ce, om = sm.get("control_error_px"), sm.get("oracle_motion_px")
      horizon = ps.get("good_horizon_s")
      horizon = "n/a" if horizon is None else f"{horizon:.1f}" + ("+" if ps.get("good_horizon_reached_end") else "")
      control = "n/a" if not ce else f"{fmt(ce.get('mean'))} ({fmt(om.get('mean') if om else None)})"
      rel = ps.get("horizon_vs_vae_s")
      rel = "n/a" if rel is None else f"{rel:.1f}" + ("+" if ps.get("horizon_vs_vae_reached_end") else "")
      lines.append(f"| {name} | {dur} | {fmt(ps.get('mean'))} | {fmt(ps.get('first_10s'))} | {fmt(ps.get('last_10s'))} | "
                   f"{fmt(sm.get('psnr_visible', {}).get('mean'))} | {fmt(ss.get('mean'), '{:.3f}')} | {horizon} | "
                   f"{rel} | {control} | {fmt(m['throughput'].get('frames_per_s'), '{:.1f}')} |")
  refs = report.get("references")
  if refs:
    v = refs["vae_reconstruction"]
    lines += ["", f"References: the VAE's reconstruction of the oracle (first {v['seconds']:g} s, the ceiling of "
              f"any model behind this VAE): PSNR {v['psnr']:.2f}, SSIM {v['ssim']:.3f}. Frozen frame 0 (a model "
              "that ignores the controls): " + "; ".join(
                  f"{d}: PSNR {fmt(sm['psnr']['mean'])}, first 10 s {fmt(sm['psnr']['first_10s'])}, "
                  f"SSIM {fmt(sm['ssim']['mean'], '{:.3f}')}, horizon vs VAE {fmt(sm['psnr'].get('horizon_vs_vae_s'), '{:.1f}')} s"
                  for d, sm in refs["frozen_frame0"]["summary"].items()) + "."]
  return "\n".join(lines)
