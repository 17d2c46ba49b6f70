"""The testbed world: a pinhole camera panning and tilting inside a procedural spherical panorama.

`make_world('panorama', config)` (`WORLD_NAMES`); control type "camera", control_dim 5. Every
pixel is a pure function of its world ray direction, so the oracle frame of any pose is exact
and nothing is ever occluded or revealed by parallax: what the model must invent is only the
part of the sphere that has not been in view.

Camera (the camera world's conventions, `worlds.CAMERA_CONTROLS`, `worlds.compose_camera`):
60-degree horizontal field of view, per-video-frame relative controls (pan, tilt, zoom, forward,
roll) of which only pan and tilt move (zoom = forward = roll = 0; frame 0's control is zeros).
`R_t = R_{t-1} Ry(pan) Rx(tilt)`; positive pan turns right (the image content moves left),
positive tilt looks up (the content moves down). World axes: z up. Rotations are camera to world
(columns: camera x right, y down, z forward); the camera sits at the origin.

Scene (per seed): a vertical gradient between two palette colours plus three soft dipole tints,
under `pano_num_blobs` (128) soft round blobs uniformly spread over the sphere, angular radius
0.06 - 0.3 rad (3 - 17 px at 64 px: the scale of the 8 px tokens), a flat core and a smooth edge,
composited in a fixed order. Colours come from one palette:
  seen   (train, validation): sunset, meadow, ocean, desert: mid-bright, moderately saturated.
  unseen (test split, or `WorldConfig.pano_appearance='unseen'`): neon, aurora: saturated blobs
         on near-black skies. The appearance shifts, the motion statistics do not.

Trajectories (`random_controls`): the optical axis moves every frame (no hovering) at a speed
that follows a log-normal AR(1) process around `pano_rate` (0.027 rad = 1.5 px / frame at 64 px),
clipped to `pano_rate_range` (0.6 - 3 px), along a heading that turns smoothly (AR(1) turn rate).
The elevation of the optical axis stays within `pano_max_elevation_deg` (50; below 60 including
one step) and the horizon roll (which pans at non-zero elevation accumulate) within
`pano_max_roll_deg` (30): a step that would leave them is reflected. Trajectory types:
  'wander'  no bursts;
  'bursty'  every `pano_burst_period` (32) video frames hold one burst of 8 - 16 frames whose
            speed ramps (3 frames) to a peak of `pano_burst_rate` (4 - 8 px / frame, below the
            0.15 rad control limit).
`sample()` picks 'bursty' with probability `pano_burst_fraction` (0.25). Random draws are made
segment by segment, so a shorter trajectory is a prefix of a longer one from the same rng.

Tethered trajectories (evaluation only; `TETHERED_TRAJECTORIES`, never drawn by `sample()`):
  'wander_tethered', 'bursty_tethered'  the same process and the same random draws as 'wander' /
            'bursty' (speed, turn-rate AR(1), bursts, bounds), except that whenever the optical
            axis is more than `TETHER_LEASH_DEG` (30 degrees: half the 60-degree field of view) from
            frame 0's, the heading turns toward frame 0's view by at most `TETHER_TURN` (0.1 rad)
            per frame instead of by the AR(1) turn (stationary std 0.06 rad per frame; its
            magnitude exceeds 0.1 in ~11% of training frames). So the camera keeps coming back to
            the start view and frame 0's content (what a model that is given only frame 0 can
            know) stays in view over a long rollout, while the speed of every frame and the bursts
            are exactly the untethered trajectory's. Measured at 30 s, 24 fps, on 32 validation
            worlds (1 in 4 bursty): frame 0's region covers 43% of the pixels on average and 5% or
            more in 95% of the frames (untethered: 14% and 38%; half the untethered walks have
            lost it after 1.8 s); per latent step the commanded motion has a median / 95th
            percentile of 5.8 / 10.0 px (wander) and 8.0 / 29.4 px (bursty), untethered 5.8 / 9.9
            and 8.0 / 29.0, training clips 5.9 / 10.5 and 7.8 / 27.7. The steering shows in the
            heading's turn per frame: median 0.10 rad (training 0.04), 95th percentile 0.11 (0.12 -
            0.14).
  The caption is the base trajectory's.

Helpers for the evaluation (all exact, from the poses):
  poses(controls, seed)        (rotations [T, 3, 3], positions [T, 3] = 0, log focal [T] = 0)
  render_frames(controls, seed, start, stop)   uint8 [stop - start, H, W, 3] (chunked oracle)
  visible_mask(controls, seed, start, stop, window_frames)   bool [stop - start, H, W]
  known_mask(controls, seed, start, stop)   bool: the pixels whose ray lies inside frame 0's image
                                 (`visible_mask` with window_frames = 0)
  image_shift(controls, stride)  float [T, 2] (dy, dx) px that the content at the image centre
                                 moves (`evaluation.metrics.phase_correlation`'s convention)
  latent_shift(controls)         float [F, 2] the same per latent step (frame 4j-4 -> 4j)
  motion_px(controls)            float [T] |image_shift| per video frame
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from apt2_jax.data import captions
from apt2_jax.data import world_base as worlds

TRAJECTORIES = ('wander', 'bursty')
# Evaluation-only variants, steered back toward the start view (module docstring).
TETHERED_TRAJECTORIES = ('wander_tethered', 'bursty_tethered')
TETHER_LEASH_DEG = 30.0        # the leash: half the field of view
TETHER_TURN = 0.1              # radians per frame: the largest heading turn toward the start view
APPEARANCES = {'seen': ('sunset', 'meadow', 'ocean', 'desert'), 'unseen': ('neon', 'aurora')}
# name -> (sky top, sky bottom, blob colours), RGB in [0, 1].
PALETTES = {
    'sunset': ((0.95, 0.62, 0.38), (0.36, 0.22, 0.36),
               ((0.90, 0.40, 0.20), (0.95, 0.76, 0.32), (0.62, 0.26, 0.46), (0.32, 0.22, 0.52),
                (0.98, 0.90, 0.70))),
    'meadow': ((0.66, 0.80, 0.94), (0.30, 0.44, 0.22),
               ((0.36, 0.60, 0.26), (0.82, 0.76, 0.32), (0.56, 0.36, 0.22), (0.90, 0.90, 0.80),
                (0.22, 0.36, 0.26))),
    'ocean': ((0.56, 0.76, 0.90), (0.08, 0.22, 0.36),
              ((0.12, 0.46, 0.60), (0.32, 0.70, 0.70), (0.85, 0.90, 0.90), (0.16, 0.26, 0.50),
               (0.90, 0.80, 0.60))),
    'desert': ((0.86, 0.80, 0.70), (0.55, 0.40, 0.26),
               ((0.80, 0.60, 0.36), (0.60, 0.36, 0.20), (0.95, 0.85, 0.60), (0.40, 0.30, 0.26),
                (0.70, 0.50, 0.46))),
    'neon': ((0.10, 0.03, 0.16), (0.02, 0.02, 0.05),
             ((1.00, 0.10, 0.80), (0.10, 1.00, 0.90), (0.60, 1.00, 0.10), (0.20, 0.30, 1.00),
              (1.00, 0.90, 0.10))),
    'aurora': ((0.03, 0.09, 0.13), (0.00, 0.02, 0.04),
               ((0.10, 1.00, 0.50), (0.50, 0.20, 1.00), (0.00, 0.80, 1.00), (1.00, 0.20, 0.50),
                (0.80, 1.00, 0.20))),
}
assert tuple(PALETTES) == captions.PANORAMA_PALETTES
_MOTION_WORDS = dict(zip(TRAJECTORIES, captions.PANORAMA_MOTIONS))


def base_trajectory(trajectory: str) -> str:
  """The training trajectory type of a (possibly tethered) trajectory name."""
  return trajectory[:-len('_tethered')] if trajectory in TETHERED_TRAJECTORIES else trajectory


_BLOB_RADIUS = (0.06, 0.3)     # angular radius range (log-uniform), radians
_BLOB_EDGE = 0.5               # outer fraction of the radius over which a blob fades out
_START_ELEVATION = 0.35        # |elevation| of frame 0's optical axis at most (radians)
_SPEED_SIGMA, _SPEED_RHO = 0.35, 0.95    # log-speed AR(1)
_TURN_SIGMA, _TURN_RHO = 0.06, 0.9       # heading turn rate AR(1), radians per frame
_BURST_RAMP = 3                # frames to ramp into and out of a burst
_RATE_CAP = 0.97               # x the pan / tilt control limit: the largest angular speed


def level_rotation(yaw: float, elevation: float) -> np.ndarray:
  """Camera-to-world rotation of a level camera (horizon roll 0), float64 [3, 3]."""
  forward = np.array([np.cos(elevation) * np.cos(yaw), np.cos(elevation) * np.sin(yaw),
                      np.sin(elevation)])
  right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
  down = np.cross(forward, right)
  return np.stack([right, down, forward], axis=1)


def elevation(rotations: np.ndarray) -> np.ndarray:
  """Elevation of the optical axis above the horizon, radians, `[...]` from `[..., 3, 3]`."""
  return np.arcsin(np.clip(np.asarray(rotations)[..., 2, 2], -1, 1))


def horizon_roll(rotations: np.ndarray) -> np.ndarray:
  """Angle of the camera's x axis above the horizontal plane, radians, `[...]`."""
  return np.arcsin(np.clip(np.asarray(rotations)[..., 2, 0], -1, 1))


