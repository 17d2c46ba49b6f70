"""Control conditioning for the DiT: per-pixel maps at latent resolution.

The DiT receives controls as extra input channels of each latent pixel (DESIGN.md, section 1):

* camera: per-pixel ray origin and direction of frame t in the camera frame of frame t-1
  (6 channels), from the relative controls of `worlds.CAMERA_CONTROLS`, normalised with fixed
  per-channel constants measured on the train trajectories; one definition,
  `apt2_jax.models.conditioning.camera_ray_maps`, serves data, training and inference;
* puppet: one Gaussian heatmap per keypoint plus a rendered skeleton map (16 channels);
* bouncing: no control (0 channels).

`latent_controls` groups the 4 video frames of each latent frame by concatenating their maps
along channels: latent frame 0 holds video frame 0 alone, repeated 4 times (as the causal VAE
pads frame 0), latent frame k >= 1 holds video frames 4k-3 .. 4k in order. So the DiT's control
channel count is `control_channels(world) = 4 * per-frame channels`: camera 24, puppet 64,
bouncing 0.
"""
from typing import Iterable

import numpy as np

from apt2_jax.data import worlds

TEMPORAL_STRIDE = 4
CAMERA_FOV_DEG = 60.0
# Measured over 200 default train trajectories (see tests/test_data.py, which re-checks them).
POSE_SIGMA = 0.04          # heatmap standard deviation, fraction of the map height

FRAME_CHANNELS = {'camera': 6, 'puppet': len(worlds.PUPPET_KEYPOINTS) + 1, 'bouncing': 0}

CONTROL_LIMITS = {
    # Per-frame bounds, inclusive: camera = relative controls (pan, tilt, zoom, forward, roll);
    # puppet = keypoint coordinates (fractions of the frame, a margin outside allowed).
    'camera': (-worlds.CAMERA_CONTROL_LIMITS, worlds.CAMERA_CONTROL_LIMITS),
    'puppet': (np.full(30, -0.5, np.float32), np.full(30, 1.5, np.float32)),
    'bouncing': (np.zeros(0, np.float32), np.zeros(0, np.float32)),
}


def control_channels(world_name: str, temporal_stride: int = TEMPORAL_STRIDE) -> int:
  """Channels of `latent_controls` for `world_name`: camera 24, puppet 64, bouncing 0."""
  return FRAME_CHANNELS[world_name] * temporal_stride


def control_names(world_name: str) -> tuple[str, ...]:
  if world_name == 'camera':
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


# ---------------------------------------------------------------------------------------------
# Camera
# ---------------------------------------------------------------------------------------------

def camera_ray_maps(relative_controls: np.ndarray, height: int, width: int,
                    fov_deg: float = CAMERA_FOV_DEG) -> np.ndarray:
  """Normalised ray origin and direction maps, float32 `[frames, height, width, 6]`.

  Channels 0-2: ray origin of frame t in frame t-1's camera frame, / `conditioning.RAY_ORIGIN_STD`;
  channels 3-5: unit ray direction of each pixel of frame t in frame t-1's camera frame (focal
  length scaled by exp(zoom)) minus the still camera's, / `conditioning.RAY_DIRECTION_STD`. A zero control
  (frame 0) gives zeros. Computed by `apt2_jax.models.conditioning.camera_ray_maps`.
  """
  controls = np.asarray(relative_controls, np.float32)
  if controls.ndim != 2 or controls.shape[1] != 5:
    raise ValueError(f'relative camera controls must be [frames, 5], got {controls.shape}')
  # One definition for data, training and inference: the model-side encoding.
  from apt2_jax.models import conditioning
  return np.asarray(conditioning.camera_ray_maps(controls, height, width, fov_deg), np.float32)


_KEY_STEP = {'pan': 0.04, 'tilt': 0.03, 'zoom': 0.02, 'forward': 0.05, 'roll': 0.03}
_KEYS = {
    'w': ('forward', 1), 's': ('forward', -1), 'a': ('pan', -1), 'd': ('pan', 1),
    'arrowup': ('tilt', 1), 'up': ('tilt', 1), 'arrowdown': ('tilt', -1), 'down': ('tilt', -1),
    'arrowleft': ('pan', -1), 'left': ('pan', -1), 'arrowright': ('pan', 1),
    'right': ('pan', 1), 'q': ('roll', -1), 'e': ('roll', 1), '+': ('zoom', 1),
    '=': ('zoom', 1), '-': ('zoom', -1),
}


