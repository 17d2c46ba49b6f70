"""Procedural, seeded synthetic worlds with an oracle renderer.

Each world renders *the frame a perfect model would draw* for any control trajectory: `render`
is a pure function of `(controls, seed)`, and `sample` records controls drawn by
`random_controls` together with the frames `render` draws for them. Four worlds:

* `camera`: a pinhole camera flies over a 2.5D scene of three horizontal layers (an opaque ground,
  a canopy with holes and soft clouds, each a real photograph or a procedural texture, repeated
  mirrored to infinity) under a sky, with distance fog; the layers at different heights give
  parallax. Controls are relative to the previous frame, see `CAMERA_CONTROLS`.
* `puppet`: an articulated 2D figure (virtual human stand-in) over a background, driven by
  per-frame keypoints, see `PUPPET_KEYPOINTS`.
* `bouncing`: shapes with gravity, wall bounces and occlusion; no control (image-to-video).
* `panorama`: the testbed world (`apt2_jax.data.panorama`): a camera that only pans and tilts
  inside a procedural spherical panorama, rendered exactly per pixel from the ray direction, with
  bursts of large motion; the test split shows an unseen palette family.

Splits: a seed belongs to one split (`split_seed`, `seed_split`). The seed picks the textures and
trajectory type from that split's pool; the `test` pools (textures, trajectory types, shapes)
are disjoint from `train`/`validation`, which differ only in seeds.

Sample dict (`World.sample`):
  video:       uint8 [frames, height, width, 3]
  controls:    float32 [frames, control_dim] (camera: relative pose; puppet: keypoints;
               bouncing: control_dim = 0)
  first_frame: uint8 [height, width, 3]
  caption:     str, caption_id: int, text_tokens: int32 [captions.MAX_LEN]
  seed:        int
  textures:    str (comma-separated texture names), trajectory: str
  poses:       camera only, float32 [frames, 13]: rotation (camera to world, row-major 9),
               position (3), log focal length (1).
"""
import numpy as np

from apt2_jax.data import captions
from apt2_jax.data import textures

# The shared pieces, re-exported: callers use `worlds.<name>` for all of them.
from apt2_jax.data.world_base import (  # noqa: F401
    CAMERA_CONTROL_LIMITS, CAMERA_CONTROLS, FPS, SPLIT_SIZE, SPLITS, World, WorldConfig, _colour_by_name,
    _pick_textures, _rx, _ry, _rz, _to_uint8, check_num_frames, compose_camera, initial_rotation,
    relative_from_absolute, relative_rotation, seed_split, split_seed)
from apt2_jax.data.panorama import PanoramaWorld
from apt2_jax.data.torus import TorusWorld

WORLD_NAMES = ('camera', 'puppet', 'bouncing', 'panorama', 'torus')


def make_world(name: str, config: WorldConfig | None = None, seed: int = 0) -> World:
  """World `name` (one of `WORLD_NAMES`); `seed` is the default seed of `sample()`."""
  classes = {'camera': CameraWorld, 'puppet': PuppetWorld, 'bouncing': BouncingWorld,
             'panorama': PanoramaWorld, 'torus': TorusWorld}
  if name not in classes:
    raise ValueError(f'unknown world {name!r}; expected one of {WORLD_NAMES}')
  return classes[name](config, seed)



# =============================================================================================
# Camera world
# =============================================================================================

_CAMERA_TRAJECTORY_MEANS = {
    # pan, tilt, zoom, forward, roll (multiples of the std; sign drawn at random)
    'drift': (0.0, 0.0, 0.0, 0.0, 0.0),
    'orbit': (2.0, 0.0, 0.0, 1.0, 0.0),
    'dolly': (0.0, 0.0, 0.0, 1.5, 0.0),
    'spiral': (0.0, 0.0, 1.0, 1.0, 3.0),   # held out: test only
}
_CAMERA_MOTION_WORDS = dict(zip(_CAMERA_TRAJECTORY_MEANS, captions.CAMERA_MOTIONS))
_LAYER_HEIGHTS = (0.0, 0.3, 0.9)           # ground, canopy, clouds
_LAYER_SCALES = (4.0, 3.0, 6.0)            # world units per texture tile


