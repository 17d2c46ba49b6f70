"""The testbed's drift metrics, on plain arrays (uint8 frames, bool masks, 3x3 homographies).

Fixed before any model is trained (they are the claims' pass criteria; never tune them on results):

  GOOD_PSNR_RECENT = 20 dB   the good horizon's threshold on `psnr_recent`: an RMS error of 10% of
                             the 8-bit range (25.5 grey levels). A number of the representation,
                             not of any model: the space-to-depth codec is lossless (its ceiling is
                             exact), so the threshold is reachable and no reference moves it.
  HORIZON_WINDOW_S = 1 s     the trailing mean that the horizon thresholds (one second of video
                             smooths single bad frames, shorter than any drift the claims compare).
  BIN_S = 2 s                the time bins of the report and the plots.
  LATE_FRACTION = 0.2        the late bin: the last 20% of the generated frames.
  BURST_PX = 4 px            a frame pair is a burst when its commanded image motion exceeds 4
                             pixels per video frame (1/16 of a 64-pixel frame per frame, 96 px/s):
                             above any slow pan, below phase correlation's 32-pixel aliasing limit.
  MOTION_MIN_PX = 0.5 px     pairs with less commanded motion are left out of `motion_ratio` (the
                             ratio of a still camera is undefined).

Per video frame t >= 1 (frame 0 is the given image, left out of every summary):

  psnr_recent    PSNR (dB, capped at `PSNR_CAP`) over the pixels whose world content was in view
                 in frame 0 or in one of the last `window_frames` = 4 N video frames (N: the model's
                 window in latent frames): what a windowed model can know. (Latent frame j sees
                 frame 0 and latent frames j-N .. j-1: 4 N video frames ending 1 to 4 frames before
                 t; the mask uses the 4 N frames just before t.) The mask comes from the world
                 (`testbed.recent_mask`: the panorama's exact `visible_mask`).
  warp_error     RMS difference (grey levels, RGB) between frame t and frame t-1 warped by the
                 commanded camera motion, over the pixels of t whose source lies inside t-1. A
                 pinhole camera that only rotates (and zooms) maps frame t's pixels to frame t-1's
                 exactly by the homography `K_{t-1} R K_t^-1` (`relative_homography`); forward
                 motion (depth-dependent; zero in the panorama world) is ignored. It measures
                 control following without the oracle; the oracle's own value (bilinear resampling
                 of the rendered texture) is its floor.
  motion         phase correlation (`metrics.phase_correlation`) on the generated pair (t-1, t): the
                 content's translation (dy, dx) in pixels.
  commanded      the commanded translation (dy, dx) of the content at the frame centre from t-1 to
                 t: the world's `image_shift` (panorama, exact), else `commanded_shift` (the centre
                 under the homography; the two agree to 0.05 px).
  motion_ratio   over a set of pairs with |commanded| >= `MOTION_MIN_PX`:
                 `sum(motion . commanded) / sum(|commanded|^2)`, the estimated motion projected on
                 the commanded one, relative to its magnitude (the |commanded|^2-weighted mean of the
                 per-pair ratios, robust to small pairs). 1: follows; 0: frozen. `motion_ratio_burst`:
                 the same over bursts (|commanded| > `BURST_PX`).
  blur           high-frequency energy: the variance of the 4-neighbour Laplacian of the grey frame
                 (interior pixels), generated over oracle, as a ratio of sums over a bin (< 1:
                 blurrier than the oracle).
  colour_drift   Euclidean distance (grey levels) of the frame's mean RGB from the oracle frame's.
  good horizon   the first time the trailing `HORIZON_WINDOW_S` mean of `psnr_recent` (over the
                 generated frames so far; of a set's mean curve over its worlds) falls below
                 `GOOD_PSNR_RECENT`: `t / fps` seconds for the first such video frame t; the whole
                 duration when it never does (`reached_end`: the horizon is then a lower bound).

References, scored like the models (`reference_frames`): the oracle (the PSNR cap), copy-last-frame
(frame t := oracle frame t-1, the trivial one-step predictor) and the frozen first frame.
"""
from __future__ import annotations

