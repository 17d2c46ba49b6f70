"""User controls -> the model's control channels; keyboard mapping; the controls-file format.

One place decides how a user's control becomes the DiT's per-latent-pixel control input, so that
the sampler, the server and the trainer agree (`control_type`, `control_maps`).

Control types (`control_type(model_config)`) and the model's control input per latent frame:
  "none"    `control_channels == 0` (image-to-video, e.g. the bouncing world).
  "camera"  the 4 video frames' relative poses `[4, 5]` (pan, tilt, zoom, forward, roll),
            concatenated to 20 channels and broadcast over the latent pixels: the trainer's layout
            (`apt2_jax.stages.common.latent_controls`, `control_channels = 4 * 5`); or, with
            `control_channels = 24`, the per-pixel ray maps (origin, direction) of each of the 4
            frames (`control_encoding="rays"` in training, `conditioning.camera_ray_maps`).
  "pose"    the 4 video frames' keypoints `[4, 15, 2]` (x / width, y / height), concatenated to
            120 channels and broadcast (the trainer's layout, `4 * 30`); or, with 15 channels, one
            Gaussian map per keypoint.

A user control for one step (one latent frame = 4 video frames) is one of
  None                                  no motion (camera) / hold the last pose (pose);
  {"keys": ["w", "ArrowLeft", ...]}     camera keys held during the step (see `KEY_BINDINGS`);
  {"camera": [pan, tilt, zoom, forward, roll]}  explicit relative pose per video frame, or
                                        [4, 5]: one row per video frame of the step;
  {"keypoints": [[x, y] * 15]}          puppet keypoints in [0, 1], or [4, 15, 2] per video frame.

Controls file (`sample --controls=FILE.json`), validated by `load_controls_file`:

    {"steps": [                        # one entry per step = 4 video frames
        {"keys": ["w"]},
        {"camera": [0.05, 0, 0, 0.1, 0]},
        {"keypoints": [[0.5, 0.2], ...]},
        {},                            # or null: no control this step
        {"text": "a camera glides over grass", "keys": ["d"]}   # "text" changes the prompt
     ],
     "repeat_last": true}              # optional: keep the last control when more steps are asked

A bare list `[...]` is the same as `{"steps": [...]}`. Errors name the bad entry
(`steps[3].camera[1]: 0.9 is outside [-0.15, 0.15] (tilt)`).
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from apt2_jax.models import conditioning

CONTROL_TYPES = ("none", "camera", "pose")
FRAMES_PER_STEP = 4  # video frames per latent frame

CAMERA_CONTROLS = ("pan", "tilt", "zoom", "forward", "roll")
# Per-video-frame bounds of the relative camera control (apt2_jax.data.worlds.CAMERA_CONTROL_LIMITS).
CAMERA_LIMITS = np.array([0.15, 0.15, 0.1, 0.25, 0.15], np.float32)
NUM_KEYPOINTS = 15
KEYPOINT_RANGE = (0.0, 1.0)
# Ray maps: ray origin (3) and direction (3) of each of the 4 video frames of a latent frame
# (`conditioning.latent_control_maps(..., "rays")`, the trainer's `control_encoding="rays"`).
CAMERA_CHANNELS = FRAMES_PER_STEP * conditioning.RAY_CHANNELS

# Keyboard -> per-video-frame relative camera motion (a fraction of the limits). Keys follow the
# browser's `KeyboardEvent.key`, lower-cased for letters.
KEY_BINDINGS = {
    "w": ("forward", +0.5), "s": ("forward", -0.5),
    "a": ("pan", -0.4), "d": ("pan", +0.4),
    "arrowleft": ("pan", -0.4), "arrowright": ("pan", +0.4),
    "arrowup": ("tilt", +0.4), "arrowdown": ("tilt", -0.4),
    "q": ("roll", -0.4), "e": ("roll", +0.4),
    "+": ("zoom", +0.5), "=": ("zoom", +0.5), "-": ("zoom", -0.5), "_": ("zoom", -0.5),
}

# Rest pose of the puppet (x, y in [0, 1], y down), in `worlds.PUPPET_KEYPOINTS` order.
REST_POSE = np.array([
    [0.50, 0.22], [0.50, 0.32], [0.42, 0.34], [0.38, 0.46], [0.36, 0.58],
    [0.58, 0.34], [0.62, 0.46], [0.64, 0.58], [0.50, 0.58], [0.45, 0.60],
    [0.44, 0.74], [0.44, 0.88], [0.55, 0.60], [0.56, 0.74], [0.56, 0.88]], np.float32)


class ControlError(ValueError):
  """A control (message or file entry) is malformed or out of range; `str()` names the entry."""


# ------------------------------------------------------------------------------------------------
# Control type of a model
# ------------------------------------------------------------------------------------------------


# control_channels -> control type, for the layouts `control_maps` builds.
_TYPE_OF_CHANNELS = {0: "none", FRAMES_PER_STEP * 5: "camera", CAMERA_CHANNELS: "camera",
                     FRAMES_PER_STEP * 2 * NUM_KEYPOINTS: "pose", NUM_KEYPOINTS: "pose"}
WORLD_CONTROL_TYPES = {"camera": "camera", "puppet": "pose", "bouncing": "none"}


def control_type(model_config, explicit: Optional[str] = None) -> str:
  """"none", "camera" or "pose" for a `DiTConfig` (or its dict); `explicit` wins when given."""
  channels = (model_config["control_channels"] if isinstance(model_config, Mapping)
              else model_config.control_channels)
  if explicit is not None:
    if explicit not in CONTROL_TYPES:
      raise ValueError(f"control_type={explicit!r} is not one of {CONTROL_TYPES}")
    if (explicit == "none") != (channels == 0):
      raise ValueError(f"control_type={explicit!r} does not fit model.control_channels={channels}")
    return explicit
  if channels not in _TYPE_OF_CHANNELS:
    raise ValueError(f"model.control_channels={channels} is no known control layout "
                     f"({sorted(_TYPE_OF_CHANNELS)}); pass control_type explicitly")
  return _TYPE_OF_CHANNELS[channels]


# ------------------------------------------------------------------------------------------------
# Parsing and validation of one step's control
# ------------------------------------------------------------------------------------------------


def _floats(value, where: str, shape_desc: str) -> np.ndarray:
  try:
    arr = np.asarray(value, np.float64)
  except (TypeError, ValueError):
    raise ControlError(f"{where}: expected {shape_desc} numbers, got {value!r:.80}") from None
  if arr.dtype == object or not np.isfinite(arr).all():
    raise ControlError(f"{where}: expected finite numbers ({shape_desc}), got {value!r:.80}")
  return arr


def camera_control_from_keys(keys: Sequence[str], where: str = "keys") -> np.ndarray:
  """Held keys -> relative camera control per video frame, float32 [5]."""
  if isinstance(keys, str) or not isinstance(keys, (list, tuple)):
    raise ControlError(f"{where}: expected a list of key names, got {keys!r:.80}")
  control = np.zeros(len(CAMERA_CONTROLS), np.float32)
  for j, key in enumerate(keys):
    if not isinstance(key, str) or key.lower() not in KEY_BINDINGS:
      raise ControlError(f"{where}[{j}]: unknown key {key!r:.40}; known keys: "
                         f"{sorted(KEY_BINDINGS)}")
    name, fraction = KEY_BINDINGS[key.lower()]
    i = CAMERA_CONTROLS.index(name)
    control[i] += fraction * CAMERA_LIMITS[i]
  return np.clip(control, -CAMERA_LIMITS, CAMERA_LIMITS)


def _camera(value, where: str) -> np.ndarray:
  arr = _floats(value, where, "5 or [4, 5]")
  if arr.shape == (5,):
    arr = np.broadcast_to(arr, (FRAMES_PER_STEP, 5))
  if arr.shape != (FRAMES_PER_STEP, 5):
    raise ControlError(f"{where}: expected [pan, tilt, zoom, forward, roll] or 4 such rows, got "
                       f"shape {list(arr.shape)}")
  for f in range(FRAMES_PER_STEP):
    for i, name in enumerate(CAMERA_CONTROLS):
      if abs(arr[f, i]) > CAMERA_LIMITS[i] + 1e-6:
        idx = f"[{i}]" if np.ndim(value) == 1 else f"[{f}][{i}]"
        raise ControlError(f"{where}{idx}: {arr[f, i]:g} is outside "
                           f"[-{CAMERA_LIMITS[i]:g}, {CAMERA_LIMITS[i]:g}] ({name})")
  return arr.astype(np.float32)


def _keypoints(value, where: str) -> np.ndarray:
  arr = _floats(value, where, f"[{NUM_KEYPOINTS}, 2] or [4, {NUM_KEYPOINTS}, 2]")
  if arr.shape == (2 * NUM_KEYPOINTS,):
    arr = arr.reshape(NUM_KEYPOINTS, 2)
  if arr.shape == (NUM_KEYPOINTS, 2):
    arr = np.broadcast_to(arr, (FRAMES_PER_STEP, NUM_KEYPOINTS, 2))
  if arr.shape != (FRAMES_PER_STEP, NUM_KEYPOINTS, 2):
    raise ControlError(f"{where}: expected {NUM_KEYPOINTS} [x, y] pairs (or 4 such lists), got "
                       f"shape {list(arr.shape)}")
  lo, hi = KEYPOINT_RANGE
  bad = np.argwhere((arr < lo) | (arr > hi))
  if len(bad):
    f, k, c = bad[0]
    idx = f"[{k}][{c}]" if np.ndim(value) in (1, 2) else f"[{f}][{k}][{c}]"
    raise ControlError(f"{where}{idx}: {arr[f, k, c]:g} is outside [{lo:g}, {hi:g}]")
  return arr.astype(np.float32)


def parse_control(control: Any, kind: str, where: str = "control") -> Optional[np.ndarray]:
  """Validates one step's user control for a model of control type `kind`.

  Returns None (no control given) or the per-video-frame control of the step: camera
  float32 [4, 5] (relative poses), pose float32 [4, 15, 2]. Raises `ControlError` naming the
  bad entry.
  """
  if control is None:
    return None
  if isinstance(control, np.ndarray):
    control = {"camera": control} if kind == "camera" else {"keypoints": control}
  if not isinstance(control, Mapping):
    raise ControlError(f"{where}: expected an object with 'keys', 'camera' or 'keypoints', got "
                       f"{type(control).__name__}")
  given = [k for k in ("keys", "camera", "keypoints") if control.get(k) is not None]
  unknown = sorted(set(control) - {"keys", "camera", "keypoints", "text", "type"})
  if unknown:
    raise ControlError(f"{where}: unknown field(s) {unknown}; expected 'keys', 'camera', "
                       f"'keypoints' or 'text'")
  if not given:
    return None
  if len(given) > 1:
    raise ControlError(f"{where}: give one of 'keys', 'camera', 'keypoints', got {given}")
  field = given[0]
  allowed = {"none": (), "camera": ("keys", "camera"), "pose": ("keypoints",)}[kind]
  if field not in allowed:
    raise ControlError(f"{where}.{field}: this model takes "
                       f"{'no control' if kind == 'none' else ' or '.join(map(repr, allowed))}")
  if field == "keys":
    return np.broadcast_to(camera_control_from_keys(control["keys"], f"{where}.keys"),
                           (FRAMES_PER_STEP, 5)).astype(np.float32)
  if field == "camera":
    return _camera(control["camera"], f"{where}.camera")
  return _keypoints(control["keypoints"], f"{where}.keypoints")


# ------------------------------------------------------------------------------------------------
# Control maps at latent resolution (the model's control channels)
# ------------------------------------------------------------------------------------------------


def _rotation(pan, tilt, roll):
  cy, sy = math.cos(pan), math.sin(pan)
  cx, sx = math.cos(tilt), math.sin(tilt)
  cz, sz = math.cos(roll), math.sin(roll)
  ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
  rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
  return ry @ rx @ rz


def _pose_maps(keypoints: np.ndarray, height: int, width: int, channels: int, sigma: float = 0.75):
  """Fallback keypoint maps: float32 [h, w, channels], one Gaussian per keypoint (last frame)."""
  kp = np.asarray(keypoints, np.float32)[-1]  # the step's last video frame
  ys = (np.arange(height) + 0.5)[:, None, None]
  xs = (np.arange(width) + 0.5)[None, :, None]
  d2 = (xs - kp[:, 0] * width) ** 2 + (ys - kp[:, 1] * height) ** 2
  maps = np.exp(-d2 / (2 * sigma ** 2)).astype(np.float32)  # [h, w, 15]
  if channels != maps.shape[-1]:
    out = np.zeros((height, width, channels), np.float32)
    n = min(channels, maps.shape[-1])
    out[..., :n] = maps[..., :n]
    maps = out
  return maps


def control_maps(kind: str, control: Optional[np.ndarray], latent_hw: tuple[int, int],
                 channels: int) -> Optional[np.ndarray]:
  """The model's control input for one step: float32 [h, w, channels] (None for "none").

  `control` is `parse_control`'s output (already validated): camera [4, 5], pose [4, 15, 2];
  None means no motion for a camera and the rest pose for a puppet. With `channels = 4 * D`
  (D = 5 camera, 30 pose) this is exactly the trainer's `stages.common.latent_controls` for the
  latent frame that covers these 4 video frames (tests/test_inference.py checks it).
  """
  if kind == "none":
    if channels:
      raise ValueError(f"control type 'none' but model.control_channels={channels}")
    return None
  h, w = latent_hw
  if kind == "camera" and control is None:
    control = np.zeros((FRAMES_PER_STEP, 5), np.float32)
  if kind == "pose" and control is None:
    control = np.broadcast_to(REST_POSE, (FRAMES_PER_STEP, NUM_KEYPOINTS, 2))
  flat = np.asarray(control, np.float32).reshape(FRAMES_PER_STEP, -1)  # [4, D]
  if channels == flat.size:  # the trainer's layout: the 4 frames' controls, concatenated
    return np.ascontiguousarray(np.broadcast_to(flat.reshape(-1), (h, w, channels)))
  if kind == "camera" and channels == CAMERA_CHANNELS:  # the 4 frames' ray maps, as in training
    rays = np.asarray(conditioning.camera_ray_maps(flat, h, w), np.float32)  # [4, h, w, 6]
    return np.ascontiguousarray(np.moveaxis(rays, 0, -2).reshape(h, w, channels))
  if kind == "pose" and channels == NUM_KEYPOINTS:
    return _pose_maps(flat.reshape(FRAMES_PER_STEP, NUM_KEYPOINTS, 2), h, w, channels)
  raise ValueError(f"no {kind} control layout with {channels} channels (model.control_channels); "
                   f"known: {4 * flat.shape[1]} (per-frame controls)"
                   f"{', 24 (ray maps)' if kind == 'camera' else ', 15 (keypoint maps)'}")


# ------------------------------------------------------------------------------------------------
# Controls file
# ------------------------------------------------------------------------------------------------


def parse_controls_file(data: Any, kind: str, source: str = "controls") -> dict:
  """Validates a decoded controls file (see the module docstring).

  Returns {"steps": [{"control": array | None, "text": str | None}, ...], "repeat_last": bool}.
  """
  if isinstance(data, list):
    data = {"steps": data}
  if not isinstance(data, Mapping):
    raise ControlError(f"{source}: expected an object with 'steps' or a list, got "
                       f"{type(data).__name__}")
  unknown = sorted(set(data) - {"steps", "repeat_last"})
  if unknown:
    raise ControlError(f"{source}: unknown field(s) {unknown}; expected 'steps', 'repeat_last'")
  steps = data.get("steps")
  if not isinstance(steps, list) or not steps:
    raise ControlError(f"{source}.steps: expected a non-empty list of step controls")
  repeat = data.get("repeat_last", True)
  if not isinstance(repeat, bool):
    raise ControlError(f"{source}.repeat_last: expected true or false, got {repeat!r}")
  out = []
  for i, entry in enumerate(steps):
    where = f"{source}.steps[{i}]"
    if entry is None:
      entry = {}
    if not isinstance(entry, Mapping):
      raise ControlError(f"{where}: expected an object (or null), got {type(entry).__name__}")
    text = entry.get("text")
    if text is not None and (not isinstance(text, str) or not text.strip()):
      raise ControlError(f"{where}.text: expected a non-empty string")
    out.append({"control": parse_control(entry, kind, where), "text": text})
  return {"steps": out, "repeat_last": repeat}


def load_controls_file(path: str, kind: str) -> dict:
  """Reads and validates a controls JSON file; errors name the file and the bad entry."""
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ControlError(f"{path}: not valid JSON: {e}") from None
  return parse_controls_file(data, kind, source=path)


def controls_for_steps(parsed: dict, num_steps: int, source: str = "controls") -> list[dict]:
  """The parsed file's steps stretched to `num_steps` (repeating the last, or none after)."""
  steps = parsed["steps"]
  if num_steps <= len(steps):
    return steps[:num_steps]
  if not parsed["repeat_last"]:
    raise ControlError(f"{source}: {len(steps)} steps given, {num_steps} needed and "
                       f"repeat_last is false")
  return steps + [{"control": steps[-1]["control"], "text": None}] * (num_steps - len(steps))