class CameraWorld(World):
  name = 'camera'
  control_dim = 5
  trajectory_pools = {'train': ('drift', 'orbit', 'dolly'),
                      'validation': ('drift', 'orbit', 'dolly'),
                      'test': ('drift', 'orbit', 'dolly', 'spiral')}

  def scene(self, seed):
    cfg = self.config
    rng = np.random.default_rng([seed, 0])
    names = _pick_textures(rng, seed, 2)
    size = cfg.texture_size
    ground = textures.load_texture(names[0], int(rng.integers(1 << 31)), size)
    canopy = textures.load_texture(names[1], int(rng.integers(1 << 31)), size)
    noise_rng = np.random.default_rng([seed, 2])
    canopy_alpha = textures._value_noise(noise_rng, size, octaves=4)
    threshold = rng.uniform(0.45, 0.65)
    canopy_alpha = np.clip((canopy_alpha - threshold) * 8.0, 0, 1)
    cloud_alpha = 0.75 * np.clip((textures._value_noise(noise_rng, size) - 0.55) * 4.0, 0, 1)
    clouds = np.ones((size, size, 3)) * rng.uniform(0.85, 1.0)
    rotation = initial_rotation(rng.uniform(-np.pi, np.pi), cfg.initial_tilt)
    position = np.array([*rng.uniform(-50, 50, 2), cfg.altitude])
    return {
        'textures': names,
        'layers': [(ground, np.ones((size, size))), (canopy, canopy_alpha),
                   (clouds, cloud_alpha)],
        'rotation': rotation,
        'position': position,
        'sky': (rng.uniform(0.55, 0.8, 3) * (0.8, 0.9, 1.0), np.array([0.25, 0.4, 0.85])),
        'fog': rng.uniform(0.7, 0.85, 3),
    }

  def poses(self, controls: np.ndarray, seed: int):
    """Absolute poses of `controls` from the world state of `seed` (see `compose_camera`)."""
    scene = self._scene(seed)
    return compose_camera(controls, scene['rotation'], scene['position'], 0.0)

  def pixel_rays(self, log_focal: float) -> np.ndarray:
    """Camera-frame ray directions (z = 1), float64 `[height, width, 3]`."""
    h, w = self.config.height, self.config.width
    focal = 0.5 * w / np.tan(np.deg2rad(self.config.fov_deg) / 2) * np.exp(log_focal)
    y, x = np.meshgrid(np.arange(h) + 0.5 - h / 2, np.arange(w) + 0.5 - w / 2, indexing='ij')
    return np.stack([x / focal, y / focal, np.ones_like(x)], axis=-1)

  def render(self, controls, seed):
    controls = np.asarray(controls, np.float32)
    if controls.ndim != 2 or controls.shape[1] != 5:
      raise ValueError(f'camera controls must be [frames, 5], got {controls.shape}')
    scene = self._scene(seed)
    rotations, positions, log_focals = self.poses(controls, seed)
    frames = [self._render_frame(scene, r, p, f)
              for r, p, f in zip(rotations, positions, log_focals)]
    return _to_uint8(np.stack(frames))

  def _render_frame(self, scene, rotation, position, log_focal):
    cfg = self.config
    rays = self.pixel_rays(log_focal) @ rotation.T          # world directions [H, W, 3]
    ray_length = np.linalg.norm(rays, axis=-1)
    hits = []
    for (texture, alpha), height, scale in zip(scene['layers'], _LAYER_HEIGHTS, _LAYER_SCALES):
      with np.errstate(divide='ignore', invalid='ignore'):
        t = (height - position[2]) / rays[..., 2]
      valid = np.isfinite(t) & (t > 1e-6)
      t = np.where(valid, t, np.inf)
      tt = np.where(valid, t, 0.0)
      texels = cfg.texture_size / scale
      u = (position[0] + tt * rays[..., 0]) * texels
      v = (position[1] + tt * rays[..., 1]) * texels
      colour = textures.sample_bilinear(texture, u, v)
      a = textures.sample_bilinear(alpha[..., None], u, v)[..., 0] * valid
      fog = 1.0 - np.exp(-tt * ray_length / cfg.fog_distance)
      colour = colour * (1 - fog[..., None]) + scene['fog'] * fog[..., None]
      hits.append((t, colour, a))
    order = np.argsort(np.stack([t for t, _, _ in hits]), axis=0)  # front to back per pixel
    colours = np.stack([c for _, c, _ in hits])
    alphas = np.stack([a for _, _, a in hits])
    image = np.zeros(rays.shape)
    transmittance = np.ones(rays.shape[:2])
    for k in range(len(hits)):
      idx = order[k][None]
      a = np.take_along_axis(alphas, idx, 0)[0]
      c = np.take_along_axis(colours, idx[..., None], 0)[0]
      image += (transmittance * a)[..., None] * c
      transmittance *= 1 - a
    up = np.clip(rays[..., 2] / ray_length, 0, 1)[..., None]
    horizon, zenith = scene['sky']
    sky = horizon * (1 - up) + zenith * up
    return image + transmittance[..., None] * sky

  def _motion_std(self) -> np.ndarray:
    """Per-frame std of the five relative controls (x `speed`)."""
    cfg = self.config
    return cfg.speed * np.array([cfg.pan_std, cfg.tilt_std, cfg.zoom_std, cfg.forward_std,
                                 cfg.roll_std])

  def _draw_mean(self, rng, trajectory, std) -> np.ndarray:
    """A trajectory type's mean rate, each component's sign drawn at random."""
    return np.array(_CAMERA_TRAJECTORY_MEANS[trajectory]) * rng.choice([-1, 1], 5) * std

  def _ar_rates(self, rng, rate, mean, std, num_frames):
    """`num_frames` rates of the AR(1) process from `rate` (stationary: each rate ~ N(mean,
    std^2), correlation `smoothness` between frames): (rates float64 [num_frames, 5], the next)."""
    rho = self.config.smoothness
    rates = np.zeros((num_frames, 5))
    for t in range(num_frames):
      rates[t] = rate
      rate = mean + rho * (rate - mean) + np.sqrt(1 - rho ** 2) * std * rng.normal(size=5)
    return rates, rate

  def random_controls(self, rng, num_frames, *, trajectory=None, seed=None):
    cfg = self.config
    trajectory = trajectory or self._pick_trajectory(rng, seed)
    std = self._motion_std()
    if seed is not None:
      scene = self._scene(seed)
      start = scene['rotation'], scene['position']
    else:
      start = initial_rotation(0.0, cfg.initial_tilt), np.array([0.0, 0.0, cfg.altitude])
    damping = 1.0
    for attempt in range(64):
      if attempt and attempt % 16 == 0:
        damping *= 0.5   # rare: shrink the motion until a trajectory stays inside the limits
      mean = self._draw_mean(rng, trajectory, std)
      controls = np.zeros((num_frames, 5))
      rate = mean + std * rng.normal(size=5)
      controls[1:] = self._ar_rates(rng, rate, mean, std, num_frames - 1)[0] * damping
      controls = controls.astype(np.float32)
      if not self._is_outlier(controls, *start):
        return controls
    return np.zeros((num_frames, 5), np.float32)

  def continue_controls(self, rng, num_frames, *, trajectory, start, state=None, attempts=32):
    """The next `num_frames` controls of a long trajectory (the evaluation's; `random_controls`
    checks its limits from the start pose over the whole length, which a long random walk
    almost never satisfies).

    The rates are `random_controls`' AR(1) process (same trajectory means, stds and smoothness,
    no damping: training's speeds), continued from `state` = (mean, next rate) that the previous
    call returned (None: a fresh start, drawn as `random_controls` draws one). A draw is kept
    when the camera stays inside the limits from pose `start` = (rotation, position, log focal);
    after `attempts // 2` failures the mean's signs are redrawn too (the camera turns back; the
    rate stays continuous). Returns (controls float32 [num_frames, 5], state), or None when no
    draw stays inside.
    """
    std = self._motion_std()
    rotation, position, log_focal = start
    for attempt in range(attempts):
      if state is None or attempt >= attempts // 2:
        mean = self._draw_mean(rng, trajectory, std)
        rate = mean + std * rng.normal(size=5) if state is None else state[1]
      else:
        mean, rate = state
      rates, following = self._ar_rates(rng, rate, mean, std, num_frames)
      controls = rates.astype(np.float32)
      if not self._is_outlier(controls, rotation, position, log_focal):
        return controls, (mean, following)
    return None

  def _is_outlier(self, controls, rotation, position, log_focal=0.0) -> bool:
    """Outlier trajectories (dropped by the sampler) leave the limits of the config."""
    cfg = self.config
    if np.any(np.abs(controls) > CAMERA_CONTROL_LIMITS * max(cfg.speed, 1.0)):
      return True
    rotations, positions, log_focals = compose_camera(controls, rotation, position, log_focal)
    off_nadir = np.arccos(np.clip(-rotations[:, 2, 2], -1, 1))
    lo, hi = cfg.altitude_range
    return bool(np.any(off_nadir > cfg.max_off_nadir) or np.any(positions[:, 2] < lo)
                or np.any(positions[:, 2] > hi) or np.any(log_focals < cfg.zoom_range[0])
                or np.any(log_focals > cfg.zoom_range[1]))

  def caption(self, seed, trajectory):
    ground = textures.texture_word(self._scene(seed)['textures'][0])
    return captions.camera_caption(_CAMERA_MOTION_WORDS[trajectory], ground)

  def sample(self, seed=None, num_frames=None):
    example = super().sample(seed, num_frames)
    rotations, positions, log_focals = self.poses(example['controls'], example['seed'])
    example['poses'] = np.concatenate(
        [rotations.reshape(-1, 9), positions, log_focals[:, None]], axis=1).astype(np.float32)
    return example