import math
import warnings
from typing import Mapping, Sequence

import numpy as np

from apt2_jax.evaluation.metrics import PSNR_CAP, phase_correlation, psnr

GOOD_PSNR_RECENT = 20.0
HORIZON_WINDOW_S = 1.0
BIN_S = 2.0
LATE_FRACTION = 0.2
BURST_PX = 4.0
MOTION_MIN_PX = 0.5
FRAMES_PER_LATENT = 4

FRAME_KEYS = ("psnr_recent", "recent_fraction", "warp_error", "lapvar", "lapvar_oracle", "colour_drift")


# ------------------------------------------------------------------------------------------------
# Camera geometry: the commanded motion of a pinhole camera that rotates and zooms
# ------------------------------------------------------------------------------------------------


def intrinsics(height: int, width: int, fov_deg: float, log_focal: float = 0.0) -> np.ndarray:
  """K [3, 3] in pixel-index coordinates (x = column, y = row; pixel centres at integers), the
  camera world's pinhole: focal `0.5 W / tan(fov / 2) * exp(log_focal)`, centre `(W/2 - 0.5, H/2 - 0.5)`."""
  f = 0.5 * width / math.tan(math.radians(fov_deg) / 2) * math.exp(log_focal)
  return np.array([[f, 0.0, width / 2 - 0.5], [0.0, f, height / 2 - 0.5], [0.0, 0.0, 1.0]])


def relative_homography(rotation, height: int, width: int, fov_deg: float, log_focal_prev: float = 0.0,
                        log_focal: float = 0.0) -> np.ndarray:
  """H [3, 3]: pixel (x, y, 1) of frame t -> its source in frame t-1, `K_{t-1} R K_t^-1`.

  `rotation`: frame t's camera in frame t-1's camera coordinates (the relative rotation of the
  camera world's controls, `worlds.relative_rotation(pan, tilt, roll)`).
  """
  k_prev = intrinsics(height, width, fov_deg, log_focal_prev)
  k_cur = intrinsics(height, width, fov_deg, log_focal)
  return k_prev @ np.asarray(rotation, np.float64) @ np.linalg.inv(k_cur)


def commanded_homographies(controls, height: int, width: int, fov_deg: float) -> np.ndarray:
  """Camera controls `[T, 5]` (pan, tilt, zoom, forward, roll per video frame, relative to the
  previous frame) -> H `[T, 3, 3]` (row 0: identity). Forward motion is ignored."""
  from apt2_jax.data.worlds import relative_rotation
  controls = np.asarray(controls, np.float64)
  out = np.tile(np.eye(3), (len(controls), 1, 1))
  log_focal = 0.0
  for t in range(1, len(controls)):
    pan, tilt, zoom, _, roll = controls[t]
    out[t] = relative_homography(relative_rotation(pan, tilt, roll), height, width, fov_deg, log_focal,
                                 log_focal + zoom)
    log_focal += zoom
  return out


