"""The evaluation's drift metrics, on plain arrays (uint8 frames, bool masks, 3x3 homographies).

Fixed before any model is trained (they are the claims' pass criteria; never tune them on results):

  GOOD_PSNR = 20 dB          the good horizon's threshold on `psnr_known`: an RMS error of 10% of
                             the 8-bit range (25.5 grey levels). A number of the representation,
                             not of any model (the oracle through the PCA codec reads ~31 dB).
  HORIZON_WINDOW_S = 1 s     the trailing mean that the horizon thresholds (one second of video
                             smooths single bad frames, shorter than any drift the claims compare).
  KNOWN_MIN_FRACTION = 0.05  a frame whose known region (below) covers less than 5% of its pixels
                             has no `psnr_known` (NaN): a few pixels make no PSNR.
  BIN_S = 2 s                the time bins of the report and the plots.
  LATE_FRACTION = 0.2        the late bin: the last 20% of the generated frames.
  BURST_PX = 4 px            a frame pair is a burst when its commanded image motion exceeds 4
                             pixels per video frame (1/16 of a 64-pixel frame per frame, 96 px/s):
                             above any slow pan.
  MOTION_MIN_PX = 0.5 px     pairs with less commanded motion are left out of `motion_ratio` (the
                             ratio of a still camera is undefined).

Per video frame t >= 1 (frame 0 is the given image, left out of every summary):

  psnr_known     PSNR (dB, capped at `PSNR_CAP`) over the pixels whose ray lies inside frame 0's
                 image (`oracle.known_mask`: the panorama's exact projection test, `known_mask` =
                 `visible_mask` with window_frames = 0): the content a model that is given only
                 frame 0 can know. NaN when that region is under `KNOWN_MIN_FRACTION` of the frame.
                 The primary metric: the good horizon, the late bin and the claims use it.
                 Why: every pixel revealed after frame 0 is the model's own invention of random
                 world content, so comparing it with the oracle compares a hallucination with the
                 truth. `psnr_recent` (below) counted such pixels: even a perfect model's fell once
                 frame 0's content had scrolled out of view (~1.8 s at the training motion of ~6 px
                 per latent step on 64 px frames), and the measured good horizons on it (1.3 - 1.8 s
                 for every model) were that scroll time. The evaluation's trajectories are tethered
                 (`panorama.TETHERED_TRAJECTORIES`) so that frame 0's content keeps coming back.
  known_fraction the known region's share of the frame's pixels.
  psnr           (reported) PSNR over the whole frame, generated content included; `ssim` (when
                 asked for) the whole frame's mean SSIM (`metrics.ssim`); the puppet world adds its
                 figure metrics (`metrics.figure_metrics`).
  psnr_recent    (secondary, reported only) PSNR over the pixels whose world content was in view in
                 frame 0 or in one of the last `window_frames` = 4 N video frames (N: the model's
                 window in latent frames; the mask uses the 4 N frames just before t; the world's
                 `visible_mask`). `recent_fraction`: its share of the frame.
  warp_error, motion_scale (alpha), MOTION_* settings: `camera_motion`'s docstring (appended below).
  motion         alpha x commanded (dy, dx): the estimated content motion from t-1 to t.
  commanded      the commanded translation (dy, dx) of the content at the frame centre from t-1 to
                 t: the world's `image_shift` (panorama, exact), else `commanded_shift` (the centre
                 under the homography; the two agree to 0.05 px).
  motion_ratio   over a set of pairs with |commanded| >= `MOTION_MIN_PX` and an estimate:
                 `sum(motion . commanded) / sum(|commanded|^2)` = the |commanded|^2-weighted mean of
                 alpha. 1: follows; 0: frozen. `motion_ratio_burst`: the same over bursts
                 (|commanded| > `BURST_PX`).
  blur           high-frequency energy: the variance of the 4-neighbour Laplacian of the grey frame
                 (interior pixels), generated over oracle, as a ratio of sums over a bin (< 1:
                 blurrier than the oracle).
  colour_drift   Euclidean distance (grey levels) of the frame's mean RGB from the oracle frame's.
  good horizon   `horizon.horizon` (the one horizon rule: full `HORIZON_WINDOW_S` windows of
                 generated frames, first and last crossing, censored at the rollout's end) of a set's
                 mean `psnr_known` curve over its worlds (per frame, the mean over the worlds where it
                 is defined; inside a window frames without a value are skipped, a window with none
                 counts as below) at the fixed `GOOD_PSNR`; per-world horizons too. The verdicts use
                 the threshold set from the references (`horizon.set_statistics`); this one is a fixed
                 yardstick across runs. `horizon_recent_s`: the same on `psnr_recent` (secondary).

References, scored like the models (`reference_frames`, `REFERENCES`): the oracle, warp-last, the
true frame one latent step back, the flat colour of frame 0, frozen frame 0 and warp-frame-0.
"""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np

