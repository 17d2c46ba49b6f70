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
  hover_segments: int = 0   # camera: segments that had to hover (no trajectory fitted; expected 0)


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


SEGMENT_FRAMES = 16   # camera: a long trajectory is drawn (and checked) 16 video frames at a time


def long_controls(world, rng: np.random.Generator, num_frames: int, seed: int, trajectory: str,
                  segment_frames: int = SEGMENT_FRAMES, fps: float = 24.0) -> tuple[np.ndarray, int]:
  """A trajectory of `num_frames` video frames for a long rollout: (controls, hover segments).

  The camera world's `random_controls` checks its limits (altitude, tilt, zoom) from the start
  pose over the whole length, which a minute-long random walk almost never satisfies (it then
  returns a still camera). So the camera's trajectory continues training's AR(1) rates
  (`CameraWorld.continue_controls`: the same means, stds and smoothness, no damping) in
  `segment_frames` segments, each redrawn from the pose the previous ones reached until it
  stays inside the limits (turning back near a limit). When no draw fits, the rates restart
  as a fresh training clip's; a segment that still fits nowhere would hover (counted; the tests
  check that it does not happen). Other worlds draw the whole length at once. A shorter run's
  controls are a prefix of a longer run's (same rng draws, segment by segment). `fps` is unused
  (kept for callers).
  """
  del fps
  if world.name != "camera":
    return np.asarray(world.random_controls(rng, num_frames, trajectory=trajectory, seed=seed),
                      np.float32), 0
  scene = world._scene(seed)  # pylint: disable=protected-access
  rotation, position, log_focal = scene["rotation"], scene["position"], 0.0
  parts, state, hover, total = [np.zeros((1, 5), np.float32)], None, 0, 1
  while total < num_frames:
    drawn = None
    for start_state in (state, None) if state is not None else (None,):
      drawn = world.continue_controls(rng, segment_frames, trajectory=trajectory,
                                      start=(rotation, position, log_focal), state=start_state)
      if drawn is not None:
        break
    if drawn is None:
      c, state, hover = np.zeros((segment_frames, 5), np.float32), None, hover + 1
    else:
      c, state = drawn
    rotations, positions, log_focals = worlds_lib.compose_camera(c, rotation, position, log_focal)
    rotation, position, log_focal = rotations[-1], positions[-1], float(log_focals[-1])
    parts.append(c)
    total += len(c)
  return np.concatenate(parts)[:num_frames], hover


EVAL_SPLITS = {"in_distribution": "validation", "held_out": "test"}
"""The evaluation sets and their seed splits. `in_distribution`: worlds drawn like training's (the
training texture and trajectory pools, so the trained caption words; other seeds than the
training pool's); `held_out`: the test split (unseen textures, the held-out 'spiral' trajectory
and their caption words)."""


def eval_worlds(world, num_worlds: int, num_frames: int, fps: float = 24.0,
                split: str = "test") -> list[TestWorld]:
  """The first `num_worlds` worlds of `split`, each with a long trajectory whose type is drawn as
  `World.sample` draws a clip's (rng `[seed, 1]`, the split's trajectory pool)."""
  out = []
  for k in range(num_worlds):
    seed = worlds_lib.split_seed(split, k)
    rng = np.random.default_rng([seed, 1])
    pool = world.trajectory_pools[worlds_lib.seed_split(seed)]
    trajectory = str(pool[rng.integers(len(pool))])
    controls, hover = long_controls(world, rng, num_frames, seed, trajectory, fps=fps)
    caption = world.caption(seed, trajectory)
    out.append(TestWorld(k, seed, trajectory, caption, captions.tokenize(caption), controls, hover))
  return out


def held_out_worlds(world, num_worlds: int, num_frames: int, fps: float = 24.0) -> list[TestWorld]:
  """The first `num_worlds` worlds of the held-out `test` split, each with a long trajectory."""
  return eval_worlds(world, num_worlds, num_frames, fps, split="test")


def latent_step_motion(frames) -> np.ndarray:
  """|image translation| (pixels, `phase_correlation`) per latent step of a clip `[1+4k, H, W, 3]`:
  video frames 4j-4 -> 4j, j = 1..k. `[k]`."""
  from apt2_jax.evaluation.metrics import phase_correlation
  k = (len(frames) - 1) // 4
  return np.array([np.linalg.norm(phase_correlation(np.asarray(frames[4 * j - 4]), np.asarray(frames[4 * j])))
                   for j in range(1, k + 1)])


def training_motion(world, num_clips: int = 16, clip_frames: int = 17) -> np.ndarray:
  """`latent_step_motion` of the first `num_clips` training clips (`World.sample` of the `train`
  split, `clip_frames` frames), concatenated: the motion the models were trained on."""
  out = [latent_step_motion(world.sample(worlds_lib.split_seed("train", i), num_frames=clip_frames)["video"])
         for i in range(num_clips)]
  return np.concatenate(out) if out else np.zeros(0)


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