# =============================================================================================
# Puppet world
# =============================================================================================

PUPPET_KEYPOINTS = ('head', 'neck', 'right_shoulder', 'right_elbow', 'right_wrist',
                    'left_shoulder', 'left_elbow', 'left_wrist', 'pelvis', 'right_hip',
                    'right_knee', 'right_ankle', 'left_hip', 'left_knee', 'left_ankle')
"""Puppet controls: keypoints `[T, 15, 2]` flattened to `[T, 30]` as (x, y) pairs, x / width and
y / height in [0, 1] (y down). The figure is drawn from the keypoints alone."""
PUPPET_BONES = ((1, 0), (1, 8), (1, 2), (2, 3), (3, 4), (1, 5), (5, 6), (6, 7), (8, 9), (9, 10),
                (10, 11), (8, 12), (12, 13), (13, 14))
_PUPPET_MOTION_WORDS = dict(zip(('walk', 'wave', 'jump', 'dance', 'kick'),
                                captions.PUPPET_MOTIONS))


def _capsule_coverage(px, py, a, b, radius):
  """Anti-aliased coverage in [0, 1] of the capsule a-b (pixels) at pixel centres."""
  ab = b - a
  denom = max(float(ab @ ab), 1e-9)
  s = np.clip(((px - a[0]) * ab[0] + (py - a[1]) * ab[1]) / denom, 0, 1)
  d = np.hypot(px - a[0] - s * ab[0], py - a[1] - s * ab[1])
  return np.clip(radius - d + 0.5, 0, 1)