def focal_px(width: int, fov_deg: float = 60.0) -> float:
  """Focal length in pixels of the still camera (horizontal field of view `fov_deg`)."""
  return 0.5 * width / np.tan(np.deg2rad(fov_deg) / 2)


def _relative_rotations(controls: np.ndarray) -> np.ndarray:
  """`Ry(pan) Rx(tilt) Rz(roll)` per frame, float64 [T, 3, 3]."""
  c = np.asarray(controls, np.float64)
  return np.stack([worlds.relative_rotation(p, t, r) for p, t, r in c[:, [0, 1, 4]]])


def image_shift(controls: np.ndarray, stride: int = 1, width: int = 64,
                fov_deg: float = 60.0) -> np.ndarray:
  """Commanded image translation `(dy, dx)` in pixels, float64 `[T, 2]`.

  Row t: where the world point at the centre of frame t - stride appears in frame t, relative to
  the centre (y down, x right: a pan right gives dx < 0, a tilt up dy > 0), i.e. the content
  moves by (dy, dx) as in `phase_correlation(frame[t - stride], frame[t])`. Exact from the
  relative rotations (the start pose does not matter); rows t < stride are zeros.
  """
  rel = _relative_rotations(controls)
  out = np.zeros((len(rel), 2))
  f = focal_px(width, fov_deg)
  for t in range(stride, len(rel)):
    r = np.eye(3)
    for s in range(t - stride + 1, t + 1):
      r = r @ rel[s]                       # R_{t-stride}^T R_t
    v = r.T[:, 2]                          # R_t^T R_{t-stride} e_z
    out[t] = f * v[1::-1] / v[2]
  return out