def camera_control_from_keys(keys: Iterable[str]) -> np.ndarray:
  """Relative camera control float32 `[5]` for the keys held during one frame.

  W/S forward/back, A/D and left/right arrows pan, up/down arrows tilt, Q/E roll, +/- zoom;
  opposite keys cancel, unknown keys are ignored. No key gives the identity (zeros).
  """
  control = np.zeros(5, np.float32)
  for key in {k.lower() for k in keys}:
    if key in _KEYS:
      name, sign = _KEYS[key]
      control[worlds.CAMERA_CONTROLS.index(name)] += sign * _KEY_STEP[name]
  return control


# ---------------------------------------------------------------------------------------------
# Pose
# ---------------------------------------------------------------------------------------------

def pose_maps(keypoints: np.ndarray, height: int, width: int) -> np.ndarray:
  """Keypoint heatmaps and skeleton map, float32 `[frames, height, width, K + 1]` in [0, 1].

  `keypoints`: `[frames, K, 2]` (or flattened `[frames, 2K]`), (x, y) as fractions of the frame.
  Channel k < K: Gaussian of keypoint k (sigma `POSE_SIGMA` of the height, at least 0.5 pixel);
  channel K: the bones of `worlds.PUPPET_BONES` drawn as soft lines.
  """
  keypoints = np.asarray(keypoints, np.float64)
  keypoints = keypoints.reshape(len(keypoints), -1, 2)
  num_keypoints = keypoints.shape[1]
  sigma = max(POSE_SIGMA * height, 0.5)
  py, px = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing='ij')
  maps = np.zeros((len(keypoints), height, width, num_keypoints + 1), np.float32)
  for t, points in enumerate(keypoints * (width, height)):
    d2 = (px[..., None] - points[:, 0]) ** 2 + (py[..., None] - points[:, 1]) ** 2
    maps[t, ..., :num_keypoints] = np.exp(-0.5 * d2 / sigma ** 2)
    skeleton = np.zeros((height, width))
    for i, j in worlds.PUPPET_BONES:
      if max(i, j) >= num_keypoints:
        continue
      a, ab = points[i], points[j] - points[i]
      s = np.clip(((px - a[0]) * ab[0] + (py - a[1]) * ab[1]) / max(ab @ ab, 1e-9), 0, 1)
      d2 = (px - a[0] - s * ab[0]) ** 2 + (py - a[1] - s * ab[1]) ** 2
      skeleton = np.maximum(skeleton, np.exp(-0.5 * d2 / sigma ** 2))
    maps[t, ..., num_keypoints] = skeleton
  return maps


# ---------------------------------------------------------------------------------------------
# Latent grouping
# ---------------------------------------------------------------------------------------------

def latent_controls(per_frame_maps: np.ndarray,
                    temporal_stride: int = TEMPORAL_STRIDE) -> np.ndarray:
  """Groups per-frame maps `[T, h, w, C]` into latent frames `[1 + (T-1)//s, h, w, s * C]`.

  Latent frame 0 = video frame 0 repeated `s` times; latent frame k = video frames
  s(k-1)+1 .. sk concatenated in time order along channels.
  """
  maps = np.asarray(per_frame_maps)
  num_frames = maps.shape[0]
  if (num_frames - 1) % temporal_stride:
    raise ValueError(f'{num_frames} frames is not 1 + {temporal_stride}k')
  first = np.repeat(maps[:1], temporal_stride, axis=0)
  groups = np.concatenate([first, maps[1:]], axis=0)
  groups = groups.reshape(-1, temporal_stride, *maps.shape[1:])       # [F, s, h, w, C]
  groups = np.moveaxis(groups, 1, -2)                                  # [F, h, w, s, C]
  return groups.reshape(*groups.shape[:-2], temporal_stride * maps.shape[-1])


def control_maps(world_name: str, controls: np.ndarray, height: int, width: int,
                 temporal_stride: int = TEMPORAL_STRIDE) -> np.ndarray | None:
  """Latent-resolution control maps `[F, height, width, control_channels]`, None for bouncing.

  `height`, `width` are the latent resolution (video resolution / 8).
  """
  if world_name == 'camera':
    maps = camera_ray_maps(controls, height, width)
  elif world_name == 'puppet':
    maps = pose_maps(controls, height, width)
  else:
    return None
  return latent_controls(maps, temporal_stride)
