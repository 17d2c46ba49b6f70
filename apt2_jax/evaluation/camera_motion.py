"""Camera geometry, warping and the motion estimate behind the testbed's drift metrics (`drift`), on
plain arrays (uint8 frames, bool masks, 3x3 homographies).

`commanded_homographies` turns the camera world's controls into per-frame homographies
(`relative_homography`, below under warp_error), `commanded_shift` into the commanded image motion
of the frame centre; `warp_errors` and `motion_scales` score a video against them.

Fixed before any model is trained (part of the claims' pass criteria, reported by
`drift.fixed_criteria`; never tune them on results):

  MOTION_MIN_PX = 0.5 px     pairs with less commanded motion have no motion estimate and are left
                             out of `drift.motion_ratio` (the ratio of a still camera is undefined).
  The motion estimator's settings (`motion_scales`): MOTION_STRIDE = 4 frames (one latent frame),
  MOTION_BLUR_SIGMA = 2 px, MOTION_DOWNSAMPLE = 4 (16x16 grey images), MOTION_SCALES = -1, -0.95,
  .., 1.6 (from reversed to 1.6x the command), MOTION_MIN_OVERLAP = 15% of the pixels,
  MOTION_MIN_CORRELATION = 0.5 (below it the frames show no coherent motion: alpha 0; through the
  PCA codec the oracle's correlation is >= 0.98 in 99% of frames, independent noise frames' ~0.1).

Per video frame t >= 1 (`drift.frame_metrics`; frame 0 is the given image):

  warp_error     RMS difference (grey levels, RGB) between frame t and frame t-1 warped by the
                 commanded camera motion, over the pixels of t whose source lies inside t-1. A
                 pinhole camera that only rotates (and zooms) maps frame t's pixels to frame t-1's
                 exactly by the homography `K_{t-1} R K_t^-1` (`relative_homography`); forward
                 motion (depth-dependent; zero in the panorama world) is ignored. It measures
                 control following without the oracle; the oracle's own value (bilinear resampling
                 of the rendered texture) is its floor.
  motion_scale   alpha: how far the content moved from frame t-s to frame t (s = min(4, t), one
                 latent frame: the two frames lie in different codec blocks) relative to the
                 commanded camera motion over those s frames (`motion_scales`). Both frames are
                 turned grey, blurred (Gaussian, sigma 2 px) and box-downsampled 4x (16x16); frame
                 t-s is warped by the commanded homography raised to the power alpha (the camera
                 rotation scaled by alpha, exact for a rotating pinhole camera) for alpha in -1,
                 -0.95, .., 1.6, and alpha minimises the mean squared difference to frame t over the
                 pixels whose source lies inside frame t-s (at least 15% of them); the grid is
                 searched coarse to fine (every other value, then the two beside the best) and the
                 minimum refined by a parabola through it and its neighbours. When frame t-s so
                 warped correlates with frame t below 0.5 (unrelated or noise frames, where the
                 minimum is chance), alpha is 0: no coherent motion. Negative values keep content
                 that moves elsewhere unbiased (a clip panning in an unrelated direction reads ~0,
                 +-0.15, not the positive half of its projection). NaN when the commanded motion
                 over the s frames is under s x `MOTION_MIN_PX` at the centre.
                 Why: the models' frames come through the PCA codec (8x8-pixel x 4-frame blocks),
                 whose static 8-px block edges dominated the former estimate (phase correlation of
                 frames t-1, t): the oracle through the codec read a motion ratio of 0.03 instead of
                 ~1.0 (copy-last 0.17). This estimate reads 1.00 for the oracle through the codec
                 (wander and bursty trajectories, also on bursts alone), 0.00 for a frozen video and
                 for noise, and 0.50 for a video rendered at half the commanded speed
                 (`tests/test_testbed_metrics.py`); copy-last reads 0.8 - 0.98 (a copy one frame
                 late does move).

The `psnr_recent` region (`windowed_recent`; `rotation_in_view` is its visibility test for a camera
that rotates and zooms about a fixed centre) is computed here too.
"""
from __future__ import annotations

import math

import numpy as np

MOTION_MIN_PX = 0.5
FRAMES_PER_LATENT = 4
MOTION_STRIDE = FRAMES_PER_LATENT
MOTION_BLUR_SIGMA = 2.0
MOTION_DOWNSAMPLE = 4
MOTION_SCALES = np.round(np.arange(-1.0, 1.6 + 1e-9, 0.05), 2)
MOTION_MIN_OVERLAP = 0.15
MOTION_MIN_CORRELATION = 0.5


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


