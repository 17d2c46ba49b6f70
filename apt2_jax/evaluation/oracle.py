"""The evaluation worlds, one definition for every world: the fixed evaluation sets, each world's
long trajectory, its oracle, the regions the metrics score and the commanded camera motion.

The oracle is the frame a perfect model draws for given controls: the synthetic worlds render it
exactly, so drift is measured without pretrained metric networks.

Evaluation sets (`EvalSet`, fixed seeds, never training's): `IN_DISTRIBUTION` holds the first
`num_worlds` worlds of the `validation` split (the training appearance and motion distribution;
the gates and claims are measured here). The second set is `UNSEEN_APPEARANCE` (the `test` split:
an unseen palette family, motion drawn as in training) for the panorama and torus worlds and
`HELD_OUT` (the `test` split: unseen textures and the held-out trajectory type and caption words)
for the others (`default_eval_sets`); both are reported separately.

Trajectories (`eval_worlds`, rng `[seed, 1]`, at the rollout's length, never hovering):
  panorama, torus  stratified so that every set holds bursts: the first `ceil(num_worlds x
                   pano_burst_fraction)` (>= 1) worlds are 'bursty', the others 'wander', both the
                   tethered variants (`panorama.TETHERED_TRAJECTORIES`: the same random draws, so
                   training's speed in every frame and its bursts, but beyond 30 degrees from the
                   start view the heading turns back toward it at up to 0.1 rad per frame), so that
                   frame 0's content keeps coming back into view over the whole rollout: the region
                   `psnr_known` scores (`tethered=False`: training's untethered walks). Measured on
                   the first 4 worlds of each set, 30 s at 24 fps: frame 0's region covers 0.45 (in
                   distribution) / 0.42 (unseen appearance) of the pixels on average and 5% or more
                   in 97% / 93% of the frames; untethered 0.14 / 0.15 and 38% / 41%. The
                   per-latent-step commanded motion (|image shift| at the centre from frame 4j-4 to
                   4j, median / 95th percentile) of the tethered types is training's: wander 5.8 /
                   10.0 px vs training clips 5.9 / 10.5, bursty 8.0 / 29.4 vs 7.8 / 27.7
                   (`tests/test_testbed_metrics.py`; `panorama`'s docstring has the turn rates).
  camera           the trajectory type drawn as `World.sample` draws a clip's (the split's pool),
                   continued in segments that stay inside the world's limits (`long_controls`).
  puppet, bouncing the type drawn from the split's pool, the whole length at once.

Regions and motion of a world (`make_target`):
  known       `psnr_known`'s region: the pixels whose ray lies inside frame 0's image. Exact where
              the world has its own test (panorama, torus: `known_mask`; camera: `visible_mask`,
              the frustum test against frame 0's camera); a still camera (puppet, bouncing): the
              whole frame.
  recent      `psnr_recent`'s region for a model of window N: seen in frame 0 or in the 4 N video
              frames before (the world's `visible_mask` where it has one, else a rotation-only
              camera from its poses, else the whole frame).
  commanded   the commanded camera motion: homographies and the centre's image shift (the world's
              exact `image_shift` where it has one); zero for a still camera.
  warp        the world's exact warp (torus): the warp references exist only where it does.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from apt2_jax.controls import WORLD_CONTROL_TYPES
from apt2_jax.data import captions
from apt2_jax.data import worlds as worlds_lib
from apt2_jax.evaluation import camera_motion
from apt2_jax.generation.stream import FRAMES_PER_STEP as FRAMES_PER_LATENT


@dataclasses.dataclass
class TestWorld:
  """One evaluation world and its trajectory. `controls` float32 [video_frames, control_dim]."""
  index: int
  seed: int
  trajectory: str
  caption: str
  text_tokens: np.ndarray
  controls: np.ndarray
  hover_segments: int = 0   # camera: segments that had to hover (no trajectory fitted; expected 0)


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """One evaluation set: worlds `split_seed(split, first_index + k)`, k < num_worlds, with
  `WorldConfig` overrides `world_config` (e.g. `pano_appearance`)."""
  name: str
  split: str
  first_index: int = 0
  world_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)


IN_DISTRIBUTION = EvalSet("in_distribution", "validation")
UNSEEN_APPEARANCE = EvalSet("unseen_appearance", "test")
HELD_OUT = EvalSet("held_out", "test")
EVAL_SETS = {s.name: s for s in (IN_DISTRIBUTION, UNSEEN_APPEARANCE, HELD_OUT)}
SET_ROLES = {"in_distribution": "worlds drawn like training's (training appearance, trajectory types and caption "
                                "words; validation seeds): the gates and claims",
             "unseen_appearance": "an unseen palette family (test seeds), motion as in training",
             "held_out": "generalisation: test-split worlds (unseen textures, the held-out trajectory type and "
                         "their caption words)"}
PANORAMA_WORLDS = ("panorama", "torus")


def default_eval_sets(world: str) -> tuple[EvalSet, EvalSet]:
  """In distribution first (the gates and claims), then the world's generalisation set."""
  return (IN_DISTRIBUTION, UNSEEN_APPEARANCE if world in PANORAMA_WORLDS else HELD_OUT)