def _apply(h: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  p = h @ np.stack([x.ravel(), y.ravel(), np.ones(x.size)])
  with np.errstate(divide="ignore", invalid="ignore"):
    return (p[0] / p[2]).reshape(x.shape), (p[1] / p[2]).reshape(x.shape)


def commanded_shift(homographies, height: int, width: int) -> np.ndarray:
  """`[T, 2]` (dy, dx): the commanded image motion of the frame centre from frame t-1 to t
  (`centre - H centre`; content moves by it), row 0 zeros. Same sign as `phase_correlation`."""
  cy, cx = np.array([height / 2 - 0.5]), np.array([width / 2 - 0.5])
  out = np.zeros((len(homographies), 2))
  for t, h in enumerate(np.asarray(homographies, np.float64)):
    sx, sy = _apply(h, cx, cy)
    out[t] = (cy[0] - sy[0], cx[0] - sx[0])
  return out


def shift_homography(dy: float, dx: float) -> np.ndarray:
  """H of a pure image translation by (dy, dx): pixel p of frame t comes from p - (dx, dy)."""
  return np.array([[1.0, 0.0, -dx], [0.0, 1.0, -dy], [0.0, 0.0, 1.0]])


# ------------------------------------------------------------------------------------------------
# Per-frame metrics
# ------------------------------------------------------------------------------------------------


def warp(previous, h) -> tuple[np.ndarray, np.ndarray]:
  """Frame t-1 uint8 `[H, W, 3]` warped to frame t by H (bilinear): (float64 [H, W, 3], valid
  [H, W]: the source lies inside frame t-1)."""
  from scipy import ndimage
  previous = np.asarray(previous, np.float64)
  height, width = previous.shape[:2]
  y, x = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
  sx, sy = _apply(np.asarray(h, np.float64), x, y)
  eps = 1e-6
  valid = (np.isfinite(sx) & np.isfinite(sy) & (sx >= -eps) & (sx <= width - 1 + eps)
           & (sy >= -eps) & (sy <= height - 1 + eps))
  sx, sy = np.clip(np.nan_to_num(sx), 0, width - 1), np.clip(np.nan_to_num(sy), 0, height - 1)
  out = np.stack([ndimage.map_coordinates(previous[..., c], [sy, sx], order=1, mode="nearest")
                  for c in range(previous.shape[-1])], -1)
  return out, valid


def warp_error(previous, current, h) -> float:
  """RMS difference (grey levels) of `current` and `previous` warped by H, over the valid pixels
  (NaN when none)."""
  warped, valid = warp(previous, h)
  if not valid.any():
    return float("nan")
  diff = warped - np.asarray(current, np.float64)
  return float(np.sqrt(np.mean(np.square(diff[valid]))))


def laplacian_variance(frames) -> np.ndarray:
  """`[...]`: variance of the 4-neighbour Laplacian of each grey frame `[..., H, W, 3]` (interior)."""
  f = np.asarray(frames, np.float64)
  g = f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114
  lap = (g[..., :-2, 1:-1] + g[..., 2:, 1:-1] + g[..., 1:-1, :-2] + g[..., 1:-1, 2:] - 4 * g[..., 1:-1, 1:-1])
  return lap.reshape(*lap.shape[:-2], -1).var(-1)


def colour_drift(frames, oracle) -> np.ndarray:
  """`[...]`: distance (grey levels) of each frame's mean RGB from the oracle frame's."""
  mean = lambda x: np.asarray(x, np.float64).mean(axis=(-3, -2))
  return np.linalg.norm(mean(frames) - mean(oracle), axis=-1)


def frame_metrics(frames, oracle, recent, homographies, previous=None) -> dict[str, np.ndarray]:
  """Per-frame metrics of consecutive frames `[n, H, W, 3]` (uint8) against the oracle's.

  Args:
    recent: bool `[n, H, W]`, the `psnr_recent` region of each frame.
    homographies: `[n, 3, 3]`, frame t's pixels -> frame t-1's (`commanded_homographies`).
    previous: the frame before `frames[0]` (uint8 [H, W, 3]), or None at the start of the video
      (then the first frame's pair metrics are NaN).
  Returns:
    `FRAME_KEYS` `[n]` and "motion" `[n, 2]` (NaN rows without a previous frame).
  """
  frames, oracle = np.asarray(frames), np.asarray(oracle)
  recent = np.asarray(recent, bool)
  n = len(frames)
  warp_err, motion = np.full(n, np.nan), np.full((n, 2), np.nan)
  prev = previous
  for i in range(n):
    if prev is not None:
      warp_err[i] = warp_error(prev, frames[i], homographies[i])
      motion[i] = phase_correlation(prev, frames[i])
    prev = frames[i]
  return {"psnr_recent": psnr(frames, oracle, recent, cap=PSNR_CAP),
          "recent_fraction": recent.mean(axis=(-2, -1)), "warp_error": warp_err, "motion": motion,
          "lapvar": laplacian_variance(frames), "lapvar_oracle": laplacian_variance(oracle),
          "colour_drift": colour_drift(frames, oracle)}


class DriftCurves:
  """Accumulates `frame_metrics` of a video that arrives in chunks (the previous frame carried)."""

  def __init__(self):
    self.parts, self.previous = [], None

  def add(self, frames, oracle, recent, homographies):
    self.parts.append(frame_metrics(frames, oracle, recent, homographies, self.previous))
    self.previous = np.array(frames[-1])

  def result(self) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}


