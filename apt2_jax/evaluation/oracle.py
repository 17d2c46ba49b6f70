"""The held-out test worlds: long control trajectories, the oracle, the region visible in frame 0.

The oracle is the frame a perfect model draws for given controls: the synthetic worlds render it
exactly, so drift and control error are measured without pretrained metric networks.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from apt2_jax.data import captions
from apt2_jax.data import worlds as worlds_lib


@dataclasses.dataclass
class TestWorld:
  """One held-out world and its trajectory. `controls` float32 [video_frames, control_dim]."""
  index: int
  seed: int
  trajectory: str
  caption: str
  text_tokens: np.ndarray
  controls: np.ndarray
  hover_segments: int = 0   # camera: 10 s segments that had to hover (no trajectory fitted)


def _camera_within_limits(world, controls, rotation, position, log_focal) -> bool:
  cfg = world.config
  if np.any(np.abs(controls) > worlds_lib.CAMERA_CONTROL_LIMITS * max(cfg.speed, 1.0)):
    return False
  rotations, positions, log_focals = worlds_lib.compose_camera(controls, rotation, position, log_focal)
  off_nadir = np.arccos(np.clip(-rotations[:, 2, 2], -1, 1))
  lo, hi = cfg.altitude_range
  return bool(np.all(off_nadir <= cfg.max_off_nadir) and np.all(positions[:, 2] >= lo)
              and np.all(positions[:, 2] <= hi) and np.all(log_focals >= cfg.zoom_range[0])
              and np.all(log_focals <= cfg.zoom_range[1]))


def long_controls(world, rng: np.random.Generator, num_frames: int, seed: int, trajectory: str,
                  segment_s: float = 10.0, fps: float = 24.0) -> tuple[np.ndarray, int]:
  """A trajectory of `num_frames` video frames for a long rollout: (controls, hover segments).

  The camera world's `random_controls` checks its limits (altitude, tilt, zoom) from the start
  pose over the whole length, which a minute-long random walk almost never satisfies (it then
  returns a still camera). So the camera's trajectory is drawn in `segment_s` segments, each
  continuing from the pose the previous ones reached and redrawn until it stays inside the
  limits (a segment that never does hovers). Other worlds draw the whole length at once. A
  shorter run's controls are a prefix of a longer run's (same rng draws, segment by segment).
  """
  if world.name != "camera":
    return np.asarray(world.random_controls(rng, num_frames, trajectory=trajectory, seed=seed),
                      np.float32), 0
  scene = world._scene(seed)  # pylint: disable=protected-access
  rotation, position, log_focal = scene["rotation"], scene["position"], 0.0
  seg = max(1, int(round(segment_s * fps)))
  parts, hover = [np.zeros((1, 5), np.float32)], 0
  while sum(len(p) for p in parts) < num_frames:
    for _ in range(8):
      c = np.asarray(world.random_controls(rng, seg + 1, trajectory=trajectory, seed=seed),
                     np.float32)[1:]
      if np.any(c) and _camera_within_limits(world, c, rotation, position, log_focal):
        break
    else:
      c, hover = np.zeros((seg, 5), np.float32), hover + 1
    rotations, positions, log_focals = worlds_lib.compose_camera(c, rotation, position, log_focal)
    rotation, position, log_focal = rotations[-1], positions[-1], float(log_focals[-1])
    parts.append(c)
  return np.concatenate(parts)[:num_frames], hover


def held_out_worlds(world, num_worlds: int, num_frames: int, fps: float = 24.0) -> list[TestWorld]:
  """The first `num_worlds` worlds of the held-out `test` split, each with a long trajectory."""
  out = []
  for k in range(num_worlds):
    seed = worlds_lib.split_seed("test", k)
    rng = np.random.default_rng([seed, 1])
    pool = world.trajectory_pools[worlds_lib.seed_split(seed)]
    trajectory = str(pool[rng.integers(len(pool))])
    controls, hover = long_controls(world, rng, num_frames, seed, trajectory, fps=fps)
    caption = world.caption(seed, trajectory)
    out.append(TestWorld(k, seed, trajectory, caption, captions.tokenize(caption), controls, hover))
  return out


def render_oracle(world, controls, seed: int, start: int, stop: int) -> np.ndarray:
  """Oracle frames `[start, stop)` of `controls`, uint8 `[stop - start, H, W, 3]`.

  The camera world renders frame by frame from the composed poses and the puppet world from each
  frame's keypoints, so a chunk costs only its own frames; other worlds render the prefix
  (`evaluate_models` renders them in one call).
  """
  if world.name == "camera":
    scene = world._scene(seed)  # pylint: disable=protected-access
    rotations, positions, log_focals = world.poses(controls[:stop], seed)
    frames = [world._render_frame(scene, rotations[t], positions[t], log_focals[t])  # pylint: disable=protected-access
              for t in range(start, stop)]
    return np.clip(np.round(np.stack(frames) * 255.0), 0, 255).astype(np.uint8)
  if world.name == "puppet":
    return world.render(controls[start:stop], seed)
  return world.render(controls[:stop], seed)[start:]


def world_background(world, seed: int) -> Optional[np.ndarray]:
  """Puppet world: the background alone (every keypoint rendered far off screen), uint8."""
  if world.name != "puppet":
    return None
  return world.render(np.full((1, world.control_dim), -10.0, np.float32), seed)[0]


def visible_mask(world, controls, seed: int, start: int, stop: int) -> np.ndarray:
  """Pixels of frames `[start, stop)` whose world point was in view in frame 0: bool [T, H, W].

  Camera world only (`report.DEFINITIONS`); other worlds have a still camera: all True.
  """
  cfg = world.config
  shape = (stop - start, cfg.height, cfg.width)
  if world.name != "camera":
    return np.ones(shape, bool)
  heights = getattr(worlds_lib, "_LAYER_HEIGHTS", (0.0, 0.3, 0.9))
  rotations, positions, log_focals = world.poses(controls[:stop], seed)
  r0, p0 = rotations[0], positions[0]
  focal0 = 0.5 * cfg.width / np.tan(np.deg2rad(cfg.fov_deg) / 2) * np.exp(log_focals[0])

  def in_view0(camera_coords):  # [H, W, 3] in camera 0's frame
    z = camera_coords[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
      u = focal0 * camera_coords[..., 0] / z
      v = focal0 * camera_coords[..., 1] / z
    return (z > 1e-9) & (np.abs(u) <= cfg.width / 2) & (np.abs(v) <= cfg.height / 2)

  out = np.empty(shape, bool)
  for i, t in enumerate(range(start, stop)):
    rays = world.pixel_rays(log_focals[t]) @ rotations[t].T  # world directions [H, W, 3]
    position = positions[t]
    visible = np.ones(shape[1:], bool)
    ground_hit = np.zeros(shape[1:], bool)
    for height in heights:
      with np.errstate(divide="ignore", invalid="ignore"):
        s = (height - position[2]) / rays[..., 2]
      hit = np.isfinite(s) & (s > 1e-6)
      if height == heights[0]:
        ground_hit = hit
      points = position + np.where(hit, s, 0.0)[..., None] * rays
      visible &= ~hit | in_view0((points - p0) @ r0)
    # Rays that miss the ground end in the sky, which is at infinity: only the direction counts.
    visible &= ground_hit | in_view0(rays @ r0)
    out[i] = visible
  return out