def world_fields(options: Optional[Mapping[str, Any]]) -> dict:
  """`WorldConfig` overrides with lists made tuples (as a JSON or ml_collections config gives them)."""
  return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(options or {}).items()}


def make_env(world: str, eval_set: EvalSet, height: int, width: int, num_frames: int,
             world_config: Optional[Mapping[str, Any]] = None):
  """The world of an evaluation set: `WorldConfig` of `num_frames` video frames, the shared
  `world_config` overrides, then the set's."""
  wcfg = worlds_lib.WorldConfig(height=height, width=width, num_frames=num_frames,
                                **{**world_fields(world_config), **world_fields(eval_set.world_config)})
  return worlds_lib.make_world(world, wcfg)


# ------------------------------------------------------------------------------------------------
# Trajectories
# ------------------------------------------------------------------------------------------------


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


def _trajectory(env, rng, split: str, k: int, num_worlds: int, tethered: bool = True) -> str:
  """World k's trajectory type: panorama and torus stratified (bursty first), tethered unless
  `tethered` is False; other worlds drawn from the split's pool as `World.sample` draws it (this
  consumes `rng`, as `sample` does, before the controls)."""
  if env.name in PANORAMA_WORLDS:
    fraction = env.config.pano_burst_fraction
    bursty = max(1, math.ceil(num_worlds * fraction)) if fraction > 0 else 0
    base = "bursty" if k < bursty else "wander"
    return f"{base}_tethered" if tethered else base
  pool = env.trajectory_pools[split]
  return str(pool[rng.integers(len(pool))])


def eval_worlds(env, eval_set: EvalSet, num_worlds: int, num_frames: int, fps: float = 24.0,
                tethered: bool = True) -> list[TestWorld]:
  """The set's worlds with their trajectories of `num_frames` video frames (module docstring)."""
  out = []
  for k in range(num_worlds):
    seed = worlds_lib.split_seed(eval_set.split, eval_set.first_index + k)
    rng = np.random.default_rng([seed, 1])
    trajectory = _trajectory(env, rng, worlds_lib.seed_split(seed), k, num_worlds, tethered)
    if env.name in PANORAMA_WORLDS:
      controls, hover = np.asarray(env.random_controls(rng, num_frames, trajectory=trajectory, seed=seed),
                                   np.float32), 0
    else:
      controls, hover = long_controls(env, rng, num_frames, seed, trajectory, fps=fps)
    caption = env.caption(seed, trajectory)
    out.append(TestWorld(k, seed, trajectory, caption, captions.tokenize(caption), controls, hover))
  return out


# ------------------------------------------------------------------------------------------------
# The oracle, the regions, the commanded motion
# ------------------------------------------------------------------------------------------------


def render_oracle(world, controls, seed: int, start: int, stop: int) -> np.ndarray:
  """Oracle frames `[start, stop)` of `controls`, uint8 `[stop - start, H, W, 3]`.

  The panorama and torus worlds render any range (`render_frames`), the camera world frame by frame
  from the composed poses and the puppet world from each frame's keypoints, so a chunk costs only
  its own frames; other worlds render the prefix.
  """
  if hasattr(world, "render_frames"):
    return world.render_frames(controls, seed, start, stop)
  if world.name == "camera":
    scene = world._scene(seed)  # pylint: disable=protected-access
    rotations, positions, log_focals = world.poses(controls[:stop], seed)
    frames = [world._render_frame(scene, rotations[t], positions[t], log_focals[t])  # pylint: disable=protected-access
              for t in range(start, stop)]
    return np.clip(np.round(np.stack(frames) * 255.0), 0, 255).astype(np.uint8)
  if world.name == "puppet":
    return world.render(controls[start:stop], seed)
  return world.render(controls[:stop], seed)[start:]


def _moves(env) -> bool:
  """Does the world's camera move under its controls?"""
  return WORLD_CONTROL_TYPES.get(env.name) == "camera" and hasattr(env, "poses")