# ------------------------------------------------------------------------------------------------
# Aggregates
# ------------------------------------------------------------------------------------------------


def motion_ratio(motion, commanded, min_px: float = MOTION_MIN_PX) -> float:
  """`sum(motion . commanded) / sum(|commanded|^2)` over the pairs (`[N, 2]` each) whose commanded
  motion is at least `min_px` and whose estimate is finite; NaN when there is none."""
  motion, commanded = np.asarray(motion, np.float64), np.asarray(commanded, np.float64)
  ok = np.isfinite(motion).all(-1) & (np.linalg.norm(commanded, axis=-1) >= min_px)
  if not ok.any():
    return float("nan")
  return float((motion[ok] * commanded[ok]).sum() / np.square(commanded[ok]).sum())


def trailing_mean(curve, window: int) -> np.ndarray:
  """Mean of the last `window` finite values up to each index (fewer at the start; NaN if none)."""
  curve = np.asarray(curve, np.float64)
  ok = np.isfinite(curve)
  csum = np.concatenate([[0.0], np.cumsum(np.where(ok, curve, 0.0))])
  ccnt = np.concatenate([[0], np.cumsum(ok)])
  idx = np.arange(len(curve))
  lo = np.maximum(idx + 1 - window, 0)
  count = ccnt[idx + 1] - ccnt[lo]
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, (csum[idx + 1] - csum[lo]) / np.maximum(count, 1), np.nan)


def horizon(curve, fps: float, threshold: float = GOOD_PSNR_RECENT,
            window_s: float = HORIZON_WINDOW_S) -> tuple[float, bool]:
  """(seconds, reached_end) of a per-video-frame curve (index = frame; frame 0 is ignored): the
  first frame t >= 1 whose trailing `window_s` mean of frames 1..t is below `threshold` gives
  `t / fps`; `(len(curve) / fps, True)` when none is."""
  curve = np.asarray(curve, np.float64)
  mean = trailing_mean(curve[1:], max(1, int(round(window_s * fps))))
  below = np.nonzero(mean < threshold)[0]
  if len(below) == 0:
    return len(curve) / fps, True
  return float(below[0] + 1) / fps, False


def _group_means(values, groups, num_groups) -> np.ndarray:
  values = np.asarray(values, np.float64)
  ok = np.isfinite(values)
  s = np.bincount(groups[ok], values[ok], num_groups)
  c = np.bincount(groups[ok], minlength=num_groups)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(c > 0, s / np.maximum(c, 1), np.nan)


def _group_ratio(num, den, groups, num_groups) -> np.ndarray:
  ok = np.isfinite(num) & np.isfinite(den)
  n = np.bincount(groups[ok], num[ok], num_groups)
  d = np.bincount(groups[ok], den[ok], num_groups)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(d > 0, n / np.where(d > 0, d, 1.0), np.nan)


