"""The report: summaries of the curves, the JSON report, the Markdown summary table.

`DEFINITIONS` states every metric and summary; `report.json` embeds it (`config.definitions`).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from apt2_jax.evaluation.metrics import PSNR_CAP
from apt2_jax.generation.stream import FRAMES_PER_STEP as FRAMES_PER_LATENT

SUMMARY_WINDOW_S = 10.0
RELATIVE_HORIZON_DB = 3.0   # `horizon_vs_vae_s`: PSNR within this many dB of the VAE's ceiling

DEFINITIONS = """(per video frame unless said otherwise; frames are uint8 RGB):
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
repeats frame 0 (the floor of one that ignores the controls; drawn in the drift plots)."""


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


def _mean_curves(per_world: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  out = {}
  for key in per_world[0]:
    stack = np.stack([np.asarray(w[key], np.float64) for w in per_world])
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN frames (e.g. no figure) stay NaN
      out[key] = np.nanmean(stack, axis=0)
  return out


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


# ------------------------------------------------------------------------------------------------
# Assembly
# ------------------------------------------------------------------------------------------------


def _summaries(curves, durations, fps, good_psnr, num_frames, relative) -> dict:
  """{"<d>s": summary of `curves` over duration d's prefix} for every duration."""
  frames_of = lambda d: min(num_frames, 1 + FRAMES_PER_LATENT * math.ceil(d * fps / FRAMES_PER_LATENT))
  return {f"{d:g}s": summarize(curves, fps, good_psnr, frames_of(d), relative) for d in durations}


def model_entries(models: Mapping[str, Any], throughputs: Mapping[str, dict], results: Mapping[str, list],
                  references: Mapping[str, list], config: Mapping[str, Any]) -> tuple[dict, dict, dict]:
  """(report["models"], report["references"], mean curves per model) from the per-world results.

  Adds each world entry's "summary" in place. `config`: the report's config (seconds, fps,
  good_psnr, video_frames).
  """
  durations, fps, good_psnr = config["seconds"], config["fps"], config["good_psnr"]
  vae_ref = references["vae_reconstruction"]
  relative = float(np.mean([r["psnr"] for r in vae_ref])) - RELATIVE_HORIZON_DB
  summaries = lambda curves: _summaries(curves, durations, fps, good_psnr, config["video_frames"], relative)
  out, mean_curves = {}, {}
  for name, spec in models.items():
    per_world = results[name]
    for e in per_world:
      e["summary"] = summaries(e["curves"])
    mean_curves[name] = _mean_curves([e["curves"] for e in per_world])
    out[name] = {"sampler": spec.describe(), "throughput": throughputs[name], "benchmark": spec.benchmark,
                 "summary": summaries(mean_curves[name]), "mean_curves": mean_curves[name],
                 "worlds": per_world}
  frozen = _mean_curves(references["frozen_frame0"])
  refs = {"vae_reconstruction": {"psnr": float(np.mean([r["psnr"] for r in vae_ref])),
                                 "ssim": float(np.mean([r["ssim"] for r in vae_ref])),
                                 "seconds": (vae_ref[0]["frames"] - 1) / fps, "worlds": vae_ref},
          "frozen_frame0": {"summary": summaries(frozen), "mean_curves": frozen}}
  return out, refs, mean_curves


def write_report(report: Mapping[str, Any], out_dir: str, progress: bool = True) -> dict:
  """Writes `report.json` and `summary.md` (printed when `progress`); returns the JSON-able report.
  Each file appears whole or not at all (`disk.write_atomic`; a full disk is one line)."""
  from apt2_jax import disk
  report = _jsonable(report)
  disk.write_atomic(os.path.join(out_dir, "report.json"), json.dumps(report, indent=1), "evaluation report")
  text = summary_table(report)
  disk.write_atomic(os.path.join(out_dir, "summary.md"), text + "\n", "evaluation report")
  if progress:
    print(text, flush=True)
  return report
