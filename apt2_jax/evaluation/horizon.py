"""The horizon rule and the statistics over worlds, fixed before any run is scored.

Horizon of one world's per-video-frame PSNR curve (frame 0, the given image, is not scored):
  window      a trailing mean over `WINDOW_S` (1 s) of generated frames, always a full window: the
              first window is frames 1 .. W, so a model cannot pass on the strength of one frame.
  first       the start time of the first full window whose mean is below the threshold (frame k
              at k / fps): how long the frames stay good.
  last        the start of the first window after which every window stays below: when the model
              is lost for good (a model that recovers has last > first).
  censored    a curve that never goes below has both at the rollout's length, flagged
              `reached_end` (a lower bound).

Threshold (`threshold_from_references`): it must separate a model that draws the world from
one that does not, so it is set from the references, scored like the models:
  - above what the flat colour of frame 0 and frozen frame 0 score once the camera has moved:
    their PSNR over the generated frames after the first latent step (`FLOOR_QUANTILE` of the
    pooled frames of every world);
  - below what warp-frame-0 (frame 0 moved by the true camera motion, through the models' codec)
    scores throughout (`CEILING_QUANTILE` of its pooled frames).
  The threshold is the midpoint of the two in dB; `check_threshold` verifies the two conditions
  on each world's references with the horizon rule itself.

Statistics over worlds: medians with percentile-bootstrap 95% confidence intervals
(`BOOTSTRAP_SAMPLES` resamples of the worlds, fixed seed), and paired differences (the same worlds
and noise seeds for both models).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

WINDOW_S = 1.0
FRAMES_PER_LATENT = 4
FLOOR_QUANTILE = 0.95
CEILING_QUANTILE = 0.05
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


def window_frames(fps: float, window_s: float = WINDOW_S) -> int:
  return max(1, int(round(window_s * fps)))


def window_means(curve, fps: float, window_s: float = WINDOW_S) -> np.ndarray:
  """Means of the full windows of generated frames: entry k covers frames k + 1 .. k + W.
  float64 `[T - W]` (empty when the rollout is shorter than one window). NaN frames are skipped
  inside a window (a window without any value is NaN)."""
  x = np.asarray(curve, np.float64)[1:]
  w = window_frames(fps, window_s)
  if len(x) < w:
    return np.zeros((0,))
  ok = np.isfinite(x)
  csum = np.concatenate([[0.0], np.cumsum(np.where(ok, x, 0.0))])
  ccnt = np.concatenate([[0], np.cumsum(ok)])
  s, c = csum[w:] - csum[:-w], ccnt[w:] - ccnt[:-w]
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(c > 0, s / np.maximum(c, 1), np.nan)


def horizon(curve, fps: float, threshold: float, window_s: float = WINDOW_S) -> dict:
  """{"first_s", "last_s", "reached_end"} of one per-video-frame curve `[T]` (module docstring)."""
  n = len(curve)
  means = window_means(curve, fps, window_s)
  end = n / fps
  if not len(means):
    return {"first_s": end, "last_s": end, "reached_end": True}
  below = ~(means >= threshold)          # NaN windows count as below (nothing good to show)
  if not below.any():
    return {"first_s": end, "last_s": end, "reached_end": True}
  first = int(np.argmax(below))
  above = np.nonzero(~below)[0]
  last = 0 if not len(above) else int(above[-1]) + 1
  if last >= len(means):                 # the final window is good: never lost for good
    return {"first_s": (first + 1) / fps, "last_s": end, "reached_end": False}
  return {"first_s": (first + 1) / fps, "last_s": (last + 1) / fps, "reached_end": False}


def threshold_from_references(floors: Sequence[np.ndarray], ceilings: Sequence[np.ndarray],
                              fps: float = 24.0) -> dict:
  """The horizon threshold from per-world reference curves (module docstring).

  Args:
    floors: PSNR curves `[T]` of the flat colour and frozen frame 0 (any number of worlds).
    ceilings: PSNR curves `[T]` of warp-frame-0 through the codec.
  Returns:
    {"threshold_db", "floor_db", "ceiling_db", "separable"}: separable is False when the floor
    is not below the ceiling (the world or the codec cannot tell a model that draws it from one
    that does not).
  """
  start = 1 + FRAMES_PER_LATENT           # after the first latent step
  if not len(floors) or not len(ceilings):
    nan = float("nan")
    return {"threshold_db": nan, "floor_db": nan, "ceiling_db": nan, "separable": False,
            "floor_quantile": FLOOR_QUANTILE, "ceiling_quantile": CEILING_QUANTILE}
  floor_vals = np.concatenate([np.asarray(c, np.float64)[start:] for c in floors])
  ceil_vals = np.concatenate([np.asarray(c, np.float64)[1:] for c in ceilings])
  floor = float(np.nanquantile(floor_vals, FLOOR_QUANTILE))
  ceiling = float(np.nanquantile(ceil_vals, CEILING_QUANTILE))
  return {"threshold_db": 0.5 * (floor + ceiling), "floor_db": floor, "ceiling_db": ceiling,
          "separable": bool(floor < ceiling), "floor_quantile": FLOOR_QUANTILE,
          "ceiling_quantile": CEILING_QUANTILE}


def check_threshold(threshold: float, floors: Sequence[np.ndarray], ceilings: Sequence[np.ndarray],
                    fps: float = 24.0) -> dict:
  """Does the threshold do its job on every world, under the horizon rule itself? Each floor's
  first crossing is a window that starts within the first latent step (`first_s` <= 5 / fps),
  and warp-frame-0 never crosses (censored at the rollout's end)."""
  step_s = (1 + FRAMES_PER_LATENT) / fps
  floors_ok = [horizon(c, fps, threshold)["first_s"] <= step_s for c in floors]
  ceilings_ok = [horizon(c, fps, threshold)["reached_end"] for c in ceilings]
  return {"floors_fall_within_one_step": float(np.mean(floors_ok)),
          "ceilings_stay_above": float(np.mean(ceilings_ok)),
          "holds": bool(all(floors_ok) and all(ceilings_ok))}


def median_ci(values, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
              confidence: float = CONFIDENCE) -> dict:
  """{"median", "lo", "hi", "n"}: the median of per-world values and its percentile-bootstrap CI."""
  x = np.asarray(values, np.float64)
  x = x[np.isfinite(x)]
  if not len(x):
    return {"median": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
  rng = np.random.default_rng(seed)
  boot = np.median(x[rng.integers(0, len(x), (samples, len(x)))], axis=1)
  a = (1 - confidence) / 2
  return {"median": float(np.median(x)), "lo": float(np.quantile(boot, a)),
          "hi": float(np.quantile(boot, 1 - a)), "n": int(len(x))}


def mean_ci(values, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
            confidence: float = CONFIDENCE) -> dict:
  """{"mean", "lo", "hi", "n"}: the mean of per-world values (e.g. paired differences) and its
  percentile-bootstrap CI."""
  x = np.asarray(values, np.float64)
  x = x[np.isfinite(x)]
  if not len(x):
    return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
  rng = np.random.default_rng(seed)
  boot = np.mean(x[rng.integers(0, len(x), (samples, len(x)))], axis=1)
  a = (1 - confidence) / 2
  return {"mean": float(np.mean(x)), "lo": float(np.quantile(boot, a)),
          "hi": float(np.quantile(boot, 1 - a)), "n": int(len(x))}


def segment_mean(curve, fps: float, start_s: float, stop_s: Optional[float] = None) -> float:
  """Mean of a per-video-frame curve over the frames in `[start_s, stop_s)` (NaN skipped)."""
  x = np.asarray(curve, np.float64)
  t = np.arange(len(x)) / fps
  m = (t >= start_s) & (t < (stop_s if stop_s is not None else np.inf)) & np.isfinite(x)
  return float(x[m].mean()) if m.any() else float("nan")


def world_horizons(curves: Mapping[str, Sequence[np.ndarray]], fps: float, threshold: float) -> dict:
  """{name: [horizon dict per world]} for per-world curves of several models."""
  return {name: [horizon(c, fps, threshold) for c in cs] for name, cs in curves.items()}


def set_statistics(references: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
                   models: Mapping[str, Mapping[Any, Sequence[Mapping[str, np.ndarray]]]], fps: float,
                   late_s: tuple[float, float], key: str = "psnr_known") -> dict:
  """The threshold, per-world horizons and paired late-PSNR differences of one evaluation set.

  Args:
    references: {reference: [per-world curves]} (`drift.REFERENCES`; floors "flat_colour" and
      "frozen_first", ceiling "warp_frame0").
    models: {model: {noise seed: [per-world curves]}} (the same worlds, in order, and paired noise).
    late_s: the late segment `[start, stop)` in seconds (clipped to the rollout).
  Returns:
    {"threshold": `threshold_from_references`, "threshold_check": `check_threshold`,
     "references": {name: {"horizon": median_ci of first, ...}},
     "models": {name: {"horizon": median_ci over worlds of the first crossing (mean over seeds),
                       "horizon_last": the same of the last crossing, "world_horizons_s",
                       "reached_end": fraction censored, "late_psnr": median_ci,
                       "late_diff": {other: mean_ci of this minus other, per world}}}}
  """
  curve = lambda c: np.asarray(c[key], np.float64)
  floors = [curve(c) for name in ("flat_colour", "frozen_first") for c in references.get(name, [])]
  ceilings = [curve(c) for c in references.get("warp_frame0", references.get("oracle", []))]
  th = threshold_from_references(floors, ceilings, fps)
  threshold = th["threshold_db"]
  out = {"threshold": th, "threshold_check": check_threshold(threshold, floors, ceilings, fps),
         "late_s": list(late_s), "metric": key, "references": {}, "models": {}}
  for name, curves in references.items():
    hs = [horizon(curve(c), fps, threshold) for c in curves]
    out["references"][name] = {"horizon": median_ci([h["first_s"] for h in hs]),
                               "late_psnr": median_ci([segment_mean(curve(c), fps, *late_s) for c in curves])}
  late = {}
  for name, per_seed in models.items():
    seeds = list(per_seed)
    per = [[horizon(curve(c), fps, threshold) for c in per_seed[s]] for s in seeds]
    first = np.mean([[h["first_s"] for h in row] for row in per], axis=0)
    last = np.mean([[h["last_s"] for h in row] for row in per], axis=0)
    censored = np.mean([[h["reached_end"] for h in row] for row in per])
    late[name] = np.mean([[segment_mean(curve(c), fps, *late_s) for c in per_seed[s]] for s in seeds], axis=0)
    out["models"][name] = {"horizon": median_ci(first), "horizon_last": median_ci(last),
                           "world_horizons_s": [float(x) for x in first],
                           "world_horizons_last_s": [float(x) for x in last],
                           "reached_end": float(censored), "late_psnr": median_ci(late[name])}
  for name in late:
    out["models"][name]["late_diff"] = {other: mean_ci(late[name] - late[other]) for other in late
                                        if other != name and len(late[other]) == len(late[name])}
  return out