def grouped(curves: Sequence[Mapping[str, np.ndarray]], commanded: Sequence[np.ndarray], groups: np.ndarray,
            num_groups: int, min_px: float = MOTION_MIN_PX, burst_px: float = BURST_PX) -> dict[str, np.ndarray]:
  """Every metric per group of video frames, pooled over worlds: `[num_groups]` each.

  `curves[k]`: world k's `frame_metrics` (all its frames); `commanded[k]`: its `commanded_shift`;
  `groups`: the group of each video frame (-1: left out; frame 0 always is). Means for psnr_recent,
  warp_error, colour_drift, recent_fraction and commanded_px; ratios of sums for blur and the
  motion ratios (`motion_ratio`, `motion_ratio_burst`); `burst_pairs`: the bursts' count.
  """
  keep = groups >= 0
  keep[0] = False
  g = np.tile(groups[keep], len(curves))
  cat = lambda key: np.concatenate([np.asarray(c[key], np.float64)[keep] for c in curves])
  cmd = np.concatenate([np.asarray(c, np.float64)[keep] for c in commanded])
  motion = cat("motion")
  size = np.linalg.norm(cmd, axis=-1)
  dot = (motion * cmd).sum(-1)
  sq = np.square(size)
  valid = np.isfinite(dot)
  out = {k: _group_means(cat(k), g, num_groups)
         for k in ("psnr_recent", "warp_error", "colour_drift", "recent_fraction")}
  out["commanded_px"] = _group_means(size, g, num_groups)
  out["blur"] = _group_ratio(cat("lapvar"), cat("lapvar_oracle"), g, num_groups)
  for name, sel in (("motion_ratio", size >= min_px), ("motion_ratio_burst", size > burst_px)):
    m = sel & valid
    out[name] = _group_ratio(np.where(m, dot, np.nan), np.where(m, sq, np.nan), g, num_groups)
  out["burst_pairs"] = np.bincount(g[(size > burst_px) & valid], minlength=num_groups).astype(np.float64)
  return out