from apt2_jax.evaluation.camera_motion import (  # noqa: F401  (re-exported: drift.X keeps working)
    FRAMES_PER_LATENT, MOTION_BLUR_SIGMA, MOTION_DOWNSAMPLE, MOTION_MIN_CORRELATION, MOTION_MIN_OVERLAP,
    MOTION_MIN_PX, MOTION_SCALES, MOTION_STRIDE, commanded_homographies, commanded_shift, homography_power,
    intrinsics, motion_features, motion_scales, relative_homography, rotation_in_view, shift_homography, warp,
    warp_batch, warp_error, warp_errors, windowed_recent)
from apt2_jax.evaluation import horizon as horizon_lib
from apt2_jax.evaluation import metrics as metrics_lib
from apt2_jax.evaluation.metrics import PSNR_CAP

GOOD_PSNR = 20.0
GOOD_PSNR_RECENT = GOOD_PSNR   # the former name (the threshold now applies to psnr_known)
HORIZON_WINDOW_S = horizon_lib.WINDOW_S
KNOWN_MIN_FRACTION = 0.05
BIN_S = 2.0
LATE_FRACTION = 0.2
BURST_PX = 4.0

FRAME_KEYS = ("psnr", "psnr_known", "known_fraction", "psnr_recent", "recent_fraction", "warp_error", "lapvar",
              "lapvar_oracle", "colour_drift", "motion_scale")


# ------------------------------------------------------------------------------------------------
# Per-frame metrics
# ------------------------------------------------------------------------------------------------


def laplacian_variance(frames) -> np.ndarray:
  """`[...]`: variance of the 4-neighbour Laplacian of each grey frame `[..., H, W, 3]` (interior)."""
  g = np.einsum("...c,c->...", np.asarray(frames), np.array([0.299, 0.587, 0.114], np.float32), dtype=np.float32)
  lap = (g[..., :-2, 1:-1] + g[..., 2:, 1:-1] + g[..., 1:-1, :-2] + g[..., 1:-1, 2:] - 4 * g[..., 1:-1, 1:-1])
  return lap.reshape(*lap.shape[:-2], -1).var(-1, dtype=np.float64)


def colour_drift(frames, oracle) -> np.ndarray:
  """`[...]`: distance (grey levels) of each frame's mean RGB from the oracle frame's."""
  mean = lambda x: np.asarray(x, np.float64).mean(axis=(-3, -2))
  return np.linalg.norm(mean(frames) - mean(oracle), axis=-1)


def _squared_errors(frames, oracle) -> np.ndarray:
  """Sum over RGB of the squared differences of uint8 frames: int64 `[..., H, W]` (exact)."""
  d = np.asarray(frames).astype(np.int32) - np.asarray(oracle).astype(np.int32)
  return np.einsum("...c,...c->...", d, d).astype(np.int64)


def _masked_psnr(err, mask, cap: float = PSNR_CAP) -> np.ndarray:
  """`metrics.psnr` from `_squared_errors` `[n, H, W]` over bool `mask` `[n, H, W]` (NaN where empty)."""
  mask = np.asarray(mask, bool)
  count = mask.sum(axis=(-2, -1))
  total = np.where(mask, err, 0).sum(axis=(-2, -1)).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    out = 10.0 * np.log10(255.0 ** 2 * 3.0 * count / total)
  return np.where(count > 0, np.minimum(out, cap), np.nan)