def commanded_shift(homographies, height: int, width: int) -> np.ndarray:
  """`[T, 2]` (dy, dx): the commanded image motion of the frame centre from frame t-1 to t
  (`centre - H centre`; content moves by it), row 0 zeros for its identity. Same sign as
  `metrics.phase_correlation`. Also the motion over several frames for composed homographies."""
  h = np.asarray(homographies, np.float64).reshape(-1, 3, 3)
  cy, cx = height / 2 - 0.5, width / 2 - 0.5
  p = h @ np.array([cx, cy, 1.0])
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.stack([cy - p[:, 1] / p[:, 2], cx - p[:, 0] / p[:, 2]], -1)


def shift_homography(dy: float, dx: float) -> np.ndarray:
  """H of a pure image translation by (dy, dx): pixel p of frame t comes from p - (dx, dy)."""
  return np.array([[1.0, 0.0, -dx], [0.0, 1.0, -dy], [0.0, 0.0, 1.0]])


# ------------------------------------------------------------------------------------------------
# Warping (bilinear, batched)
# ------------------------------------------------------------------------------------------------


def _pixel_grid(height: int, width: int) -> np.ndarray:
  """Homogeneous pixel-index coordinates (x, y, 1) of every pixel, row-major: `[3, H * W]`."""
  y, x = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
  return np.stack([x.ravel(), y.ravel(), np.ones(x.size)])


