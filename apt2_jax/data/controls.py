"""Bounds and names of the worlds' per-frame controls, and their validation.

The encoding of controls into the DiT's control channels (camera rays, keypoint maps, the key
bindings) is `apt2_jax.controls`; the data pipeline yields raw controls only.
"""
import numpy as np

from apt2_jax.data import worlds

CONTROL_LIMITS = {
    # Per-frame bounds, inclusive: camera = relative controls (pan, tilt, zoom, forward, roll);
    # puppet = keypoint coordinates (fractions of the frame, a margin outside allowed).
    'camera': (-worlds.CAMERA_CONTROL_LIMITS, worlds.CAMERA_CONTROL_LIMITS),
    'puppet': (np.full(2 * len(worlds.PUPPET_KEYPOINTS), -0.5, np.float32),
               np.full(2 * len(worlds.PUPPET_KEYPOINTS), 1.5, np.float32)),
    'bouncing': (np.zeros(0, np.float32), np.zeros(0, np.float32)),
}
CONTROL_LIMITS['panorama'] = CONTROL_LIMITS['torus'] = CONTROL_LIMITS['camera']   # camera controls (only pan and tilt move)


def control_names(world_name: str) -> tuple[str, ...]:
  """Names of the `D` control columns of `world_name` (camera/panorama 5, puppet 30, bouncing 0)."""
  if world_name in ('camera', 'panorama', 'torus'):
    return worlds.CAMERA_CONTROLS
  if world_name == 'puppet':
    return tuple(f'{k}.{a}' for k in worlds.PUPPET_KEYPOINTS for a in 'xy')
  return ()


def validate_controls(controls: np.ndarray, world_name: str) -> np.ndarray:
  """Checks `controls` `[frames, D]` against `CONTROL_LIMITS`; returns them as float32.

  Raises ValueError naming the first bad entry, e.g. `controls[3, 1] (tilt) = 0.5 outside ...`.
  """
  controls = np.asarray(controls, np.float32)
  lo, hi = CONTROL_LIMITS[world_name]
  if controls.ndim != 2 or controls.shape[1] != lo.shape[0]:
    raise ValueError(f'{world_name} controls must be [frames, {lo.shape[0]}], '
                     f'got {controls.shape}')
  bad = ~np.isfinite(controls) | (controls < lo) | (controls > hi)
  if bad.any():
    t, d = np.argwhere(bad)[0]
    raise ValueError(f'controls[{t}, {d}] ({control_names(world_name)[d]}) = {controls[t, d]} '
                     f'outside [{lo[d]}, {hi[d]}]')
  return controls