class PuppetWorld(World):
  name = 'puppet'
  control_dim = 2 * len(PUPPET_KEYPOINTS)
  trajectory_pools = {'train': ('walk', 'wave', 'jump', 'dance'),
                      'validation': ('walk', 'wave', 'jump', 'dance'),
                      'test': ('walk', 'wave', 'jump', 'dance', 'kick')}

  def scene(self, seed):
    cfg = self.config
    rng = np.random.default_rng([seed, 0])
    (name,) = _pick_textures(rng, seed, 1)
    texture = textures.load_texture(name, int(rng.integers(1 << 31)), cfg.texture_size)
    h, w = cfg.height, cfg.width
    step = cfg.texture_size * rng.uniform(0.5, 0.9) / max(h, w)
    y, x = np.meshgrid((np.arange(h) + 0.5) * step, (np.arange(w) + 0.5) * step, indexing='ij')
    background = 0.35 + 0.5 * textures.sample_bilinear(texture, x, y)
    colour = captions.PUPPET_COLOURS[rng.integers(len(captions.PUPPET_COLOURS))]
    return {
        'textures': [name],
        'background': background,
        'colour': colour,
        'shirt': _colour_by_name(colour),
        'pants': textures._palette(rng, 1)[0] * 0.6,
        'skin': np.array([0.95, 0.78, 0.62]) * rng.uniform(0.55, 1.0),
        'figure_height': rng.uniform(*cfg.figure_height),
        'thickness': rng.uniform(0.85, 1.2),
    }

  def render(self, controls, seed):
    cfg = self.config
    controls = np.asarray(controls, np.float32)
    if controls.ndim != 2 or controls.shape[1] != self.control_dim:
      raise ValueError(f'puppet controls must be [frames, {self.control_dim}], '
                       f'got {controls.shape}')
    scene = self._scene(seed)
    h, w = cfg.height, cfg.width
    py, px = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing='ij')
    unit = scene['figure_height'] * scene['thickness'] * h
    limb, torso, head = 0.06 * unit, 0.11 * unit, 0.13 * unit
    shirt, pants, skin = scene['shirt'], scene['pants'], scene['skin']
    # Back to front: left arm, legs, torso, right arm, head.
    parts = [((1, 5), limb, shirt), ((5, 6), limb, shirt), ((6, 7), limb, skin),
             ((8, 12), limb, pants), ((12, 13), limb, pants), ((13, 14), limb, pants),
             ((8, 9), limb, pants), ((9, 10), limb, pants), ((10, 11), limb, pants),
             ((1, 8), torso, shirt), ((1, 2), limb, shirt), ((2, 3), limb, shirt),
             ((3, 4), limb, skin), ((0, 0), head, skin)]
    frames = []
    for keypoints in controls.reshape(len(controls), -1, 2).astype(np.float64):
      points = keypoints * (w, h)
      image = scene['background'].copy()
      for (i, j), radius, colour in parts:
        cover = _capsule_coverage(px, py, points[i], points[j], radius)[..., None]
        image = image * (1 - cover) + colour * cover
      frames.append(image)
    return _to_uint8(np.stack(frames))

  def random_controls(self, rng, num_frames, *, trajectory=None, seed=None):
    cfg = self.config
    trajectory = trajectory or self._pick_trajectory(rng, seed)
    if seed is not None:
      size = self._scene(seed)['figure_height']
    else:
      size = rng.uniform(*cfg.figure_height)
    aspect = cfg.width / cfg.height
    t = np.arange(num_frames) / FPS * cfg.speed
    freq = rng.uniform(0.8, 1.4)
    phase = 2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi)
    zeros = np.zeros(num_frames)
    rest = lambda v: np.full(num_frames, v, np.float64)
    torso, head = 0.05 * np.sin(0.5 * phase), zeros
    arms = [rest(0.25), rest(0.2), rest(0.25), rest(0.2)]         # r upper, r lower, l upper, l
    legs = [rest(0.08), zeros, rest(0.08), zeros]                  # r thigh, r shin, l thigh, l
    root_x = rng.uniform(0.35, 0.65) * aspect + zeros
    ground = 0.92 - 0.47 * size
    root_y = ground + zeros
    if trajectory == 'walk':
      swing = rng.uniform(0.3, 0.5)
      legs = [0.05 + swing * np.sin(phase), 0.4 * np.maximum(0, np.sin(phase + 1)),
              0.05 - swing * np.sin(phase), 0.4 * np.maximum(0, np.sin(phase + 1 + np.pi))]
      arms = [0.2 - swing * np.sin(phase), rest(0.3), 0.2 + swing * np.sin(phase), rest(0.3)]
      velocity = rng.choice([-1, 1]) * rng.uniform(0.1, 0.25) * cfg.speed
      span = 0.3 * aspect                                          # walk back and forth
      travel = np.mod(velocity * np.arange(num_frames) / FPS + rng.uniform(0, 2 * span),
                      2 * span)
      root_x = 0.5 * aspect - span / 2 + np.minimum(travel, 2 * span - travel)
      root_y = ground - 0.015 * np.abs(np.sin(phase))
    elif trajectory == 'wave':
      arms = [2.6 + 0.3 * np.sin(phase), 0.5 + 0.5 * np.sin(2 * phase), rest(0.25), rest(0.2)]
      torso = 0.08 * np.sin(phase)
      head = 0.15 * np.sin(phase)
    elif trajectory == 'jump':
      air = np.abs(np.sin(0.5 * phase))
      root_y = ground - rng.uniform(0.05, 0.12) * air
      arms = [0.3 + 1.5 * air, rest(0.3), 0.3 + 1.5 * air, rest(0.3)]
      legs = [0.15 + 0.2 * (1 - air), 0.8 * (1 - air), 0.15 + 0.2 * (1 - air), 0.8 * (1 - air)]
    elif trajectory == 'dance':
      def wiggle(centre, amplitude):
        f = rng.uniform(0.5, 2.0, 2)
        p = rng.uniform(0, 2 * np.pi, 2)
        return centre + amplitude * (np.sin(2 * np.pi * f[0] * t + p[0])
                                     + 0.5 * np.sin(2 * np.pi * f[1] * t + p[1]))
      arms = [wiggle(1.0, 0.8), wiggle(0.6, 0.5), wiggle(1.0, 0.8), wiggle(0.6, 0.5)]
      legs = [wiggle(0.2, 0.15), wiggle(0.2, 0.2), wiggle(0.2, 0.15), wiggle(0.2, 0.2)]
      torso, head = wiggle(0.0, 0.15), wiggle(0.0, 0.2)
      root_x = root_x + 0.05 * np.sin(0.5 * phase)
    elif trajectory == 'kick':
      kick = np.maximum(0, np.sin(phase)) ** 2
      legs = [0.08 + 1.3 * kick, 0.6 * (1 - kick) * np.maximum(0, np.sin(phase)),
              rest(0.08), zeros]
      arms = [rest(0.9), rest(0.3), rest(0.9), rest(0.3)]
      torso = -0.15 * kick
    else:
      raise ValueError(f'unknown puppet trajectory {trajectory!r}')
    keypoints = _puppet_forward_kinematics(size, root_x, root_y, torso, head, arms, legs)
    keypoints[..., 0] /= aspect
    return keypoints.reshape(num_frames, -1).astype(np.float32)

  def caption(self, seed, trajectory):
    scene = self._scene(seed)
    return captions.puppet_caption(scene['colour'], _PUPPET_MOTION_WORDS[trajectory],
                                   textures.texture_word(scene['textures'][0]))


