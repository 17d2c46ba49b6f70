"""Frame metrics (numpy; frames uint8 `[..., H, W, 3]`): PSNR, SSIM, phase correlation, puppet figure.

The per-frame metrics the report uses, and their definitions, are `apt2_jax.evaluation.drift`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

PSNR_CAP = 100.0            # dB reported for identical frames (JSON has no inf)
FIGURE_THRESHOLD = 48       # puppet figure mask: sum over RGB of |frame - background| (uint8)


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
  """Puppet pose error per frame, without a keypoint detector: the figure is every pixel that
  differs from the world's background (the oracle rendered with every keypoint off screen) by more
  than `FIGURE_THRESHOLD` (sum over RGB). figure_psnr: PSNR over the oracle's figure pixels;
  figure_iou: IoU of the generated and the oracle figure masks; figure_centroid_error_px: distance
  between the masks' centroids (pixels). A drifting background lowers the IoU, as it should."""
  gen_mask, ref_mask = figure_mask(generated, background), figure_mask(oracle, background)
  inter = (gen_mask & ref_mask).sum(axis=(-2, -1))
  union = (gen_mask | ref_mask).sum(axis=(-2, -1))
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
  centroid = np.linalg.norm(_centroid(gen_mask) - _centroid(ref_mask), axis=-1)
  return {"figure_psnr": psnr(generated, oracle, ref_mask, cap=PSNR_CAP), "figure_iou": iou,
          "figure_centroid_error_px": centroid}