def latent_shift(controls: np.ndarray, width: int = 64, fov_deg: float = 60.0) -> np.ndarray:
  """`image_shift` per latent step, float64 `[F, 2]`: row j >= 1 from video frame 4j-4 to 4j."""
  worlds.check_num_frames(len(controls))
  return image_shift(controls, 4, width, fov_deg)[::4]


def motion_px(controls: np.ndarray, width: int = 64, fov_deg: float = 60.0) -> np.ndarray:
  """Image speed at the centre, pixels per video frame, float64 `[T]` (row 0 zero)."""
  return np.linalg.norm(image_shift(controls, 1, width, fov_deg), axis=-1)


class PanoramaWorld(worlds.World):
  """See the module docstring."""
  name = 'panorama'
  control_dim = 5
  trajectory_pools = {'train': TRAJECTORIES, 'validation': TRAJECTORIES, 'test': TRAJECTORIES}

  # -- scene -----------------------------------------------------------------------------------
  def appearance(self, seed: int) -> str:
    """'seen' or 'unseen': `config.pano_appearance`, else by split (test = unseen)."""
    if self.config.pano_appearance:
      return self.config.pano_appearance
    return 'unseen' if worlds.seed_split(seed) == 'test' else 'seen'

  def scene(self, seed):
    cfg = self.config
    rng = np.random.default_rng([seed, 0])
    pool = APPEARANCES[self.appearance(seed)]
    name = str(pool[rng.integers(len(pool))])
    top, bottom, colours = (np.asarray(c, np.float64) for c in PALETTES[name])
    k = cfg.pano_num_blobs
    centres = rng.normal(size=(k, 3))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    radius = np.exp(rng.uniform(*np.log(_BLOB_RADIUS), k))
    blob_colours = np.clip(colours[rng.integers(len(colours), size=k)]
                           + rng.normal(0, 0.05, (k, 3)), 0, 1)
    tint_dirs = rng.normal(size=(3, 3))
    tint_dirs /= np.linalg.norm(tint_dirs, axis=1, keepdims=True)
    f32 = lambda x: np.asarray(x, np.float32)
    return {
        'textures': [name],
        'palette': name,
        'rotation': level_rotation(rng.uniform(-np.pi, np.pi),
                                   rng.uniform(-_START_ELEVATION, _START_ELEVATION)),
        'position': np.zeros(3),
        'sky': (f32(top)[:, None], f32(bottom)[:, None]),                 # [3, 1] each
        'tints': (f32(tint_dirs), f32(rng.normal(0, 0.06, (3, 3)))),      # directions, RGB
        'centres': centres,                                                # float64 [K, 3]
        'centres32': f32(centres),
        'radius': radius,
        'inv_rim': f32(1 / (1 - np.cos(radius))),
        'colours': f32(blob_colours)[:, :, None],                          # [K, 3, 1]
        'opacity': f32(rng.uniform(0.75, 1.0, k)),
    }

  # -- camera ----------------------------------------------------------------------------------
  @property
  def focal(self) -> float:
    return focal_px(self.config.width, self.config.fov_deg)

  def poses(self, controls: np.ndarray, seed: int):
    """(rotations [T, 3, 3], positions [T, 3] zeros, log focal [T] zeros), float64, from the
    start pose of `seed` (`worlds.compose_camera`)."""
    scene = self._scene(seed)
    return worlds.compose_camera(controls, scene['rotation'], scene['position'], 0.0)

  @functools.cached_property
  def _unit_rays(self) -> np.ndarray:
    """Unit camera-frame rays of the pixel centres, float64 [H * W, 3]."""
    h, w = self.config.height, self.config.width
    y, x = np.meshgrid(np.arange(h) + 0.5 - h / 2, np.arange(w) + 0.5 - w / 2, indexing='ij')
    rays = np.stack([x / self.focal, y / self.focal, np.ones_like(x)], -1).reshape(-1, 3)
    return rays / np.linalg.norm(rays, axis=1, keepdims=True)

  # -- rendering -------------------------------------------------------------------------------
  def shade(self, directions: np.ndarray, seed: int) -> np.ndarray:
    """Panorama colour of unit world directions `[N, 3]`: float32 `[N, 3]` in [0, 1]."""
    d = np.asarray(directions, np.float32).T
    return self._shade(self._scene(seed), d, None).T

  def _shade(self, scene, d: np.ndarray, axis: Optional[np.ndarray]) -> np.ndarray:
    """Colours `[3, N]` of directions `d` `[3, N]` (float32, channels first: 3-8x faster);
    `axis`: the optical axis, to skip the blobs that cannot reach the frame."""
    top, bottom = scene['sky']
    image = bottom + (top - bottom) * (0.5 + 0.5 * d[2])
    tint_dirs, tint_rgb = scene['tints']
    image += tint_rgb.T @ (tint_dirs @ d)
    centres = scene['centres']
    if axis is not None:  # blobs whose (compact) support can touch the frame
      h, w = self.config.height, self.config.width
      half_diagonal = np.arctan(np.hypot(h, w) / 2 / self.focal)
      reach = np.minimum(half_diagonal + scene['radius'] + 1e-3, np.pi)
      keep = np.nonzero(centres @ axis > np.cos(reach))[0]
    else:
      keep = np.arange(len(centres))
    if len(keep):  # "over" compositing, in blob order
      # q = 1 - cos(angle to the centre), relative to the rim's: 1 at the rim, flat core below
      # (1 - _BLOB_EDGE)^2, a smoothstep between.
      q = (1 - scene['centres32'][keep] @ d) * scene['inv_rim'][keep, None]
      u = np.clip((1 - q) * np.float32(1 / (1 - (1 - _BLOB_EDGE) ** 2)), 0, 1)
      alpha = scene['opacity'][keep, None] * u * u * (3 - 2 * u)
      for a, colour in zip(alpha, scene['colours'][keep]):
        image += a * (colour - image)
    return np.clip(image, 0, 1)

  def render_rotations(self, rotations: np.ndarray, seed: int) -> np.ndarray:
    """Oracle frames of camera-to-world rotations `[T, 3, 3]`: uint8 `[T, H, W, 3]`."""
    scene = self._scene(seed)
    h, w = self.config.height, self.config.width
    rays = self._unit_rays.T                                            # [3, H * W]
    frames = [self._shade(scene, (r @ rays).astype(np.float32), r[:, 2])
              for r in np.asarray(rotations, np.float64)]
    video = np.stack(frames).transpose(0, 2, 1).reshape(-1, h, w, 3)
    return np.clip(np.round(video * 255), 0, 255).astype(np.uint8)

  def _check_controls(self, controls) -> np.ndarray:
    controls = np.asarray(controls, np.float32)
    if controls.ndim != 2 or controls.shape[1] != 5:
      raise ValueError(f'panorama controls must be [frames, 5], got {controls.shape}')
    return controls

  def render(self, controls, seed):
    return self.render_frames(controls, seed)

  def render_frames(self, controls, seed: int, start: int = 0,
                    stop: Optional[int] = None) -> np.ndarray:
    """Oracle frames `[start, stop)` of `controls` (poses composed from frame 0): uint8."""
    controls = self._check_controls(controls)
    stop = len(controls) if stop is None else stop
    rotations, _, _ = self.poses(controls[:stop], seed)
    return self.render_rotations(rotations[start:stop], seed)

  # -- evaluation helpers ----------------------------------------------------------------------
  def visible_mask(self, controls, seed: int, start: int = 0, stop: Optional[int] = None,
                   window_frames: int = 0) -> np.ndarray:
    """Pixels of frames `[start, stop)` seen recently: bool `[stop - start, H, W]`.

    A pixel of frame t counts when its ray direction lay inside the image of frame 0 (the sink)
    or of any of the `window_frames` video frames before t (frames max(1, t - window_frames) ..
    t - 1); frame 0 is all True. Exact: the ray is projected into each earlier camera and tested
    against its bounds. A still camera gives all True. Independent of the start pose.
    `window_frames = 0`: exactly the pixels whose ray lies inside frame 0's image (`known_mask`).
    """
    controls = self._check_controls(controls)
    stop = len(controls) if stop is None else stop
    rotations, _, _ = self.poses(controls[:stop], seed)
    h, w = self.config.height, self.config.width
    rays, f = self._unit_rays, self.focal
    out = np.zeros((stop - start, h * w), bool)
    for i, t in enumerate(range(start, stop)):
      seen = out[i]
      earlier = range(t - 1, max(1, t - window_frames) - 1, -1)     # most overlap first
      for s in (0, *earlier):
        cam = rays @ (rotations[t].T @ rotations[s])     # frame t's rays in camera s
        z = cam[:, 2]
        with np.errstate(divide='ignore', invalid='ignore'):
          inside = ((z > 1e-9) & (np.abs(f * cam[:, 0] / z) <= w / 2)
                    & (np.abs(f * cam[:, 1] / z) <= h / 2))
        seen |= inside
        if seen.all():
          break
    return out.reshape(-1, h, w)

  def known_mask(self, controls, seed: int, start: int = 0,
                 stop: Optional[int] = None) -> np.ndarray:
    """The pixels of frames `[start, stop)` whose ray lies inside frame 0's image (the content a
    model given only frame 0 can know): bool `[stop - start, H, W]`; `visible_mask` with
    `window_frames = 0`."""
    return self.visible_mask(controls, seed, start, stop, window_frames=0)

  def image_shift(self, controls, stride: int = 1) -> np.ndarray:
    """`image_shift` at this world's resolution and field of view, float64 `[T, 2]`."""
    return image_shift(controls, stride, self.config.width, self.config.fov_deg)

  def latent_shift(self, controls) -> np.ndarray:
    return latent_shift(controls, self.config.width, self.config.fov_deg)

  def motion_px(self, controls) -> np.ndarray:
    return motion_px(controls, self.config.width, self.config.fov_deg)

  # -- trajectories ----------------------------------------------------------------------------
  def _pick_trajectory(self, rng, seed):
    return 'bursty' if rng.random() < self.config.pano_burst_fraction else 'wander'

  def random_controls(self, rng, num_frames, *, trajectory=None, seed=None,
                      rotation: Optional[np.ndarray] = None):
    """Controls float32 `[num_frames, 5]` (pan, tilt; zoom = forward = roll = 0; row 0 zeros).

    Starts from `rotation` (camera to world) if given, else from the start pose of `seed`, else
    from a level camera facing +x; the elevation and roll bounds are enforced from there.
    `trajectory` may also be one of `TETHERED_TRAJECTORIES` (evaluation only, see the module
    docstring): the same draws, steered back toward the start view beyond the leash.
    """
    cfg = self.config
    trajectory = trajectory or self._pick_trajectory(rng, seed)
    if trajectory not in TRAJECTORIES + TETHERED_TRAJECTORIES:
      raise ValueError(f'unknown panorama trajectory {trajectory!r}; expected one of '
                       f'{TRAJECTORIES + TETHERED_TRAJECTORIES}')
    tethered = trajectory in TETHERED_TRAJECTORIES
    trajectory = base_trajectory(trajectory)
    if rotation is None:
      rotation = self._scene(seed)['rotation'] if seed is not None else level_rotation(0.0, 0.0)
    r = np.asarray(rotation, np.float64)
    home = r[:, 2].copy()                                   # frame 0's optical axis (world)
    cos_leash = np.cos(np.deg2rad(TETHER_LEASH_DEG))
    cap = _RATE_CAP * float(min(worlds.CAMERA_CONTROL_LIMITS[:2]))
    lo, hi = (min(cfg.speed * v, cap) for v in cfg.pano_rate_range)
    log_median = np.log(cfg.speed * cfg.pano_rate)
    max_el, max_roll = np.deg2rad(cfg.pano_max_elevation_deg), np.deg2rad(cfg.pano_max_roll_deg)
    period = cfg.pano_burst_period
    log_speed = log_median + _SPEED_SIGMA * rng.normal()
    heading, turn = rng.uniform(0, 2 * np.pi), _TURN_SIGMA * rng.normal()
    controls = np.zeros((num_frames, 5))
    t = 1
    while t < num_frames:
      eps = rng.normal(size=(period, 2))                  # a fixed number of draws per segment
      length = int(rng.integers(cfg.pano_burst_frames[0], cfg.pano_burst_frames[1] + 1))
      onset = int(rng.integers(0, period - length + 1))
      peak = min(cfg.speed * rng.uniform(*cfg.pano_burst_rate), cap)
      for k in range(period):
        if t >= num_frames:
          break
        log_speed = (log_median + _SPEED_RHO * (log_speed - log_median)
                     + np.sqrt(1 - _SPEED_RHO ** 2) * _SPEED_SIGMA * eps[k, 0])
        turn = _TURN_RHO * turn + np.sqrt(1 - _TURN_RHO ** 2) * _TURN_SIGMA * eps[k, 1]
        if tethered and r[:, 2] @ home < cos_leash:  # beyond the leash: turn toward the start view
          c = r.T @ home                    # in camera coordinates (x right, y down)
          want = np.arctan2(-c[1], c[0])    # (pan, tilt) direction: pan turns right, tilt looks up
          heading += float(np.clip((want - heading + np.pi) % (2 * np.pi) - np.pi,
                                   -TETHER_TURN, TETHER_TURN))
        else:
          heading += turn
        speed = float(np.clip(np.exp(log_speed), lo, hi))
        if trajectory == 'bursty' and onset <= k < onset + length:
          ramp = min(k - onset + 1, onset + length - k) / _BURST_RAMP
          speed += min(ramp, 1.0) * (peak - speed)
        move = speed * np.array([np.cos(heading), np.sin(heading)])
        move = _steer(r, move, max_el, max_roll)
        heading = float(np.arctan2(move[1], move[0]))
        r = r @ worlds.relative_rotation(move[0], move[1], 0.0)
        controls[t, :2] = move
        t += 1
    return controls.astype(np.float32)

  def caption(self, seed, trajectory):
    return captions.panorama_caption(_MOTION_WORDS[base_trajectory(trajectory)],
                                     self._scene(seed)['palette'])

  def sample(self, seed=None, num_frames=None):
    """`World.sample` plus `poses` float32 [T, 13] (rotation 9, position 3 = 0, log focal 1 = 0),
    the camera world's layout. `textures` is the palette name (its appearance: `appearance`)."""
    example = super().sample(seed, num_frames)
    rotations, positions, log_focals = self.poses(example['controls'], example['seed'])
    example['poses'] = np.concatenate(
        [rotations.reshape(-1, 9), positions, log_focals[:, None]], axis=1).astype(np.float32)
    return example


def _steer(r: np.ndarray, move: np.ndarray, max_el: float, max_roll: float) -> np.ndarray:
  """Reflects a (pan, tilt) step that would take the roll or elevation past their bounds.

  To first order a step changes sin(roll) by -pan sin(elevation) and sin(elevation) by
  pan r[2, 0] - tilt r[2, 1]; flipping the pan (roll) or reflecting the step about the
  elevation gradient (elevation) reverses the change and keeps the speed.
  """
  def after(m):
    return r @ worlds.relative_rotation(m[0], m[1], 0.0)
  roll0, el0 = horizon_roll(r), elevation(r)
  nxt = after(move)
  roll1 = horizon_roll(nxt)
  if abs(roll1) > max_roll and abs(roll1) > abs(roll0):
    move = np.array([-move[0], move[1]])
    nxt = after(move)
  el1 = elevation(nxt)
  if abs(el1) > max_el and abs(el1) > abs(el0):
    g = np.array([r[2, 0], -r[2, 1]])
    move = move - 2 * (move @ g) / max(g @ g, 1e-12) * g
  return move

