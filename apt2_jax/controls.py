"""The one control encoding: per-video-frame controls -> the DiT's per-latent-pixel control input.

Training (`stages.common.latent_controls`), streaming, export, evaluation and the server all call
this module; nothing else turns controls into control channels.

Control types and their per-video-frame controls `[D]` (`CONTROL_DIM`):
  "none"    D = 0 (image-to-video, e.g. the bouncing world).
  "camera"  D = 5: pose of frame t relative to frame t-1 (`CAMERA_CONTROLS`: pan, tilt, zoom,
            forward, roll; `apt2_jax.data.worlds.compose_camera`'s parameterisation), each within
            +-`CAMERA_LIMITS`; frame 0 (no previous frame) is zeros.
  "pose"    D = 30: `NUM_KEYPOINTS` (x / width, y / height) pairs, y down, in
            `apt2_jax.data.worlds.PUPPET_KEYPOINTS` order.

One latent frame covers `FRAMES_PER_LATENT` = 4 video frames (latent frame j >= 1: video frames
4j-3 .. 4j; latent frame 0 is the first image alone). Its control input is `frame_group_maps` of
those 4 frames' controls `[4, D]`, in one of the encodings (channels per latent frame, `Cc`):
  "raw"            the 4 controls concatenated and broadcast over the latent pixels, Cc = 4 D
                   (camera 20, pose 120). Kept for old checkpoints; not at unit scale.
  "rays"           camera: per-pixel ray origin (3) and direction (3) of each video frame in the
                   previous frame's camera (`camera_ray_maps`), each channel divided by its std over
                   the camera world's training trajectories; Cc = 4 x 6 = 24.
  "keypoint_maps"  pose: one Gaussian map per keypoint per video frame (`keypoint_maps`), sigma
                   `POSE_SIGMA` of the frame's side, divided by its std over the puppet world's
                   trajectories; Cc = 4 x 15 = 60.
Channels are frame-major: channel `f * (Cc / 4) + c` is channel c of video frame f of the group.
New models use `default_encoding(control_type)`; old checkpoints' encoding follows from their
`control_channels` (`encoding_from_channels`).

Every function takes `xp` (`jax.numpy`, the default, or `numpy`): one definition of the math serves
both, and with `jax.numpy` it is jittable (`height`, `width`, `encoding` static).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import jax.numpy as jnp
import numpy as np

CONTROL_TYPES = ("none", "camera", "pose")
FRAMES_PER_LATENT = 4
CAMERA_CONTROLS = ("pan", "tilt", "zoom", "forward", "roll")
# Per-video-frame bounds of the relative camera control (|control| <= limit); the camera world
# draws its trajectories within them (`worlds.CAMERA_CONTROL_LIMITS` is this array).
CAMERA_LIMITS = np.array([0.15, 0.15, 0.1, 0.25, 0.15], np.float32)
NUM_KEYPOINTS = 15
# Rest pose of the puppet (x, y in [0, 1], y down), in `worlds.PUPPET_KEYPOINTS` order.
REST_POSE = np.array([
    [0.50, 0.22], [0.50, 0.32], [0.42, 0.34], [0.38, 0.46], [0.36, 0.58],
    [0.58, 0.34], [0.62, 0.46], [0.64, 0.58], [0.50, 0.58], [0.45, 0.60],
    [0.44, 0.74], [0.44, 0.88], [0.55, 0.60], [0.56, 0.74], [0.56, 0.88]], np.float32)
CONTROL_DIM = {"none": 0, "camera": len(CAMERA_CONTROLS), "pose": 2 * NUM_KEYPOINTS}
WORLD_CONTROL_TYPES = {"camera": "camera", "puppet": "pose", "bouncing": "none", "panorama": "camera", "torus": "camera"}

# Keyboard -> per-video-frame relative camera motion, as a fraction of `CAMERA_LIMITS` (W: forward
# 0.5 x 0.25 = 0.125 per video frame). Keys follow the browser's `KeyboardEvent.key`, lower-cased;
# the server sends this table to the browser page.
KEY_BINDINGS = {
    "w": ("forward", +0.5), "s": ("forward", -0.5),
    "a": ("pan", -0.4), "d": ("pan", +0.4),
    "arrowleft": ("pan", -0.4), "arrowright": ("pan", +0.4),
    "arrowup": ("tilt", +0.4), "arrowdown": ("tilt", -0.4),
    "q": ("roll", -0.4), "e": ("roll", +0.4),
    "+": ("zoom", +0.5), "=": ("zoom", +0.5), "-": ("zoom", -0.5), "_": ("zoom", -0.5),
}

CONTROL_ENCODINGS = ("raw", "rays", "keypoint_maps")
# The control type each encoding needs (None: any) and its channels per video frame (None: D).
_ENCODING_TYPE = {"raw": None, "rays": "camera", "keypoint_maps": "pose"}
RAY_CHANNELS = 6
_FRAME_CHANNELS = {"raw": None, "rays": RAY_CHANNELS, "keypoint_maps": NUM_KEYPOINTS}

# "rays": fixed normalisation, measured on the camera world's training trajectories
# (tests/test_controls.py re-measures it): each channel is divided by its std there. Directions are
# taken relative to the still camera's ray, so a still camera gives zeros.
CAMERA_FOV_DEG = 60.0
RAY_ORIGIN_STD = (0.00071, 0.00041, 0.0296)     # x, y, z, in the previous frame's camera
RAY_DIRECTION_STD = (0.0211, 0.0128, 0.0081)
# "keypoint_maps": Gaussian sigma as a fraction of the frame's side (sqrt(height x width), so the
# blob covers the same fraction of any frame), and the maps' std over the puppet world's
# trajectories at latent resolution (tests/test_controls.py re-measures it).
POSE_SIGMA = 0.1
POSE_MAP_STD = 0.166


# ------------------------------------------------------------------------------------------------
# Encodings and channel counts
# ------------------------------------------------------------------------------------------------


def default_encoding(control_type: str) -> str:
  """The encoding new models use: camera "rays", pose "keypoint_maps", none "" (no channels)."""
  if control_type not in CONTROL_TYPES:
    raise ValueError(f"control_type={control_type!r} is not one of {CONTROL_TYPES}")
  return {"none": "", "camera": "rays", "pose": "keypoint_maps"}[control_type]


def control_channels(encoding: Optional[str], control_dim: int) -> int:
  """Channels `Cc` of the model's control input per latent frame, for per-video-frame controls of
  width `control_dim` in `encoding` ("" or None: no control, 0 channels)."""
  if not encoding:
    if control_dim:
      raise ValueError(f"control_dim={control_dim} needs an encoding, one of {CONTROL_ENCODINGS}")
    return 0
  if encoding not in CONTROL_ENCODINGS:
    raise ValueError(f"control_encoding={encoding!r} is not one of {CONTROL_ENCODINGS}")
  kind = _ENCODING_TYPE[encoding]
  if kind is not None and control_dim != CONTROL_DIM[kind]:
    raise ValueError(f"control_encoding={encoding!r} needs {kind} controls of width "
                     f"{CONTROL_DIM[kind]}, got control_dim={control_dim}")
  return FRAMES_PER_LATENT * (_FRAME_CHANNELS[encoding] or control_dim)


def known_layouts() -> dict[int, tuple[str, str]]:
  """{control_channels: (control_type, encoding)} of every layout `frame_group_maps` builds."""
  out = {0: ("none", "")}
  for kind in ("camera", "pose"):
    for encoding in CONTROL_ENCODINGS:
      if _ENCODING_TYPE[encoding] in (None, kind):
        out[control_channels(encoding, CONTROL_DIM[kind])] = (kind, encoding)
  return out


def encoding_from_channels(channels: int, control_type: Optional[str] = None) -> tuple[str, str]:
  """(control_type, encoding) of a model with `control_channels = channels` (old checkpoints carry
  no encoding name): 0 none, 20 camera raw, 24 camera rays, 120 pose raw, 60 pose keypoint_maps.
  `control_type`, when given, must agree. Raises ValueError for any other count."""
  layouts = known_layouts()
  if channels not in layouts:
    known = ", ".join(f"{c} ({k} {e})" if e else f"{c} ({k})" for c, (k, e) in sorted(layouts.items()))
    raise ValueError(f"model.control_channels={channels} is no known control layout ({known})")
  kind, encoding = layouts[channels]
  if control_type is not None and control_type != kind:
    raise ValueError(f"control_type={control_type!r} does not fit model.control_channels="
                     f"{channels} ({kind}, {encoding or 'no control'})")
  return kind, encoding


def camera_control_from_keys(keys: Iterable[str], where: str = "keys") -> np.ndarray:
  """Keys held during a step -> relative camera control per video frame, float32 [5].

  Each key adds its `KEY_BINDINGS` fraction of the limit (opposite keys cancel); the sum is
  clipped to `CAMERA_LIMITS`; no key gives zeros. Raises ValueError naming an unknown key.
  """
  if isinstance(keys, str):
    raise ValueError(f"{where}: expected a list of key names, got {keys!r:.80}")
  control = np.zeros(len(CAMERA_CONTROLS), np.float32)
  for j, key in enumerate(keys):
    if not isinstance(key, str) or key.lower() not in KEY_BINDINGS:
      raise ValueError(f"{where}[{j}]: unknown key {key!r:.40}; known keys: {sorted(KEY_BINDINGS)}")
    name, fraction = KEY_BINDINGS[key.lower()]
    i = CAMERA_CONTROLS.index(name)
    control[i] += fraction * CAMERA_LIMITS[i]
  return np.clip(control, -CAMERA_LIMITS, CAMERA_LIMITS)


# ------------------------------------------------------------------------------------------------
# Camera: per-pixel rays relative to the previous frame
# ------------------------------------------------------------------------------------------------


def _rotation_minus_identity(axis: int, a, xp):
  """`R_axis(a) - I`, [..., 3, 3], without cancellation (cos a - 1 = -2 sin^2(a / 2))."""
  c1, s = -2 * xp.sin(a / 2) ** 2, xp.sin(a)
  z = xp.zeros_like(a)
  rows = {0: [[z, z, z], [z, c1, -s], [z, s, c1]],
          1: [[c1, z, s], [z, z, z], [-s, z, c1]],
          2: [[c1, -s, z], [s, c1, z], [z, z, z]]}[axis]
  return xp.stack([xp.stack(r, -1) for r in rows], -2)


def camera_ray_maps(relative, height: int, width: int, fov_deg: float = CAMERA_FOV_DEG,
                    normalize: bool = True, xp=jnp):
  """Per-pixel rays of each frame, in the previous frame's camera.

  Args:
    relative: [..., 5] relative camera controls (`CAMERA_CONTROLS`) of each frame with respect to
      the previous one: rotation `Ry(pan) Rx(tilt) Rz(roll)`, then a move of `forward` along the
      new optical axis; log focal length changed by `zoom`.
    height, width: the grid of pixel centres (the latent resolution); `fov_deg` the horizontal
      field of view of the still camera.
  Returns:
    float32 [..., height, width, 6]: ray origin (3) and unit ray direction minus the still camera's
    (3), each channel divided by `RAY_ORIGIN_STD` / `RAY_DIRECTION_STD` (`normalize`). Zero
    controls give zeros.
  """
  relative = xp.asarray(relative, xp.float32)
  pan, tilt, zoom, forward, roll = [relative[..., i] for i in range(5)]
  a, b, c = (_rotation_minus_identity(1, pan, xp), _rotation_minus_identity(0, tilt, xp),
             _rotation_minus_identity(2, roll, xp))
  # R - I for R = (I + A)(I + B)(I + C), summed from small terms (no cancellation).
  delta_r = a + b + c + a @ b + a @ c + b @ c + a @ b @ c                     # [..., 3, 3]
  focal = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
  ys = (xp.arange(height, dtype=xp.float32) + 0.5 - height / 2) / focal
  xs = (xp.arange(width, dtype=xp.float32) + 0.5 - width / 2) / focal
  y0, x0 = xp.meshgrid(ys, xs, indexing="ij")                                # [h, w]
  q0 = x0 ** 2 + y0 ** 2
  g0 = 1 / xp.sqrt(1 + q0)
  still = xp.stack([x0 * g0, y0 * g0, g0], -1)                               # [h, w, 3]
  # The zoomed ray (focal length x exp(zoom)) minus the still one, again without cancellation.
  em1 = xp.expm1(-zoom)[..., None, None]                                     # [..., 1, 1]
  q = q0 * xp.exp(-2 * zoom)[..., None, None]
  g = 1 / xp.sqrt(1 + q)
  dg = -q0 * xp.expm1(-2 * zoom)[..., None, None] / ((1 + q) * (1 + q0) * (g + g0))
  zoomed = [x0 * (1 + em1), y0 * (1 + em1)]
  delta_ray = xp.stack([zoomed[0] * dg + g0 * x0 * em1, zoomed[1] * dg + g0 * y0 * em1, dg], -1)
  rotation = delta_r + xp.eye(3, dtype=xp.float32)
  direction = (xp.einsum("...ij,...hwj->...hwi", rotation, delta_ray)
               + xp.einsum("...ij,hwj->...hwi", delta_r, still))              # R r' - s
  origin = forward[..., None] * rotation[..., :, 2]                          # [..., 3]
  origin = xp.broadcast_to(origin[..., None, None, :], direction.shape)
  if normalize:
    origin = origin / xp.asarray(RAY_ORIGIN_STD, xp.float32)
    direction = direction / xp.asarray(RAY_DIRECTION_STD, xp.float32)
  return xp.concatenate([origin, direction], axis=-1).astype(xp.float32)


# ------------------------------------------------------------------------------------------------
# Pose: Gaussian keypoint maps
# ------------------------------------------------------------------------------------------------


def keypoint_maps(keypoints, height: int, width: int, normalize: bool = True, xp=jnp):
  """One Gaussian map per keypoint: `[..., K, 2]` (x / width, y / height) -> [..., h, w, K].

  The Gaussian of keypoint k is centred at (x * width, y * height) in pixels (pixel centres at
  i + 0.5), sigma `POSE_SIGMA * sqrt(height * width)` pixels, peak 1, divided by `POSE_MAP_STD`
  (`normalize`); keypoints outside the frame fade out smoothly. float32.
  """
  keypoints = xp.asarray(keypoints, xp.float32)
  sigma = POSE_SIGMA * math.sqrt(height * width)
  px = xp.arange(width, dtype=xp.float32) + 0.5
  py = xp.arange(height, dtype=xp.float32) + 0.5
  kx = keypoints[..., None, None, :, 0] * width                               # [..., 1, 1, K]
  ky = keypoints[..., None, None, :, 1] * height
  d2 = (px[:, None] - kx) ** 2 + (py[:, None, None] - ky) ** 2               # [..., h, w, K]
  maps = xp.exp(-d2 / (2 * sigma ** 2))
  if normalize:
    maps = maps / POSE_MAP_STD
  return maps.astype(xp.float32)


# ------------------------------------------------------------------------------------------------
# The model's control input
# ------------------------------------------------------------------------------------------------


def frame_group_maps(controls, height: int, width: int, encoding: str, xp=jnp):
  """The model's control input for one latent frame from its video frames' controls.

  Args:
    controls: [..., 4, D] per-video-frame controls of the latent frame's 4 video frames, in time
      order (camera D = 5, pose D = 30).
    height, width: the latent resolution.
    encoding: one of `CONTROL_ENCODINGS`.
    xp: `jax.numpy` (jittable) or `numpy`.
  Returns:
    float32 [..., height, width, Cc], Cc = `control_channels(encoding, D)`, frame-major channels.
  """
  controls = xp.asarray(controls, xp.float32)
  *lead, frames, d = controls.shape
  if frames != FRAMES_PER_LATENT:
    raise ValueError(f"controls {tuple(controls.shape)}: expected [..., {FRAMES_PER_LATENT}, D]")
  cc = control_channels(encoding, d)
  if encoding == "raw":
    flat = controls.reshape(*lead, 1, 1, cc)
    return xp.broadcast_to(flat, (*lead, height, width, cc))
  if encoding == "rays":
    maps = camera_ray_maps(controls, height, width, xp=xp)                   # [..., 4, h, w, 6]
  else:
    keypoints = controls.reshape(*lead, frames, NUM_KEYPOINTS, 2)
    maps = keypoint_maps(keypoints, height, width, xp=xp)                    # [..., 4, h, w, 15]
  return xp.moveaxis(maps, -4, -2).reshape(*lead, height, width, cc)


def latent_control_maps(controls, latent_frames: int, height: int, width: int, encoding: str,
                        xp=jnp):
  """Per-video-frame controls of a clip -> the model's control input of every latent frame.

  Args:
    controls: [B, T, D], T = 1 + 4 (latent_frames - 1).
  Returns:
    float32 [B, latent_frames, height, width, Cc]: latent frame 0 (the first image, no motion) is
    zeros; latent frame j >= 1 is `frame_group_maps` of video frames 4j-3 .. 4j. Streaming one
    latent frame at a time with `frame_group_maps` gives exactly these maps.
  """
  controls = xp.asarray(controls, xp.float32)
  b, t, d = controls.shape
  if t != 1 + FRAMES_PER_LATENT * (latent_frames - 1):
    raise ValueError(f"controls cover {t} video frames, the clip has {latent_frames} latent frames "
                     f"(needs 1 + {FRAMES_PER_LATENT} x {latent_frames - 1} video frames)")
  groups = controls[:, 1:].reshape(b, latent_frames - 1, FRAMES_PER_LATENT, d)
  maps = frame_group_maps(groups, height, width, encoding, xp=xp)          # [B, F-1, h, w, Cc]
  zeros = xp.zeros((b, 1) + tuple(maps.shape[2:]), xp.float32)
  return xp.concatenate([zeros, maps], axis=1)