def frame_metrics(frames, oracle, recent, homographies, previous=None, known=None,
                  previous_homographies=None, *, background=None, ssim: bool = False) -> dict[str, np.ndarray]:
  """Per-frame metrics of consecutive frames `[n, H, W, 3]` (uint8) against the oracle's.

  Args:
    recent: bool `[n, H, W]`, the `psnr_recent` region of each frame.
    homographies: `[n, 3, 3]`, frame t's pixels -> frame t-1's (`commanded_homographies`).
    previous: None at the start of the video (`frames[0]` is frame 0: its pair metrics are NaN), or
      the frames just before `frames[0]`: uint8 `[k, H, W, 3]` (the last one is the frame just
      before; a single `[H, W, 3]` frame is k = 1). The motion estimate of frame t reaches back to
      frame t - min(4, t) (`MOTION_STRIDE`), so a chunked video passes its last 4 frames.
    known: bool `[n, H, W]`, the `psnr_known` region (frame 0's content); None: psnr_known and
      known_fraction are NaN.
    previous_homographies: `[k, 3, 3]`, the homographies of `previous` (needed to use more than
      its last frame; without them only the last previous frame is used).
    background: the puppet world's background (uint8 `[H, W, 3]`): adds `metrics.figure_metrics`
      (figure_psnr, figure_iou, figure_centroid_error_px).
    ssim: adds "ssim", the whole frame's mean SSIM (`metrics.ssim`).
  Returns:
    `FRAME_KEYS` `[n]` and "motion" `[n, 2]` (alpha x the commanded centre shift; NaN rows without
    an estimate), and the optional keys asked for.
  """
  frames, oracle = np.asarray(frames), np.asarray(oracle)
  homographies = np.asarray(homographies, np.float64)
  recent = np.asarray(recent, bool)
  n = len(frames)
  if previous is None:
    context, context_h = frames[:0], homographies[:0]
  else:
    context = np.asarray(previous)
    context = context[None] if context.ndim == 3 else context
    if previous_homographies is None:
      context, context_h = context[-1:], np.tile(np.eye(3), (1, 1, 1))
    else:
      context_h = np.asarray(previous_homographies, np.float64)[-len(context):]
      context = context[-len(context_h):]
  k = len(context)
  video = np.concatenate([context, frames]) if k else frames
  video_h = np.concatenate([context_h, homographies]) if k else homographies
  warp_err = np.full(n, np.nan)
  pairs = np.arange(max(k, 1), k + n)                 # frames with a previous frame
  if len(pairs):
    warp_err[pairs - k] = warp_errors(video[pairs - 1], video[pairs], video_h[pairs])
  scale = motion_scales(video, video_h, first=max(k, 1))[k:]
  motion = scale[:, None] * commanded_shift(homographies, *frames.shape[1:3])
  err = _squared_errors(frames, oracle)
  if known is None:
    known_psnr, known_fraction = np.full(n, np.nan), np.full(n, np.nan)
  else:
    known = np.asarray(known, bool)
    known_fraction = known.mean(axis=(-2, -1))
    known_psnr = np.where(known_fraction >= KNOWN_MIN_FRACTION, _masked_psnr(err, known), np.nan)  # too few: NaN
  out = {"psnr": _masked_psnr(err, np.ones(err.shape, bool)), "psnr_known": known_psnr,
         "known_fraction": known_fraction, "psnr_recent": _masked_psnr(err, recent),
         "recent_fraction": recent.mean(axis=(-2, -1)), "warp_error": warp_err, "motion_scale": scale,
         "motion": motion, "lapvar": laplacian_variance(frames), "lapvar_oracle": laplacian_variance(oracle),
         "colour_drift": colour_drift(frames, oracle)}
  if ssim:
    out["ssim"] = metrics_lib.ssim(frames, oracle)
  if background is not None:
    out.update(metrics_lib.figure_metrics(frames, oracle, background))
  return out


class DriftCurves:
  """Collects a video that arrives in chunks (with its oracle, regions and homographies) and scores
  it with `frame_metrics` in one vectorised pass at `result` (the same as chunk by chunk with the
  last `MOTION_STRIDE` frames as `previous`, but without a pass per chunk; ~9 MB of frames for 30 s
  at 64x64)."""

  def __init__(self, background=None, ssim: bool = False):
    self.chunks, self.background, self.ssim = [], background, ssim

  def add(self, frames, oracle, recent, homographies, known=None):
    self.chunks.append((np.asarray(frames), np.asarray(oracle), np.asarray(recent, bool),
                        np.asarray(homographies, np.float64), None if known is None else np.asarray(known, bool)))

  def result(self) -> dict[str, np.ndarray]:
    frames, oracle, recent, homographies, known = zip(*self.chunks)
    known = None if any(k is None for k in known) else np.concatenate(known)
    return frame_metrics(np.concatenate(frames), np.concatenate(oracle), np.concatenate(recent),
                         np.concatenate(homographies), known=known, background=self.background, ssim=self.ssim)


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


MEAN_KEYS = ("psnr", "psnr_known", "known_fraction", "psnr_recent", "recent_fraction", "warp_error", "colour_drift")
# Means of the optional per-frame metrics, where the curves hold them (`frame_metrics`).
OPTIONAL_MEAN_KEYS = ("ssim", "figure_psnr", "figure_iou", "figure_centroid_error_px")


