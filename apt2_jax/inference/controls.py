"""User controls: parsing and validation of one step's control and of a controls file.

How a control becomes the model's control channels is `apt2_jax.controls` (the one encoding the
trainer, the stream and the server share); this module turns what a user sends into the
per-video-frame controls that encoding takes, and names the bad entry when it is malformed.

Control types (`control_type(model_config)`, from `model.control_channels`, see
`apt2_jax.controls.encoding_from_channels`): "none" (0 channels), "camera" (20 raw, 24 "rays"),
"pose" (120 raw, 60 "keypoint_maps").

A user control for one step (one latent frame = 4 video frames) is one of
  None                                  no motion (camera) / the rest pose (pose);
  {"keys": ["w", "ArrowLeft", ...]}     camera keys held during the step (`KEY_BINDINGS`);
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
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from apt2_jax import controls as encoding_lib
# Re-exported for the sampler and the server (`KEY_BINDINGS`, `REST_POSE` go to the browser page).
from apt2_jax.controls import (CAMERA_CONTROLS, CAMERA_LIMITS, CONTROL_TYPES, KEY_BINDINGS,
                               NUM_KEYPOINTS, REST_POSE, WORLD_CONTROL_TYPES)

FRAMES_PER_STEP = encoding_lib.FRAMES_PER_LATENT  # video frames per latent frame (per step)
KEYPOINT_RANGE = (0.0, 1.0)


class ControlError(ValueError):
  """A control (message or file entry) is malformed or out of range; `str()` names the entry."""


# ------------------------------------------------------------------------------------------------
# Control type of a model
# ------------------------------------------------------------------------------------------------


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
  try:
    return encoding_lib.encoding_from_channels(channels)[0]
  except ValueError as e:
    raise ValueError(f"{e}; pass control_type explicitly") from None


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
  """Held keys -> relative camera control per video frame, float32 [5]
  (`apt2_jax.controls.camera_control_from_keys`); raises `ControlError` naming a bad key."""
  if isinstance(keys, str) or not isinstance(keys, (list, tuple)):
    raise ControlError(f"{where}: expected a list of key names, got {keys!r:.80}")
  try:
    return encoding_lib.camera_control_from_keys(keys, where)
  except ValueError as e:
    raise ControlError(str(e)) from None


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


class ControlInput:
  """A user's control for one step -> the raw controls `[B, 4, D]` the stream step takes.

  Validation is `parse_control` (a malformed control raises `ControlError` and changes nothing).
  No control means no motion for a camera and the last pose held for a puppet (the rest pose
  before any was given). The stream step encodes the raw controls into the model's control
  channels (`apt2_jax.controls.frame_group_maps`, the trainer's code). Shared by
  `StreamingGenerator` and the exported bundle's `ExportedStreamer`.
  """

  def __init__(self, kind: str, control_dim: int, batch: int):
    self.kind, self.control_dim, self.batch = kind, int(control_dim), int(batch)
    self.last = None

  def reset(self):
    self.last = None

  def __call__(self, control) -> Optional[np.ndarray]:
    parsed = parse_control(control, self.kind)
    if self.kind == "none":
      return None
    if parsed is None and self.kind == "pose":
      parsed = self.last
    if parsed is None:
      parsed = (np.zeros((FRAMES_PER_STEP, len(CAMERA_CONTROLS)), np.float32) if self.kind == "camera"
                else np.broadcast_to(REST_POSE, (FRAMES_PER_STEP, NUM_KEYPOINTS, 2)))
    if self.kind == "pose":
      self.last = parsed
    raw = np.asarray(parsed, np.float32).reshape(FRAMES_PER_STEP, -1)
    if raw.shape[1] != self.control_dim:
      raise ControlError(f"control: {raw.shape[1]} values per video frame, the model takes {self.control_dim}")
    return np.ascontiguousarray(np.broadcast_to(raw, (self.batch,) + raw.shape))


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