def _sample(images, sx, sy) -> tuple[np.ndarray, np.ndarray]:
  """Bilinear samples of `images` `[n, h, w, c]` at pixel coordinates `sx`, `sy` `[n, ...]`:
  (values float32 `[n, ..., c]`, valid `[n, ...]`: the coordinate lies inside the image, NaN is
  outside). Outside coordinates are clamped to the border (and marked invalid). float32 throughout
  (coordinates exact to ~1e-5 px at 64 px)."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  eps = 1e-4
  sx, sy = np.array(sx, np.float32), np.array(sy, np.float32)      # copies, modified in place
  with np.errstate(invalid="ignore"):
    valid = (sx >= -eps) & (sx <= w - 1 + eps) & (sy >= -eps) & (sy <= h - 1 + eps)   # False for NaN
  for v, size in ((sx, w), (sy, h)):
    np.nan_to_num(v, copy=False)
    np.clip(v, 0, size - 1, out=v)
  x0, y0 = sx.astype(np.int32), sy.astype(np.int32)
  np.minimum(x0, max(w - 2, 0), out=x0)
  np.minimum(y0, max(h - 2, 0), out=y0)
  fx, fy = np.subtract(sx, x0, out=sx), np.subtract(sy, y0, out=sy)
  base = y0 * w
  base += x0
  base += (np.arange(n, dtype=np.int32) * (h * w)).reshape((n,) + (1,) * (sx.ndim - 1))
  x1, y1 = min(1, w - 1), min(1, h - 1) * w
  gx, gy = 1 - fx, 1 - fy
  weights = (gx * gy, fx * gy, gx * fy, fx * fy)
  if c == 1:   # one channel: scalar gathers
    flat = images.reshape(-1).astype(np.float32, copy=False)
    out = flat[base] * weights[0]
    for offset, weight in zip((x1, y1, y1 + x1), weights[1:]):
      out += flat[base + offset] * weight
    return out[..., None], valid
  flat = images.reshape(n * h * w, c).astype(np.float32, copy=False)
  out = flat[base] * weights[0][..., None]
  for offset, weight in zip((x1, y1, y1 + x1), weights[1:]):
    out += flat[base + offset] * weight[..., None]
  return out, valid


def _warp_samples(previous, homographies) -> tuple[np.ndarray, np.ndarray]:
  """Frames `[n, H, W, C]` sampled at the sources of every pixel under their H `[n, 3, 3]`
  (bilinear): (float32 `[n, H * W, C]`, valid `[n, H * W]`)."""
  previous = np.asarray(previous)
  height, width = previous.shape[1:3]
  q = np.asarray(homographies, np.float64) @ _pixel_grid(height, width)            # [n, 3, P]
  with np.errstate(divide="ignore", invalid="ignore"):
    sx, sy = q[:, 0] / q[:, 2], q[:, 1] / q[:, 2]
  return _sample(previous, np.where(q[:, 2] > 0, sx, np.nan), sy)


def warp_batch(previous, homographies) -> tuple[np.ndarray, np.ndarray]:
  """Frames uint8 `[n, H, W, C]` each warped by its H `[n, 3, 3]` (frame t's pixel -> its source in
  the previous frame; bilinear): (float64 `[n, H, W, C]`, valid `[n, H, W]`: the source lies inside)."""
  previous = np.asarray(previous)
  values, valid = _warp_samples(previous, homographies)
  return values.astype(np.float64).reshape(previous.shape), valid.reshape(previous.shape[:3])


def warp(previous, h) -> tuple[np.ndarray, np.ndarray]:
  """Frame t-1 uint8 `[H, W, 3]` warped to frame t by H (bilinear): (float64 [H, W, 3], valid
  [H, W]: the source lies inside frame t-1)."""
  out, valid = warp_batch(np.asarray(previous)[None], np.asarray(h, np.float64)[None])
  return out[0], valid[0]


def warp_errors(previous, current, homographies, chunk: int = 32) -> np.ndarray:
  """`[n]`: RMS difference (grey levels) of `current[i]` and `previous[i]` warped by H[i], over the
  valid pixels (NaN when none). In chunks of `chunk` frames (cache-sized)."""
  previous, current = np.asarray(previous), np.asarray(current)
  homographies = np.asarray(homographies, np.float64)
  out = np.full(len(previous), np.nan)
  for a in range(0, len(previous), chunk):
    warped, valid = _warp_samples(previous[a:a + chunk], homographies[a:a + chunk])   # [k, P, C]
    cur = current[a:a + chunk].reshape(warped.shape).astype(np.float32)
    sq = np.square(warped - cur).mean(-1, dtype=np.float64)
    count = valid.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
      out[a:a + chunk] = np.where(count > 0, np.sqrt(np.where(valid, sq, 0.0).sum(-1) / np.maximum(count, 1)),
                                  np.nan)
  return out


def warp_error(previous, current, h) -> float:
  """RMS difference (grey levels) of `current` and `previous` warped by H, over the valid pixels
  (NaN when none)."""
  return float(warp_errors(np.asarray(previous)[None], np.asarray(current)[None], np.asarray(h)[None])[0])


# ------------------------------------------------------------------------------------------------
# The motion estimate: the scale of the commanded motion that best explains frame t from frame t-4
# ------------------------------------------------------------------------------------------------


def motion_features(frames, sigma: float = MOTION_BLUR_SIGMA, downsample: int = MOTION_DOWNSAMPLE) -> np.ndarray:
  """Grey frames `[n, H, W, 3]` -> blurred (Gaussian `sigma` px) and box-downsampled by
  `downsample`: float32 `[n, H / downsample, W / downsample]`."""
  from scipy import ndimage
  f = np.asarray(frames)
  g = np.einsum("...c,c->...", f, np.array([0.299, 0.587, 0.114], np.float32), dtype=np.float32)
  if sigma:
    g = ndimage.gaussian_filter(g, (0, sigma, sigma), mode="nearest", truncate=3.0)
  n, h, w = g.shape
  d = int(downsample)
  if d > 1:
    g = g[:, :h // d * d, :w // d * d].reshape(n, h // d, d, w // d, d).mean((2, 4))
  return g


def homography_power(h, scales) -> np.ndarray:
  """`H^alpha` `[n, A, 3, 3]` of homographies `[n, 3, 3]` for every alpha in `scales` (`[A]`, or
  `[n, A]` per homography), H normalised to det 1, by eigendecomposition. For a rotating pinhole
  camera `K R K^-1` it is `K R^alpha K^-1`: the rotation scaled by alpha about the same axis. A
  homography whose eigendecomposition fails (ill-conditioned, e.g. a pure translation, or not
  finite) gets `(1 - alpha) I + alpha H` instead (exact for translations); alpha = 0 gives I."""
  h = np.asarray(h, np.float64)
  scales = np.broadcast_to(np.asarray(scales, np.float64), (len(h), np.shape(scales)[-1]))   # [n, A]
  det = np.linalg.det(h)
  h = h / np.cbrt(np.where(det > 0, det, 1.0))[:, None, None]
  out = np.empty(scales.shape + (3, 3))
  with np.errstate(all="ignore"):
    w, v = np.linalg.eig(h)
    cond = np.linalg.cond(v)
    ok = np.isfinite(cond) & (cond < 1e8) & (det > 0)
    vinv = np.linalg.inv(np.where(ok[:, None, None], v, np.eye(3)))
    powers = np.exp(np.log(w.astype(complex))[:, None, :] * scales[..., None])            # [n, A, 3]
    m = np.einsum("nij,naj,njk->naik", v, powers, vinv)
  ok &= np.all(np.isfinite(m), axis=(1, 2, 3)) & np.all(np.abs(m.imag) < 1e-6, axis=(1, 2, 3))
  out[ok] = m.real[ok]
  if not ok.all():   # fallback: (1 - alpha) I + alpha H, exact at 0 and 1
    a = scales[~ok][..., None, None]
    out[~ok] = (1 - a) * np.eye(3) + a * h[~ok][:, None]
  out[scales == 0] = np.eye(3)   # exact (no rounding from the eigenvectors)
  return out


def _composed(homographies, stride: int) -> np.ndarray:
  """Row j: frame j's pixels -> frame j - min(stride, j)'s, `H[j-s+1] .. H[j]` composed; row 0 and
  the identity of the first row count as no motion."""
  h = np.asarray(homographies, np.float64).copy()
  h[0] = np.eye(3)
  padded = np.concatenate([np.tile(np.eye(3), (stride - 1, 1, 1)), h])
  out = padded[:len(h)]
  for k in range(1, stride):
    out = out @ padded[k:k + len(h)]
  return out


def _scale_warp(comp, source, scales, to_full, grid) -> tuple[np.ndarray, np.ndarray]:
  """`source` `[k, h, w]` warped by `comp ** scales[i, a]` (full-resolution homographies `[k, 3, 3]`,
  applied in the small grid): (float32 `[k, A, h * w]`, valid `[k, A, h * w]`)."""
  hp = np.linalg.inv(to_full) @ homography_power(comp, scales) @ to_full          # [k, A, 3, 3]
  q = (hp @ grid).astype(np.float32)                                               # [k, A, 3, P]
  with np.errstate(divide="ignore", invalid="ignore"):
    sx, sy = q[:, :, 0] / q[:, :, 2], q[:, :, 1] / q[:, :, 2]
  values, valid = _sample(source[..., None], np.where(q[:, :, 2] > 0, sx, np.nan), sy)
  return values[..., 0], valid


def _scale_errors(comp, source, target, scales, to_full, grid, need) -> np.ndarray:
  """Mean squared difference `[k, A]` between `target` `[k, h, w]` and `source` warped by
  `_scale_warp`; inf where fewer than `need` pixels have their source inside."""
  values, valid = _scale_warp(comp, source, scales, to_full, grid)
  diff = values - target.reshape(len(target), 1, -1)
  count = valid.sum(-1)
  total = np.einsum("kap,kap->ka", np.where(valid, diff, 0.0), diff, dtype=np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count >= need, total / np.maximum(count, 1), np.inf)


def _scale_correlation(comp, source, target, scales, to_full, grid) -> np.ndarray:
  """Pearson correlation `[k]` over the valid pixels between `target` `[k, h, w]` and `source`
  warped by `comp ** scales[i]` (`[k]`); NaN where either is constant."""
  values, valid = _scale_warp(comp, source, np.asarray(scales, np.float64)[:, None], to_full, grid)
  values, valid = values[:, 0].astype(np.float64), valid[:, 0]
  target = target.reshape(len(target), -1).astype(np.float64)
  count = np.maximum(valid.sum(-1), 1)
  mean = lambda x: np.where(valid, x, 0.0).sum(-1) / count
  mv, mt = mean(values), mean(target)
  cov = mean(values * target) - mv * mt
  var = (mean(values * values) - mv * mv) * (mean(target * target) - mt * mt)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(var > 1e-12, cov / np.sqrt(np.maximum(var, 1e-300)), np.nan)


def motion_scales(frames, homographies, first: int = 1, *, stride: int = MOTION_STRIDE,
                  scales=MOTION_SCALES, sigma: float = MOTION_BLUR_SIGMA, downsample: int = MOTION_DOWNSAMPLE,
                  min_overlap: float = MOTION_MIN_OVERLAP, min_px: float = MOTION_MIN_PX,
                  min_correlation: float = MOTION_MIN_CORRELATION, chunk: int = 32) -> np.ndarray:
  """alpha per frame (`[n]`, NaN before `first` and where undefined): the multiple of the commanded
  camera motion from frame j - s to frame j (s = min(stride, j)) that best explains frame j.

  `frames` uint8 `[n, H, W, 3]` consecutive video frames, `homographies` `[n, 3, 3]` their
  commanded homographies (row j: frame j's pixels -> frame j-1's; row 0 unused). Both frames'
  `motion_features`; frame j - s is warped by `homography_power(H_{j-s+1} .. H_j, alpha)` (bilinear,
  in the downsampled pixel grid) for alpha on the grid `scales` (increasing, evenly spaced; negative:
  against the command); alpha minimises the mean squared difference to frame j over the pixels
  whose source lies inside (at least `min_overlap` of them). The grid is searched coarse to fine
  (every other scale, then the two beside the best: the full grid's minimum wherever the error has
  one minimum within two steps), and a non-zero minimum refined by a parabola through it and its two
  neighbours (by at most half a step).
  When frame j - s so warped correlates with frame j (Pearson, over the valid pixels) below
  `min_correlation`, the frames show no coherent motion (unrelated frames, noise) and alpha is 0.
  NaN when the commanded centre motion over the s frames is under `s * min_px` or no alpha has the
  overlap. See the module docstring for why (the PCA codec's block edges).
  """
  frames = np.asarray(frames)
  n, height, width = frames.shape[:3]
  scales = np.asarray(scales, np.float64)
  out = np.full(n, np.nan)
  if n < 2:
    return out
  comp = _composed(homographies, stride)
  span = np.minimum(np.arange(n), stride)
  size = np.linalg.norm(commanded_shift(comp, height, width), axis=-1)
  todo = np.nonzero((np.arange(n) >= max(first, 1)) & (size >= span * min_px))[0]
  if not len(todo):
    return out
  feats = motion_features(frames, sigma, downsample)
  _, hd, wd = feats.shape
  d = height / hd
  to_full = np.array([[d, 0.0, (d - 1) / 2], [0.0, d, (d - 1) / 2], [0.0, 0.0, 1.0]])  # small px -> full px
  grid = _pixel_grid(hd, wd)
  need = max(1, int(math.ceil(min_overlap * grid.shape[1])))
  num = len(scales)
  step = float(scales[1] - scales[0]) if num > 1 else 0.0
  coarse = np.unique(np.r_[np.arange(0, num, 2), num - 1])
  for a in range(0, len(todo), chunk):
    j = todo[a:a + chunk]
    rows = np.arange(len(j))
    errors = lambda idx: _scale_errors(comp[j], feats[j - span[j]], feats[j], scales[idx], to_full, grid, need)
    mse = np.full((len(j), num), np.inf)
    mse[:, coarse] = errors(coarse)
    best = np.argmin(mse, axis=1)
    beside = np.clip(best[:, None] + np.array([-1, 1]), 0, num - 1)               # [k, 2]
    mse[rows[:, None], beside] = errors(beside)
    best = np.argmin(mse, axis=1)
    found = np.isfinite(mse[rows, best])
    alpha = scales[best].copy()
    inner = found & (best > 0) & (best < num - 1) & (mse[rows, best] > 0)   # 0: an exact match
    if inner.any() and step:
      lo, mid, hi = (mse[rows[inner], best[inner] + k] for k in (-1, 0, 1))
      with np.errstate(invalid="ignore", divide="ignore"):
        denom = lo - 2 * mid + hi
        off = np.where(np.isfinite(denom) & (denom > 0), 0.5 * (lo - hi) / np.where(denom > 0, denom, 1.0), 0.0)
      alpha[inner] += step * np.clip(off, -0.5, 0.5)
    # No coherent content to follow (unrelated or noise frames: the grid's minimum is then chance,
    # often at a fractional shift whose interpolation smooths): no motion.
    corr = _scale_correlation(comp[j], feats[j - span[j]], feats[j], alpha, to_full, grid)
    alpha = np.where(corr >= min_correlation, alpha, 0.0)
    out[j] = np.where(found, alpha, np.nan)
  return out


# ------------------------------------------------------------------------------------------------
# Visibility: the psnr_recent region
# ------------------------------------------------------------------------------------------------


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