def _puppet_forward_kinematics(size, root_x, root_y, torso, head, arms, legs):
  """Keypoints `[T, 15, 2]` in frame-height units from joint angles `[T]` (radians)."""
  down = lambda a: np.stack([np.sin(a), np.cos(a)], axis=-1)
  pelvis = np.stack([root_x, root_y], axis=-1)
  side = np.stack([np.cos(torso), np.sin(torso)], axis=-1)
  neck = pelvis + 0.33 * size * np.stack([np.sin(torso), -np.cos(torso)], axis=-1)
  head_point = neck + 0.13 * size * np.stack([np.sin(torso + head), -np.cos(torso + head)], -1)
  points = {'head': head_point, 'neck': neck, 'pelvis': pelvis}
  for prefix, sign, upper, lower, root, width in (
      ('right', -1, arms[0], arms[1], neck, 0.1), ('left', 1, arms[2], arms[3], neck, 0.1)):
    shoulder = root + sign * width * size * side
    elbow = shoulder + 0.17 * size * down(torso + sign * upper)
    wrist = elbow + 0.16 * size * down(torso + sign * (upper + lower))
    points.update({f'{prefix}_shoulder': shoulder, f'{prefix}_elbow': elbow,
                   f'{prefix}_wrist': wrist})
  for prefix, sign, upper, lower in (('right', -1, legs[0], legs[1]),
                                     ('left', 1, legs[2], legs[3])):
    hip = pelvis + sign * 0.06 * size * side
    knee = hip + 0.24 * size * down(torso + sign * upper)
    ankle = knee + 0.23 * size * down(torso + sign * (upper - lower))
    points.update({f'{prefix}_hip': hip, f'{prefix}_knee': knee, f'{prefix}_ankle': ankle})
  return np.stack([points[name] for name in PUPPET_KEYPOINTS], axis=1)


