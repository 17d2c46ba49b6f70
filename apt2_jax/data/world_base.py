"""The worlds' shared pieces: seeds and splits, `WorldConfig`, the `World` base class and the
pinhole camera's geometry (relative controls, composition). `apt2_jax.data.worlds` holds the
worlds themselves and `make_world`; `apt2_jax.data.panorama` the testbed world.
"""
import dataclasses
import functools
from typing import Any

import numpy as np

from apt2_jax import controls as controls_lib
from apt2_jax.data import captions
from apt2_jax.data import textures

FPS = 24.0
SPLITS = ('train', 'validation', 'test')
_SPLIT_STRIDE = 1 << 28
SPLIT_SIZE = _SPLIT_STRIDE   # seeds per split


def split_seed(split: str, index: int) -> int:
  """Seed of example `index` of `split`; the seed ranges of the splits are disjoint."""
  if not 0 <= index < _SPLIT_STRIDE:
    raise ValueError(f'index {index} outside [0, {_SPLIT_STRIDE})')
  return SPLITS.index(split) * _SPLIT_STRIDE + int(index)


def seed_split(seed: int) -> str:
  """The split that `seed` belongs to (inverse of `split_seed`)."""
  return SPLITS[min(int(seed) // _SPLIT_STRIDE, len(SPLITS) - 1)]


def check_num_frames(num_frames: int) -> None:
  """Frame counts follow the causal VAE's rule 1 + 4k."""
  if num_frames < 1 or (num_frames - 1) % 4:
    raise ValueError(f'num_frames={num_frames} is not 1 + 4k')


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """Resolution, length, speed and trajectory statistics of a world.

  Angles are radians, rates are per video frame, lengths are in world units (the camera starts
  `altitude` above the ground). `speed` scales all motion.
  """
  height: int = 64
  width: int = 64
  num_frames: int = 33
  speed: float = 1.0
  texture_size: int = 0               # texels per tile side; 0: 2 x the larger frame side
  # Camera world.
  fov_deg: float = 60.0
  altitude: float = 1.5
  initial_tilt: float = 0.6           # optical axis off nadir at frame 0
  pan_std: float = 0.02
  tilt_std: float = 0.015
  zoom_std: float = 0.008             # log focal length
  forward_std: float = 0.02
  roll_std: float = 0.01
  smoothness: float = 0.9             # AR(1) correlation of successive controls
  altitude_range: tuple[float, float] = (0.5, 4.0)
  max_off_nadir: float = 1.0
  zoom_range: tuple[float, float] = (-0.7, 0.7)
  fog_distance: float = 6.0
  # Puppet world.
  figure_height: tuple[float, float] = (0.45, 0.65)
  # Bouncing world.
  num_objects: tuple[int, int] = (2, 5)
  gravity: float = 1.2                # frame heights per second squared
  # Panorama world (`apt2_jax.data.panorama`). Rates are radians per video frame of the optical
  # axis (x `speed`); at 64 px wide and 60 degrees, 1 px at the image centre is 1 / 55.4 rad.
  pano_rate: float = 0.027                                # median speed (1.5 px / frame at 64 px)
  pano_rate_range: tuple[float, float] = (0.011, 0.054)   # outside bursts (0.6 - 3 px)
  pano_burst_rate: tuple[float, float] = (0.072, 0.144)   # peak of a burst (4 - 8 px)
  pano_burst_fraction: float = 0.25   # probability that a clip's trajectory is 'bursty'
  pano_burst_period: int = 32         # a bursty trajectory has one burst per this many frames
  pano_burst_frames: tuple[int, int] = (8, 16)            # burst length range (video frames)
  pano_max_elevation_deg: float = 50.0  # optical axis elevation bound (reflected beyond)
  pano_max_roll_deg: float = 30.0     # horizon roll bound (pan reflected beyond)
  pano_num_blobs: int = 128
  pano_appearance: str = ''           # '' (by seed split: test = unseen), 'seen', 'unseen'

  def __post_init__(self):
    if self.texture_size == 0:
      object.__setattr__(self, 'texture_size', max(64, 2 * max(self.height, self.width)))
    check_num_frames(self.num_frames)
    for field in ('height', 'width'):
      value = getattr(self, field)
      if value < 8 or value % 8:
        raise ValueError(f'WorldConfig.{field}={value} must be a positive multiple of 8')
    if self.speed <= 0:
      raise ValueError(f'WorldConfig.speed={self.speed} must be positive')
    if not 0 <= self.smoothness < 1:
      raise ValueError(f'WorldConfig.smoothness={self.smoothness} must be in [0, 1)')
    lo, hi = self.num_objects
    if not 1 <= lo <= hi <= 5:
      raise ValueError(f'WorldConfig.num_objects={self.num_objects} must satisfy 1<=lo<=hi<=5')
    if self.pano_appearance not in ('', 'seen', 'unseen'):
      raise ValueError(f"WorldConfig.pano_appearance={self.pano_appearance!r}: expected '', "
                       "'seen' or 'unseen'")
    if not 0 <= self.pano_burst_fraction <= 1:
      raise ValueError(f'WorldConfig.pano_burst_fraction={self.pano_burst_fraction} must be in '
                       '[0, 1]')
    lo, hi = self.pano_burst_frames
    if not 1 <= lo <= hi <= self.pano_burst_period:
      raise ValueError(f'WorldConfig.pano_burst_frames={self.pano_burst_frames} must satisfy '
                       f'1 <= lo <= hi <= pano_burst_period={self.pano_burst_period}')


def _to_uint8(image: np.ndarray) -> np.ndarray:
  return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def _colour_by_name(name: str) -> np.ndarray:
  return np.array({
      'red': (0.85, 0.15, 0.15), 'green': (0.2, 0.75, 0.25), 'blue': (0.2, 0.35, 0.9),
      'yellow': (0.95, 0.85, 0.2), 'purple': (0.6, 0.25, 0.8), 'orange': (1.0, 0.55, 0.1),
      'white': (0.95, 0.95, 0.95), 'black': (0.1, 0.1, 0.1)}[name])


class World:
  """Base class: seeded scene + oracle `render` + trajectory sampler."""
  name: str = ''
  control_dim: int = 0
  trajectory_pools: dict[str, tuple[str, ...]] = {}

  def __init__(self, config: WorldConfig | None = None, seed: int = 0):
    self.config = config or WorldConfig()
    self.seed = int(seed)

  # -- to override ---------------------------------------------------------------------------
  def scene(self, seed: int) -> dict[str, Any]:
    raise NotImplementedError

  def render(self, controls: np.ndarray, seed: int) -> np.ndarray:
    """Oracle: uint8 `[frames, height, width, 3]` for `controls` `[frames, control_dim]`."""
    raise NotImplementedError

  def random_controls(self, rng: np.random.Generator, num_frames: int, *,
                      trajectory: str | None = None, seed: int | None = None) -> np.ndarray:
    """A new trajectory, float32 `[num_frames, control_dim]`.

    `trajectory` defaults to a random type from the pool of `seed`'s split (the train pool when
    `seed` is None); `seed` ties the trajectory to that world's scene (the camera's start pose,
    the puppet's body), so that long videos can continue a world with fresh controls.
    """
    raise NotImplementedError

  def caption(self, seed: int, trajectory: str) -> str:
    raise NotImplementedError

  # -- shared --------------------------------------------------------------------------------
  def _scene(self, seed: int) -> dict[str, Any]:
    return _cached_scene(type(self), self.config, int(seed))

  def _pick_trajectory(self, rng: np.random.Generator, seed: int | None) -> str:
    pool = self.trajectory_pools[seed_split(seed) if seed is not None else 'train']
    return str(pool[rng.integers(len(pool))])

  def sample(self, seed: int | None = None, num_frames: int | None = None) -> dict[str, Any]:
    """Draws a trajectory for the world of `seed` and renders it (see module docstring)."""
    seed = self.seed if seed is None else int(seed)
    num_frames = num_frames or self.config.num_frames
    check_num_frames(num_frames)
    rng = np.random.default_rng([seed, 1])
    trajectory = self._pick_trajectory(rng, seed)
    controls = self.random_controls(rng, num_frames, trajectory=trajectory, seed=seed)
    controls = np.asarray(controls, np.float32)
    video = self.render(controls, seed)
    caption = self.caption(seed, trajectory)
    example = {
        'video': video,
        'controls': controls,
        'first_frame': video[0],
        'caption': caption,
        'caption_id': captions.caption_id(caption),
        'text_tokens': captions.tokenize(caption),
        'seed': seed,
        'textures': ','.join(self._scene(seed)['textures']),
        'trajectory': trajectory,
    }
    return example



@functools.lru_cache(maxsize=16)
def _cached_scene(cls: type, config: WorldConfig, seed: int) -> dict[str, Any]:
  return cls(config).scene(seed)


def _pick_textures(rng: np.random.Generator, seed: int, count: int) -> list[str]:
  pool = textures.TEXTURE_POOLS[seed_split(seed)]
  return [str(n) for n in rng.choice(pool, size=count, replace=False)]



# =============================================================================================
# Pinhole camera geometry (camera and panorama worlds)
# =============================================================================================

CAMERA_CONTROLS = controls_lib.CAMERA_CONTROLS  # ('pan', 'tilt', 'zoom', 'forward', 'roll')
"""Relative camera control of frame t, in the camera frame of frame t-1 (x right, y down, z along
the optical axis):

* pan: rotation about the camera's y axis (radians; positive turns right),
* tilt: rotation about the camera's x axis (radians; positive tilts up),
* zoom: change of log focal length (positive zooms in),
* forward: translation along frame t's optical axis (world units; negative moves back),
* roll: rotation about the optical axis (radians).

Composition: `R_t = R_{t-1} Ry(pan) Rx(tilt) Rz(roll)`, `p_t = p_{t-1} + forward * R_t[:, 2]`,
`log_f_t = log_f_{t-1} + zoom`. Frame 0's control is all zeros (identity).
"""

# Per-frame bounds of the relative camera controls (`apt2_jax.controls.CAMERA_LIMITS`:
# 0.15, 0.15, 0.1, 0.25, 0.15); also the outlier threshold of the sampler.
CAMERA_CONTROL_LIMITS = controls_lib.CAMERA_LIMITS


def _rx(a):
  c, s = np.cos(a), np.sin(a)
  return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _ry(a):
  c, s = np.cos(a), np.sin(a)
  return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rz(a):
  c, s = np.cos(a), np.sin(a)
  return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def relative_rotation(pan: float, tilt: float, roll: float) -> np.ndarray:
  """`Ry(pan) Rx(tilt) Rz(roll)`, float64 [3, 3]."""
  return _ry(pan) @ _rx(tilt) @ _rz(roll)


def initial_rotation(yaw: float, off_nadir: float) -> np.ndarray:
  """Camera-to-world rotation of a camera heading `yaw`, tilted `off_nadir` up from nadir."""
  x_axis = np.array([np.cos(yaw), np.sin(yaw), 0.0])
  z_axis = np.array([0.0, 0.0, -1.0])
  nadir = np.stack([x_axis, np.cross(z_axis, x_axis), z_axis], axis=1)
  return nadir @ _rx(-off_nadir)


def compose_camera(relative_controls: np.ndarray, initial_rotation: np.ndarray,
                   initial_position: np.ndarray, initial_log_focal: float = 0.0):
  """Composes relative controls `[T, 5]` into absolute poses.

  Returns rotations float64 `[T, 3, 3]` (camera to world), positions `[T, 3]`, log focal `[T]`.
  """
  controls = np.asarray(relative_controls, np.float64)
  rotation = np.asarray(initial_rotation, np.float64)
  position = np.asarray(initial_position, np.float64)
  log_focal = float(initial_log_focal)
  rotations, positions, log_focals = [], [], []
  for pan, tilt, zoom, forward, roll in controls:
    rotation = rotation @ relative_rotation(pan, tilt, roll)
    position = position + forward * rotation[:, 2]
    log_focal = log_focal + zoom
    rotations.append(rotation)
    positions.append(position)
    log_focals.append(log_focal)
  return np.stack(rotations), np.stack(positions), np.array(log_focals)


def relative_from_absolute(rotations: np.ndarray, positions: np.ndarray,
                           log_focals: np.ndarray) -> np.ndarray:
  """Inverse of `compose_camera`: relative controls float64 `[T, 5]` (row 0 = zeros)."""
  controls = np.zeros((len(rotations), 5))
  for t in range(1, len(rotations)):
    r = rotations[t - 1].T @ rotations[t]
    tilt = np.arcsin(np.clip(-r[1, 2], -1, 1))
    pan = np.arctan2(r[0, 2], r[2, 2])
    roll = np.arctan2(r[1, 0], r[1, 1])
    forward = rotations[t][:, 2] @ (positions[t] - positions[t - 1])
    controls[t] = (pan, tilt, log_focals[t] - log_focals[t - 1], forward, roll)
  return controls


