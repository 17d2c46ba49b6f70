"""What the evaluation shows rather than tells: GIFs and MP4s beside the oracle, the drift plot.

  gifs/<set>_<model>.gif   generated | oracle, world 0, the first noise seed, the whole rollout
                           (every `stride`-th frame), halved until it is under `GIF_MAX_BYTES`
  gifs/<set>_all.gif       the oracle and every model side by side, labelled
  videos/<set>_<model>_world<k>.mp4   (optional) generated | oracle, every world, the first seed, every frame
  drift_<set>.png          psnr_known per bin per model with the references and the threshold
"""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from apt2_jax import media

GIF_MAX_BYTES = 1_000_000


def side_by_side(*panels: np.ndarray, gap: int = 2) -> np.ndarray:
  """Concatenates uint8 `[T, H, W, 3]` panels along the width with white gaps."""
  t, h = panels[0].shape[:2]
  sep = np.full((t, h, gap, 3), 255, np.uint8)
  out = [panels[0]]
  for p in panels[1:]:
    out += [sep, p]
  return np.concatenate(out, axis=2)


def label(frames: np.ndarray, text: str, height: int = 12) -> np.ndarray:
  """Puts a `height`-pixel banner with `text` (pillow's default font) above every frame."""
  from PIL import Image, ImageDraw
  img = Image.new("RGB", (frames.shape[2], height))
  ImageDraw.Draw(img).text((1, 0), text, fill=(255, 255, 255))
  banner = np.asarray(img, np.uint8)
  return np.concatenate([np.broadcast_to(banner, (len(frames),) + banner.shape), frames], axis=1)


def write_gif_under(path: str, frames: np.ndarray, fps: float, max_bytes: int = GIF_MAX_BYTES) -> str:
  """A GIF of the whole of `frames` under `max_bytes`: every 2nd frame (and half the rate) until it fits."""
  while True:
    media.write_gif(path, frames, fps)
    if os.path.getsize(path) <= max_bytes or len(frames) <= 2:
      return path
    frames, fps = frames[::2], max(fps / 2, 1.0)


def gif_stride(num_frames: int, max_frames: int = 240) -> int:
  """Every how many video frames a GIF keeps one (at most `max_frames` of them)."""
  return max(1, -(-num_frames // max_frames))


def write_gifs(out_dir: str, set_name: str, kept: Mapping[str, np.ndarray], stride: int, fps: float,
               max_bytes: int = GIF_MAX_BYTES) -> dict:
  """`gifs/<set>_<model>.gif` (generated | oracle) and `gifs/<set>_all.gif` of the frames kept
  every `stride` video frames (`kept["oracle"]` and one entry per model); relative paths."""
  gif_dir = os.path.join(out_dir, "gifs")
  os.makedirs(gif_dir, exist_ok=True)
  oracle, rate = kept["oracle"], fps / stride
  out = {}
  for name, frames in kept.items():
    if name == "oracle":
      continue
    n = min(len(frames), len(oracle))
    path = os.path.join(gif_dir, f"{set_name}_{name}.gif")
    write_gif_under(path, side_by_side(frames[:n], oracle[:n]), rate, max_bytes)
    out[name] = os.path.relpath(path, out_dir)
  panels = [label(v, k) for k, v in kept.items()]
  n = min(len(p) for p in panels)
  path = os.path.join(out_dir, "gifs", f"{set_name}_all.gif")
  write_gif_under(path, side_by_side(*[p[:n] for p in panels]), rate, max_bytes)
  out["all"] = os.path.relpath(path, out_dir)
  return out


def write_video(out_dir: str, name: str, frames: np.ndarray, oracle: np.ndarray, fps: float) -> str:
  """`videos/<name>.mp4`: the whole rollout, generated | oracle; the relative path."""
  os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
  path = os.path.join(out_dir, "videos", f"{name}.mp4")
  n = min(len(frames), len(oracle))
  media.write_mp4(path, side_by_side(frames[:n], oracle[:n]), fps)
  return os.path.relpath(path, out_dir)


def write_drift_plot(out_dir: str, set_name: str, summaries: Mapping, world: str, bin_s: float,
                     default_threshold: float) -> str:
  """`drift_<set>.png`: psnr_known per bin, each model (one line per noise seed; its psnr_recent thin
  and faint), the references (black: dashed, dash-dotted, dotted) and the horizon threshold (dotted
  red). Bins without a known region are gaps."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)

  def centre(s):  # the middle of each bin's generated frames (the last bin may be partial)
    start = np.asarray(s["bins"]["start_s"], np.float64)
    return start + np.minimum(bin_s, s["duration_s"] - start) / 2

  for i, (name, per_seed) in enumerate(summaries["models"].items()):
    for j, (seed, s) in enumerate(per_seed.items()):
      ax.plot(centre(s), s["bins"]["psnr_known"], "-o", ms=3, color=f"C{i % 10}", alpha=1.0 if j == 0 else 0.5,
              label=f"{name} (seed {seed})")
      if j == 0:
        ax.plot(centre(s), s["bins"]["psnr_recent"], "-", lw=0.7, color=f"C{i % 10}", alpha=0.35)
  for style, kind in (("--", "warp_last"), ("-.", "one_step_back"), (":", "frozen_first")):
    if kind not in summaries["references"]:
      continue
    s = summaries["references"][kind]
    ax.plot(centre(s), s["bins"]["psnr_known"], style, color="k", lw=1.2, label=f"{kind} (reference)")
  threshold = summaries.get("statistics", {}).get("threshold", {}).get("threshold_db", default_threshold)
  ax.axhline(threshold, color="r", ls=":", lw=1, label=f"horizon threshold {threshold:.1f} dB")
  ax.set_xlabel("seconds")
  ax.set_ylabel("psnr_known (dB)")
  ax.set_title(f"{world}, {set_name}: psnr_known (frame 0's region) per {bin_s:g} s bin; psnr_recent thin",
               fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6, loc="best")
  fig.tight_layout()
  path = os.path.join(out_dir, f"drift_{set_name}.png")
  fig.savefig(path)
  plt.close(fig)
  return os.path.relpath(path, out_dir)