def grouped(curves: Sequence[Mapping[str, np.ndarray]], commanded: Sequence[np.ndarray], groups: np.ndarray,
            num_groups: int, min_px: float = MOTION_MIN_PX, burst_px: float = BURST_PX) -> dict[str, np.ndarray]:
  """Every metric per group of video frames, pooled over worlds: `[num_groups]` each.

  `curves[k]`: world k's `frame_metrics` (all its frames); `commanded[k]`: its `commanded_shift`;
  `groups`: the group of each video frame (-1: left out; frame 0 always is). Means over the frames
  with a value for psnr_known (NaN where no frame of the group has one), known_fraction,
  psnr_recent, recent_fraction, warp_error, colour_drift and commanded_px; `known_frames`: the share
  of the group's frames that have a psnr_known; ratios of sums for blur and the motion ratios
  (`motion_ratio`, `motion_ratio_burst`); `burst_pairs`: the bursts' count.
  """
  keep = groups >= 0
  keep[0] = False
  g = np.tile(groups[keep], len(curves))
  nan = np.full(len(groups), np.nan)
  cat = lambda key: np.concatenate([np.asarray(c.get(key, nan), np.float64)[keep] for c in curves])
  cmd = np.concatenate([np.asarray(c, np.float64)[keep] for c in commanded])
  motion = np.concatenate([np.asarray(c["motion"], np.float64)[keep] for c in curves])
  size = np.linalg.norm(cmd, axis=-1)
  dot = (motion * cmd).sum(-1)
  sq = np.square(size)
  valid = np.isfinite(dot)
  keys = MEAN_KEYS + tuple(k for k in OPTIONAL_MEAN_KEYS if all(k in c for c in curves))
  out = {k: _group_means(cat(k), g, num_groups) for k in keys}
  out["known_frames"] = _group_means(np.isfinite(cat("psnr_known")).astype(np.float64), g, num_groups)
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


def _mean_curve(curves, key) -> np.ndarray:
  """Per frame, the mean over the worlds where `key` has a value (NaN where none has)."""
  n = len(curves[0]["psnr_recent"])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # a frame without a value in any world
    return np.nanmean(np.stack([np.asarray(c.get(key, np.full(n, np.nan)), np.float64) for c in curves]), 0)