def _time_groups(num_frames: int, fps: float, bin_s: float) -> tuple[np.ndarray, int]:
  """Bin of each video frame: generated frame t >= 1 is in bin `(t - 1) / fps // bin_s` (frame 0: -1)."""
  groups = ((np.arange(num_frames) - 1) / fps // bin_s).astype(int)
  groups[0] = -1
  return groups, int(groups.max()) + 1


def summarize(curves: Sequence[Mapping[str, np.ndarray]], commanded: Sequence[np.ndarray], fps: float, *,
              bin_s: float = BIN_S, threshold: float = GOOD_PSNR_RECENT, late_fraction: float = LATE_FRACTION,
              burst_px: float = BURST_PX, min_px: float = MOTION_MIN_PX) -> dict:
  """One model's (or reference's) summary over one set of worlds (their per-frame curves, each
  of the same length T, frame 0 included; `commanded[k]` `[T, 2]`).

  The horizon is that of the mean `psnr_recent` curve over worlds (`horizon`); per-world horizons
  are listed too. Overall figures pool all generated frames (and pairs) of all worlds; "late" pools
  the last `late_fraction` of the generated frames. `bins`: `bin_s`-second bins of the generated
  frames; `per_latent`: latent frame j >= 1 (video frames 4j-3 .. 4j).
  """
  n = len(curves[0]["psnr_recent"])
  if n < 2:
    raise ValueError("summarize needs at least one generated frame")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # a frame with no recent pixel in any world
    mean_psnr = np.nanmean(np.stack([np.asarray(c["psnr_recent"], np.float64) for c in curves]), 0)
  h, reached = horizon(mean_psnr, fps, threshold)
  generated = n - 1
  late_start = n - max(1, int(round(late_fraction * generated)))
  overall = np.zeros(n, int)
  late = np.where(np.arange(n) >= late_start, 0, -1)
  pick = lambda gr, k: {key: float(v[k]) for key, v in gr.items()}
  kw = dict(min_px=min_px, burst_px=burst_px)
  bins, num_bins = _time_groups(n, fps, bin_s)
  latent = np.maximum((np.arange(n) + FRAMES_PER_LATENT - 1) // FRAMES_PER_LATENT, 1) - 1
  num_latent = (n - 1 + FRAMES_PER_LATENT - 1) // FRAMES_PER_LATENT
  out = {"duration_s": n / fps, "generated_frames": generated, "horizon_s": h, "horizon_reached_end": reached,
         "world_horizons_s": [horizon(c["psnr_recent"], fps, threshold)[0] for c in curves],
         "overall": pick(grouped(curves, commanded, overall, 1, **kw), 0),
         "late": pick(grouped(curves, commanded, late, 1, **kw), 0), "late_start_s": late_start / fps,
         "bins": {"start_s": list(np.arange(num_bins) * bin_s),
                  **{k: list(v) for k, v in grouped(curves, commanded, bins, num_bins, **kw).items()}},
         "per_latent": {k: list(v) for k, v in grouped(curves, commanded, latent, num_latent, **kw).items()}}
  return out


def fixed_criteria() -> dict:
  """The fixed thresholds, for the report."""
  return {"good_psnr_recent_db": GOOD_PSNR_RECENT, "horizon_window_s": HORIZON_WINDOW_S, "bin_s": BIN_S,
          "late_fraction": LATE_FRACTION, "burst_px_per_frame": BURST_PX, "motion_min_px": MOTION_MIN_PX,
          "psnr_cap_db": PSNR_CAP}


def reference_frames(oracle: np.ndarray, kind: str) -> np.ndarray:
  """The frames of a reference "model" on an oracle video `[T, H, W, 3]`: "oracle" (itself, the
  PSNR cap), "copy_last" (frame t is oracle frame t-1: the trivial one-step predictor; frame 0 is
  frame 0) or "frozen_first" (frame 0 forever)."""
  oracle = np.asarray(oracle)
  if kind == "oracle":
    return oracle
  if kind == "copy_last":
    return np.concatenate([oracle[:1], oracle[:-1]])
  if kind == "frozen_first":
    return np.broadcast_to(oracle[:1], oracle.shape)
  raise ValueError(f"unknown reference {kind!r}")


REFERENCES = ("oracle", "copy_last", "frozen_first")


def windowed_recent(in_view, height: int, width: int, window_frames: int, start: int, stop: int) -> np.ndarray:
  """The `psnr_recent` region of frames `[start, stop)` from a visibility test: bool `[stop - start, H, W]`.

  `in_view(t, s, pixels)` -> bool `[P]`: whether the content at frame t's `pixels` (int `[P, 2]`
  rows, cols) is inside frame s's image. A pixel of frame t is recent when it is in view in frame 0
  or in one of frames `max(1, t - window_frames) .. t - 1`; frame 0 is all True. Frames are checked
  newest first, only on the pixels not yet covered.
  """
  out = []
  for t in range(start, stop):
    if t == 0:
      out.append(np.ones((height, width), bool))
      continue
    covered = np.zeros((height, width), bool)
    for s in [0] + list(range(t - 1, max(1, t - window_frames) - 1, -1)):
      left = np.argwhere(~covered)
      if not len(left):
        break
      covered[left[:, 0], left[:, 1]] = in_view(t, s, left)
    out.append(covered)
  return np.stack(out)


def rotation_in_view(rotations, log_focals, height: int, width: int, fov_deg: float):
  """`in_view` (for `windowed_recent`) of a pinhole camera that rotates and zooms about a fixed
  centre (exact for the panorama world; ignores translation). `rotations` `[T, 3, 3]` camera to
  world, `log_focals` `[T]`."""
  rotations = np.asarray(rotations, np.float64)
  log_focals = np.zeros(len(rotations)) if log_focals is None else np.asarray(log_focals, np.float64)

  def in_view(t, s, pixels):
    k_t, k_s = intrinsics(height, width, fov_deg, log_focals[t]), intrinsics(height, width, fov_deg, log_focals[s])
    p = np.stack([pixels[:, 1], pixels[:, 0], np.ones(len(pixels))]).astype(np.float64)
    q = k_s @ rotations[s].T @ rotations[t] @ np.linalg.inv(k_t) @ p
    with np.errstate(divide="ignore", invalid="ignore"):
      x, y = q[0] / q[2], q[1] / q[2]
    return (q[2] > 1e-9) & (x >= -0.5) & (x <= width - 0.5) & (y >= -0.5) & (y <= height - 0.5)
  return in_view