# =============================================================================================
# Bouncing objects world
# =============================================================================================

class BouncingWorld(World):
  """Shapes under gravity bouncing off the walls; later objects occlude earlier ones."""
  name = 'bouncing'
  control_dim = 0
  trajectory_pools = {'train': ('physics',), 'validation': ('physics',), 'test': ('physics',)}
  shape_pools = {'train': ('circle', 'square'), 'validation': ('circle', 'square'),
                 'test': ('circle', 'square', 'triangle')}

  def scene(self, seed):
    cfg = self.config
    rng = np.random.default_rng([seed, 0])
    (name,) = _pick_textures(rng, seed, 1)
    texture = textures.load_texture(name, int(rng.integers(1 << 31)), cfg.texture_size)
    h, w = cfg.height, cfg.width
    step = cfg.texture_size * rng.uniform(0.5, 0.9) / max(h, w)
    y, x = np.meshgrid((np.arange(h) + 0.5) * step, (np.arange(w) + 0.5) * step, indexing='ij')
    background = 0.6 * textures.sample_bilinear(texture, x, y)
    count = int(rng.integers(cfg.num_objects[0], cfg.num_objects[1] + 1))
    pool = self.shape_pools[seed_split(seed)]
    aspect = w / h
    radius = rng.uniform(0.06, 0.14, count)
    angle = rng.uniform(0, 2 * np.pi, count)
    speed = rng.uniform(0.4, 0.9, count) * cfg.speed
    return {
        'textures': [name],
        'background': background,
        'shapes': [str(s) for s in rng.choice(pool, count)],
        'colours': textures._palette(rng, count) * 0.3 + 0.7 * rng.uniform(0.3, 1, (count, 3)),
        'radius': radius,
        'position': np.stack([rng.uniform(radius, aspect - radius),
                              rng.uniform(radius, 1 - radius)], axis=-1),
        'velocity': speed[:, None] * np.stack([np.cos(angle), np.sin(angle)], -1),
        'spin': rng.uniform(-3, 3, count) * cfg.speed,
        'orientation': rng.uniform(0, 2 * np.pi, count),
    }

  def simulate(self, num_frames: int, seed: int):
    """Positions `[T, N, 2]` and orientations `[T, N]` in frame-height units."""
    cfg = self.config
    scene = self._scene(seed)
    aspect = cfg.width / cfg.height
    position = scene['position'].copy()
    velocity = scene['velocity'].copy()
    radius = scene['radius'][:, None]
    gravity = np.array([0.0, cfg.gravity * cfg.speed ** 2])
    substeps = 4
    dt = 1.0 / FPS / substeps
    lo, hi = radius, np.array([aspect, 1.0]) - radius
    positions = []
    for _ in range(num_frames):
      positions.append(position.copy())
      for _ in range(substeps):
        velocity = velocity + gravity * dt
        position = position + velocity * dt
        below, above = position < lo, position > hi
        position = np.where(below, 2 * lo - position, np.where(above, 2 * hi - position,
                                                                position))
        velocity = np.where(below | above, -velocity, velocity)
    orientations = scene['orientation'] + scene['spin'] * (np.arange(num_frames)[:, None] / FPS)
    return np.stack(positions), orientations

  def render(self, controls, seed):
    cfg = self.config
    controls = np.asarray(controls, np.float32)
    if controls.ndim != 2 or controls.shape[1] != 0:
      raise ValueError(f'bouncing controls must be [frames, 0], got {controls.shape}')
    scene = self._scene(seed)
    positions, orientations = self.simulate(len(controls), seed)
    h, w = cfg.height, cfg.width
    py, px = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / h, indexing='ij')
    frames = []
    for position, orientation in zip(positions, orientations):
      image = scene['background'].copy()
      for k, shape in enumerate(scene['shapes']):
        c, s = np.cos(orientation[k]), np.sin(orientation[k])
        dx, dy = px - position[k, 0], py - position[k, 1]
        qx, qy = c * dx + s * dy, -s * dx + c * dy
        r = scene['radius'][k]
        if shape == 'circle':
          sdf = np.hypot(dx, dy) - r
        elif shape == 'square':
          ax, ay = np.abs(qx) - 0.8 * r, np.abs(qy) - 0.8 * r
          sdf = (np.hypot(np.maximum(ax, 0), np.maximum(ay, 0))
                 + np.minimum(np.maximum(ax, ay), 0))
        else:  # equilateral triangle
          k3 = np.sqrt(3.0)
          x, y = np.abs(qx) - r, -qy + r / k3
          flip = x + k3 * y > 0
          x, y = np.where(flip, (x - k3 * y) / 2, x), np.where(flip, (-k3 * x - y) / 2, y)
          x = x - np.clip(x, -2 * r, 0)
          sdf = -np.hypot(x, y) * np.sign(y)
        cover = np.clip(0.5 - sdf * h, 0, 1)[..., None]
        image = image * (1 - cover) + scene['colours'][k] * cover
      frames.append(image)
    return _to_uint8(np.stack(frames))

  def random_controls(self, rng, num_frames, *, trajectory=None, seed=None):
    return np.zeros((num_frames, 0), np.float32)

  def caption(self, seed, trajectory):
    scene = self._scene(seed)
    return captions.bouncing_caption(captions.BOUNCING_COUNTS[len(scene['shapes']) - 2],
                                     textures.texture_word(scene['textures'][0]))