def summarize(curves: Sequence[Mapping[str, np.ndarray]], commanded: Sequence[np.ndarray], fps: float, *,
              bin_s: float = BIN_S, threshold: float = GOOD_PSNR, late_fraction: float = LATE_FRACTION,
              burst_px: float = BURST_PX, min_px: float = MOTION_MIN_PX) -> dict:
  """One model's (or reference's) summary over one set of worlds (their per-frame curves, each
  of the same length T, frame 0 included; `commanded[k]` `[T, 2]`).

  The horizon (`horizon.horizon` at `threshold`: first crossing `horizon_s`, last `horizon_last_s`)
  is that of the mean `psnr_known` curve over worlds (per frame the mean over the worlds where it
  has a value); per-world horizons are listed too, and the same on `psnr_recent` (secondary:
  `horizon_recent_s`). Overall figures
  pool all generated frames (and pairs) of all worlds; "late" pools the last `late_fraction` of the
  generated frames. `bins`: `bin_s`-second bins of the generated frames; `per_latent`: latent frame
  j >= 1 (video frames 4j-3 .. 4j).
  """
  n = len(curves[0]["psnr_recent"])
  if n < 2:
    raise ValueError("summarize needs at least one generated frame")
  rule = lambda curve: horizon_lib.horizon(curve, fps, threshold)
  known, recent = rule(_mean_curve(curves, "psnr_known")), rule(_mean_curve(curves, "psnr_recent"))
  world = [rule(c.get("psnr_known", np.full(n, np.nan))) for c in curves]
  generated = n - 1
  late_start = n - max(1, int(round(late_fraction * generated)))
  overall = np.zeros(n, int)
  late = np.where(np.arange(n) >= late_start, 0, -1)
  pick = lambda gr, k: {key: float(v[k]) for key, v in gr.items()}
  kw = dict(min_px=min_px, burst_px=burst_px)
  bins, num_bins = _time_groups(n, fps, bin_s)
  latent = np.maximum((np.arange(n) + FRAMES_PER_LATENT - 1) // FRAMES_PER_LATENT, 1) - 1
  num_latent = (n - 1 + FRAMES_PER_LATENT - 1) // FRAMES_PER_LATENT
  out = {"duration_s": n / fps, "generated_frames": generated, "horizon_s": known["first_s"],
         "horizon_last_s": known["last_s"], "horizon_reached_end": known["reached_end"],
         "horizon_metric": "psnr_known",
         "world_horizons_s": [x["first_s"] for x in world], "world_horizons_last_s": [x["last_s"] for x in world],
         "world_horizons_reached_end": [x["reached_end"] for x in world],
         "horizon_recent_s": recent["first_s"], "horizon_recent_reached_end": recent["reached_end"],
         "overall": pick(grouped(curves, commanded, overall, 1, **kw), 0),
         "late": pick(grouped(curves, commanded, late, 1, **kw), 0), "late_start_s": late_start / fps,
         "bins": {"start_s": list(np.arange(num_bins) * bin_s),
                  **{k: list(v) for k, v in grouped(curves, commanded, bins, num_bins, **kw).items()}},
         "per_latent": {k: list(v) for k, v in grouped(curves, commanded, latent, num_latent, **kw).items()}}
  return out


def fixed_criteria() -> dict:
  """The fixed thresholds, for the report."""
  return {"good_psnr_db": GOOD_PSNR, "horizon_metric": "psnr_known", "horizon_window_s": HORIZON_WINDOW_S,
          "known_min_fraction": KNOWN_MIN_FRACTION, "bin_s": BIN_S, "late_fraction": LATE_FRACTION,
          "burst_px_per_frame": BURST_PX, "motion_min_px": MOTION_MIN_PX, "motion_stride_frames": MOTION_STRIDE,
          "motion_blur_sigma_px": MOTION_BLUR_SIGMA, "motion_downsample": MOTION_DOWNSAMPLE,
          "motion_scales": [float(MOTION_SCALES[0]), float(MOTION_SCALES[-1]), float(MOTION_SCALES[1] - MOTION_SCALES[0])],
          "motion_min_overlap": MOTION_MIN_OVERLAP, "psnr_cap_db": PSNR_CAP}


def reference_frames(oracle: np.ndarray, kind: str, warp=None) -> np.ndarray:
  """The frames of a reference "model" on an oracle video `[T, H, W, 3]` (uint8 like it):

    oracle          itself (the PSNR cap; through the codec, the codec's ceiling)
    warp_last       latent frame j's video frames 4j-3 .. 4j: the true last frame of latent frame
                    j - 1 (video frame 4j - 4) moved by the commanded motion (`warp`): the one-step
                    ceiling of a model fed the true past (teacher-forced, not a rollout)
    one_step_back   frame t := oracle frame t - 4, the true frame one latent step back (frame 0
                    for t < 4): the teacher-forced copy of the last latent frame
    flat_colour     every frame the mean colour of frame 0
    frozen_first    frame 0 forever (a model that ignores the controls)
    warp_frame0     frame 0 moved by the true camera motion to frame t (`warp`): what a rollout
                    given only frame 0 can reach where the world holds nothing new
    copy_last       frame t := oracle frame t - 1 (teacher-forced; kept for the camera world)

  `warp(frame, source, target)`: frame `source` moved to frame `target` by the commanded motion
  (the world's exact `warp` where it has one, e.g. the torus)."""
  oracle = np.asarray(oracle)
  t = np.arange(len(oracle))
  if kind == "oracle":
    return oracle
  if kind == "copy_last":
    return np.concatenate([oracle[:1], oracle[:-1]])
  if kind == "one_step_back":
    return oracle[np.maximum(t - FRAMES_PER_LATENT, 0)]
  if kind == "frozen_first":
    return np.broadcast_to(oracle[:1], oracle.shape)
  if kind == "flat_colour":
    mean = np.asarray(oracle[0], np.float64).reshape(-1, oracle.shape[-1]).mean(0)
    return np.broadcast_to(np.clip(np.round(mean), 0, 255).astype(oracle.dtype), oracle.shape)
  if kind in ("warp_last", "warp_frame0"):
    if warp is None:
      raise ValueError(f"reference {kind!r} needs the world's warp")
    out = [oracle[0]]
    for i in t[1:]:
      source = 0 if kind == "warp_frame0" else FRAMES_PER_LATENT * ((i + FRAMES_PER_LATENT - 1) // FRAMES_PER_LATENT - 1)
      out.append(np.asarray(warp(oracle[source], int(source), int(i))).astype(oracle.dtype))
    return np.stack(out)
  raise ValueError(f"unknown reference {kind!r}")


REFERENCES = ("oracle", "warp_last", "one_step_back", "flat_colour", "frozen_first", "warp_frame0")
# References that need the world's exact warp (`reference_frames`).
WARP_REFERENCES = ("warp_last", "warp_frame0")
