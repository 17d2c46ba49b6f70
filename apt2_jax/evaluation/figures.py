"""Videos and plots: side-by-side panels, size-capped GIFs, labelled panels, drift curves."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from apt2_jax import media
from apt2_jax.generation.stream import FRAMES_PER_STEP as FRAMES_PER_LATENT

GIF_MAX_BYTES = 1_000_000


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


def write_plots(out_dir: str, world: str, mean_curves: Mapping[str, Mapping[str, np.ndarray]],
                frozen: Mapping[str, np.ndarray], fps: float) -> dict[str, str]:
  """The drift plots (PSNR, SSIM; frozen frame 0 drawn as the floor) and the world's control
  plot (camera: control error; puppet: figure centroid error). Returns {name: path}."""
  with_floor = {**mean_curves, "frozen frame 0 (reference)": frozen}
  drift = lambda name, keys, ylabel, what: plot_curves(
      os.path.join(out_dir, f"{name}.png"), with_floor, keys, fps, ylabel,
      f"{world}: {what} vs oracle (solid: all, dashed: visible in frame 0)", average=FRAMES_PER_LATENT)
  plots = {"drift_psnr": drift("drift_psnr", ("psnr", "psnr_visible"), "PSNR (dB)", "PSNR"),
           "drift_ssim": drift("drift_ssim", ("ssim", "ssim_visible"), "SSIM", "SSIM")}
  if world == "camera":
    plots["control_error"] = plot_curves(
        os.path.join(out_dir, "control_error.png"), mean_curves, ("control_error_px", "oracle_motion_px"),
        fps / FRAMES_PER_LATENT, "pixels per latent step",
        "camera control error (solid: |generated - oracle| motion, dashed: oracle motion)", offset=1)
  elif world == "puppet":
    plots["figure_error"] = plot_curves(
        os.path.join(out_dir, "figure_error.png"), mean_curves, ("figure_centroid_error_px",), fps,
        "pixels", "puppet figure centroid error", average=FRAMES_PER_LATENT)
  return plots
