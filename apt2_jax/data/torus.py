"""The torus world: a view that pans and tilts over a periodic image whose period is the frame.

`make_world('torus', config)` (`WORLD_NAMES`); control type "camera", control_dim 5, the
panorama's control conventions and trajectory process (`panorama.PanoramaWorld.random_controls`:
log-normal speed, turning heading, bursts of fast motion, the tethered evaluation variants).

Why it exists: everything a model must generate follows from frame 0 and the controls. The
content is periodic with the frame's own period in both axes, and the camera moves in whole
pixels per video frame, so every frame is an exact wrap-around shift (`np.roll`) of frame 0:

  frame_t = roll(frame_0, shift_0..t),    shift_t = (dy, dx) = (round(tilt_t f), -round(pan_t f))

with f the panorama's focal length in pixels (`panorama.focal_px`); the controls are quantised
so that `pan f` and `tilt f` are whole numbers (the content moves left under a pan right and
down under a tilt up, `image_shift`'s convention). Consequences, all exact:
  oracle          `render_frames` (rolls of the scene's base image)
  warp-last       `warp(frame_{t-1}, shift_t)` equals frame t
  warp-frame-0    frame 0 rolled by the summed shifts equals frame t
  known pixels    every pixel of every frame (`known_mask` is all True)
So error in a rollout is drift and nothing else: there is no content to invent.

Scene (per seed): a background of two palette colours mixed by a periodic low-frequency wave,
periodic colour tints, and `TORUS_BLOBS` soft round blobs (radius 3 - 12 px, flat core, smooth
edge) placed with the torus distance, composited in a fixed order. Palettes as the panorama's
(seen for train/validation, unseen for test); captions the panorama's.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from apt2_jax.data import captions
from apt2_jax.data import panorama
from apt2_jax.data import world_base as worlds

TORUS_BLOBS = 20
_RADIUS_PX = (4.0, 14.0)      # blob radius range (log-uniform), pixels
_EDGE = 0.8                   # outer fraction of the radius over which a blob fades out


def content_shift(controls: np.ndarray, focal: float) -> np.ndarray:
  """Per-frame content shift `(dy, dx)` in whole pixels, int64 `[T, 2]` (row 0 zeros)."""
  c = np.asarray(controls, np.float64)
  return np.stack([np.rint(c[:, 1] * focal), -np.rint(c[:, 0] * focal)], -1).astype(np.int64)


def roll(frames: np.ndarray, shift) -> np.ndarray:
  """Frames `[..., H, W, C]` with their content moved by `shift = (dy, dx)` pixels, wrapping."""
  return np.roll(frames, (int(shift[0]), int(shift[1])), axis=(-3, -2))


class TorusWorld(panorama.PanoramaWorld):
  """See the module docstring."""
  name = 'torus'

  # -- scene -----------------------------------------------------------------------------------
  def scene(self, seed):
    h, w = self.config.height, self.config.width
    rng = np.random.default_rng([seed, 0])
    pool = panorama.APPEARANCES[self.appearance(seed)]
    name = str(pool[rng.integers(len(pool))])
    top, bottom, colours = (np.asarray(c, np.float64) for c in panorama.PALETTES[name])
    y, x = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing='ij')
    ky, kx = rng.integers(0, 2, 2) if rng.random() < 0.5 else (1, 1)
    wave = 0.5 + 0.5 * np.cos(2 * np.pi * (ky * y + kx * x) + rng.uniform(0, 2 * np.pi))
    image = bottom + (top - bottom) * wave[..., None]
    for _ in range(2):  # periodic tints, one frequency each
      fy, fx = rng.integers(-1, 2, 2)
      image += rng.normal(0, 0.06, 3) * np.cos(2 * np.pi * (fy * y + fx * x) + rng.uniform(0, 6.3))[..., None]
    py, px = np.arange(h)[:, None] + 0.5, np.arange(w)[None, :] + 0.5
    for _ in range(TORUS_BLOBS):
      cy, cx = rng.uniform(0, h), rng.uniform(0, w)
      radius = np.exp(rng.uniform(*np.log(_RADIUS_PX)))
      dy = np.abs(py - cy)
      dx = np.abs(px - cx)
      d = np.hypot(np.minimum(dy, h - dy), np.minimum(dx, w - dx))
      u = np.clip((1 - d / radius) / _EDGE, 0, 1)
      alpha = rng.uniform(0.75, 1.0) * u * u * (3 - 2 * u)
      colour = np.clip(colours[rng.integers(len(colours))] + rng.normal(0, 0.05, 3), 0, 1)
      image += alpha[..., None] * (colour - image)
    base = worlds._to_uint8(np.clip(image, 0, 1))
    start = (int(rng.integers(h)), int(rng.integers(w)))
    return {'textures': [name], 'palette': name, 'base': base, 'start': start,
            'rotation': panorama.level_rotation(0.0, 0.0), 'position': np.zeros(3)}

  # -- trajectories ----------------------------------------------------------------------------
  def random_controls(self, rng, num_frames, *, trajectory=None, seed=None, rotation=None):
    """The panorama's trajectory process, quantised to whole pixels per frame: the camera's
    continuous path (pan and tilt times the focal length) is rounded to the pixel grid and the
    controls are the steps between rounded positions, over the focal length. float32 `[T, 5]`."""
    smooth = super().random_controls(rng, num_frames, trajectory=trajectory,
                                     rotation=panorama.level_rotation(0.0, 0.0))
    f = self.focal
    path = np.rint(np.cumsum(np.asarray(smooth[:, :2], np.float64) * f, axis=0))
    steps = np.diff(path, axis=0, prepend=0.0)
    controls = np.zeros((num_frames, 5), np.float32)
    controls[:, :2] = steps / f
    return controls

  # -- rendering -------------------------------------------------------------------------------
  def shifts(self, controls) -> np.ndarray:
    """Per-frame content shift `(dy, dx)`, int64 `[T, 2]` (`content_shift`)."""
    return content_shift(self._check_controls(controls), self.focal)

  def render_frames(self, controls, seed: int, start: int = 0,
                    stop: Optional[int] = None) -> np.ndarray:
    """Oracle frames `[start, stop)`: rolls of the scene's base image. uint8."""
    controls = self._check_controls(controls)
    stop = len(controls) if stop is None else stop
    scene = self._scene(seed)
    total = np.cumsum(self.shifts(controls[:stop]), axis=0) + np.asarray(scene['start'])
    return np.stack([roll(scene['base'], s) for s in total[start:stop]])

  def warp(self, frame: np.ndarray, controls, source: int, target: int) -> np.ndarray:
    """Frame `source` moved by the commanded motion to frame `target` (> source): exact."""
    moved = self.shifts(controls)[source + 1:target + 1].sum(0)
    return roll(frame, moved)

  # -- evaluation helpers ----------------------------------------------------------------------
  def visible_mask(self, controls, seed: int, start: int = 0, stop: Optional[int] = None,
                   window_frames: int = 0) -> np.ndarray:
    """All True: every frame holds only content of frame 0."""
    stop = len(controls) if stop is None else stop
    return np.ones((stop - start, self.config.height, self.config.width), bool)

  def image_shift(self, controls, stride: int = 1) -> np.ndarray:
    """Content shift `(dy, dx)` over `stride` frames, float64 `[T, 2]`, exact (rows < stride 0)."""
    per_frame = self.shifts(controls).astype(np.float64)
    total = np.cumsum(per_frame, axis=0)
    out = np.zeros_like(total)
    out[stride:] = total[stride:] - total[:-stride]
    return out

  def latent_shift(self, controls) -> np.ndarray:
    worlds.check_num_frames(len(controls))
    return self.image_shift(controls, 4)[::4]

  def motion_px(self, controls) -> np.ndarray:
    return np.linalg.norm(self.image_shift(controls, 1), axis=-1)

  def caption(self, seed, trajectory):
    motion = dict(zip(panorama.TRAJECTORIES, captions.PANORAMA_MOTIONS))[panorama.base_trajectory(trajectory)]
    return captions.panorama_caption(motion, self._scene(seed)['palette'])