def recent_mask(env, controls, seed: int, window: int) -> np.ndarray:
  """The `psnr_recent` region of every frame for a model of `window` latent frames: bool [T, H, W].
  The world's exact `visible_mask` when it has one (panorama), else a rotation-only camera from its
  `poses` (exact without translation), else the whole frame."""
  n, cfg = len(controls), env.config
  frames = FRAMES_PER_LATENT * int(window)
  if hasattr(env, "visible_mask"):
    return env.visible_mask(controls, seed, 0, n, window_frames=frames)
  if _moves(env):
    rotations, _, log_focals = env.poses(controls, seed)
    in_view = camera_motion.rotation_in_view(rotations, log_focals, cfg.height, cfg.width, cfg.fov_deg)
    return camera_motion.windowed_recent(in_view, cfg.height, cfg.width, frames, 0, n)
  return np.ones((n, cfg.height, cfg.width), bool)


def known_mask(env, controls, seed: int) -> np.ndarray:
  """The `psnr_known` region of every frame: the pixels whose ray lies inside frame 0's image (what
  a model given only frame 0 can know), bool [T, H, W]. The world's exact `known_mask` when it has
  one (panorama: `visible_mask` with window_frames = 0), the camera world's frustum test against
  frame 0 (`visible_mask`), else the whole frame (a still camera)."""
  n, cfg = len(controls), env.config
  if hasattr(env, "known_mask"):
    return env.known_mask(controls, seed, 0, n)
  if env.name == "camera":
    return visible_mask(env, controls, seed, 0, n)
  return np.ones((n, cfg.height, cfg.width), bool)


@dataclasses.dataclass
class Target:
  """A world's oracle uint8 [T, H, W, 3], commanded homographies [T, 3, 3] (frame t's pixels ->
  frame t-1's) and centre shifts [T, 2], the `psnr_recent` regions bool [T, H, W] per window
  (latent frames), the `psnr_known` region bool [T, H, W], the world's exact warp (or None) and
  the puppet world's background (or None: `metrics.figure_metrics`)."""
  oracle: np.ndarray
  homographies: np.ndarray
  commanded: np.ndarray
  recent: dict
  known: Optional[np.ndarray] = None
  warp: Optional[Callable] = None     # (frame, source, target) -> frame: the world's exact warp
  background: Optional[np.ndarray] = None


def make_target(env, tw: TestWorld, windows: Sequence[int]) -> Target:
  """The oracle, the commanded motion (the world's own `image_shift` when it has one, panorama;
  else `camera_motion.commanded_shift`; none for a still camera), the recent regions and the known
  region of one world."""
  cfg, n = env.config, len(tw.controls)
  if _moves(env):
    homographies = camera_motion.commanded_homographies(tw.controls, cfg.height, cfg.width, cfg.fov_deg)
    commanded = (env.image_shift(tw.controls) if hasattr(env, "image_shift")
                 else camera_motion.commanded_shift(homographies, cfg.height, cfg.width))
  else:
    homographies, commanded = np.tile(np.eye(3), (n, 1, 1)), np.zeros((n, 2))
  warp = functools.partial(_world_warp, env, np.asarray(tw.controls)) if hasattr(env, "warp") else None
  return Target(render_oracle(env, tw.controls, tw.seed, 0, n), homographies, np.asarray(commanded, np.float64),
                {w: recent_mask(env, tw.controls, tw.seed, w) for w in sorted(set(windows))},
                known_mask(env, tw.controls, tw.seed), warp, world_background(env, tw.seed))


def _world_warp(env, controls, frame, source: int, target: int):
  return env.warp(frame, controls, source, target)


def world_background(world, seed: int) -> Optional[np.ndarray]:
  """Puppet world: the background alone (every keypoint rendered far off screen), uint8."""
  if world.name != "puppet":
    return None
  return world.render(np.full((1, world.control_dim), -10.0, np.float32), seed)[0]


def visible_mask(world, controls, seed: int, start: int, stop: int) -> np.ndarray:
  """Pixels of frames `[start, stop)` whose world point was in view in frame 0: bool [T, H, W].

  Camera world (the known region): a pixel of frame t is in it when every surface its ray meets
  (the ground and the canopy/cloud layers in front of it; the sky direction when it misses the
  ground) projects inside frame 0's image, in front of camera 0. Computed exactly from the world's
  poses and pinhole rays; a view-frustum test, so points hidden in frame 0 by the semi-transparent
  canopy still count as seen. Other worlds have a still camera: all True.
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
