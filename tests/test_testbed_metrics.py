"""The testbed evaluation's region and motion estimate (`apt2_jax.evaluation.drift`, `oracle`):

* `psnr_known`'s region is frame 0's image (what a model given only frame 0 can know), and the
  tethered evaluation trajectories keep it in view with training's local motion;
* the motion estimate (`drift.motion_scales`) reads the commanded motion through the PCA codec,
  whose static 8-px block edges made the former phase correlation read ~0 even for the oracle.

Fast (no model): a few short rendered clips and control trajectories.
"""
import types

import numpy as np
import pytest

from apt2_jax.data import panorama, worlds
from apt2_jax.evaluation import drift, references

H = W = 64


@pytest.fixture(scope="module")
def env():
  return worlds.make_world("panorama", worlds.WorldConfig(height=H, width=W, num_frames=97))


@pytest.fixture(scope="module")
def pca_roundtrip():
  """uint8 video -> the same through the PCA codec (VAE size `pixels_pca`), the evaluation's path."""
  from apt2_jax.models import vae as vae_lib
  generator = types.SimpleNamespace(vae_config=vae_lib.vae_config("pixels_pca"), vae_params={"params": {}})
  return references.codec_roundtrip(generator)


def _controls(env, index, trajectory, frames, split="validation"):
  seed = worlds.split_seed(split, index)
  return seed, env.random_controls(np.random.default_rng([seed, 1]), frames, trajectory=trajectory, seed=seed)


def _angle_from_start(env, controls, seed):
  rotations, _, _ = env.poses(controls, seed)
  return np.degrees(np.arccos(np.clip(rotations[:, :, 2] @ rotations[0, :, 2], -1, 1)))


# ------------------------------------------------------------------------------------------------
# Tethered trajectories and the known region
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trajectory", panorama.TRAJECTORIES)
def test_tethered_trajectory_is_training_until_the_leash(env, trajectory):
  """The same draws: identical controls until the view first leaves the leash, the same speed in
  every frame (only the heading is steered), and the same caption."""
  for index in range(3):
    seed, free = _controls(env, index, trajectory, 481)
    _, tethered = _controls(env, index, f"{trajectory}_tethered", 481)
    out = np.nonzero(_angle_from_start(env, free, seed) > panorama.TETHER_LEASH_DEG)[0]
    first = out[0] if len(out) else len(free)
    np.testing.assert_array_equal(tethered[:first + 1], free[:first + 1])
    np.testing.assert_allclose(np.linalg.norm(tethered[:, :2], axis=-1), np.linalg.norm(free[:, :2], axis=-1),
                               rtol=1e-5)
    assert env.caption(seed, f"{trajectory}_tethered") == env.caption(seed, trajectory)
    # Steered back: the tethered view stays near the start view, the free walk roams.
    assert np.percentile(_angle_from_start(env, tethered, seed), 50) < panorama.TETHER_LEASH_DEG + 15


def test_known_region_is_frame_zero_and_tethering_keeps_it_in_view(env):
  """30 s at 24 fps on the evaluation worlds: frame 0's region covers a large share of the pixels
  with the tethered trajectories, far more than with training's free walks."""
  frames = 721
  tethered, free = [], []
  for index in range(4):
    trajectory = "bursty" if index == 0 else "wander"
    seed, c = _controls(env, index, f"{trajectory}_tethered", frames)
    known = env.known_mask(c, seed)
    assert known.shape == (frames, H, W) and known[0].all()
    tethered.append(known.mean(axis=(1, 2))[1:])
    seed, c = _controls(env, index, trajectory, frames)
    free.append(env.known_mask(c, seed).mean(axis=(1, 2))[1:])
  tethered, free = np.concatenate(tethered), np.concatenate(free)
  assert tethered.mean() > 0.3 and tethered.mean() > 2 * free.mean(), (tethered.mean(), free.mean())
  assert (tethered >= drift.KNOWN_MIN_FRACTION).mean() > 0.8
  # Its window-0 recent region is the same region.
  np.testing.assert_array_equal(env.known_mask(c, seed, 100, 140), env.visible_mask(c, seed, 100, 140, 0))


def test_tethered_motion_is_training_motion(env):
  """The per-latent-step commanded motion (|image shift| from frame 4j-4 to 4j) of the tethered
  types: that of the same draws untethered (the speeds are identical; only the heading differs),
  and training's median and 95th percentile (training clips: `sample`'s draws, 37 frames)."""
  def steps(controls):
    return np.linalg.norm(env.latent_shift(controls)[1:], axis=-1)
  train = {t: [] for t in panorama.TRAJECTORIES}
  for i in range(300):
    seed = worlds.split_seed("train", i)
    rng = np.random.default_rng([seed, 1])
    trajectory = env._pick_trajectory(rng, seed)  # pylint: disable=protected-access
    train[trajectory].append(steps(env.random_controls(rng, 37, trajectory=trajectory, seed=seed)))
  for trajectory in panorama.TRAJECTORIES:
    ours = np.concatenate([steps(_controls(env, i, f"{trajectory}_tethered", 721)[1]) for i in range(6)])
    free = np.concatenate([steps(_controls(env, i, trajectory, 721)[1]) for i in range(6)])
    theirs = np.concatenate(train[trajectory])
    for q in (50, 95):
      a, b, c = np.percentile(ours, q), np.percentile(free, q), np.percentile(theirs, q)
      assert abs(a - b) < 0.03 * b, (trajectory, q, a, b)
      assert abs(a - c) < (0.1 if q == 50 else 0.15) * c, (trajectory, q, a, c)   # 300 clips: ~75 bursty


# ------------------------------------------------------------------------------------------------
# The motion estimate through the PCA codec
# ------------------------------------------------------------------------------------------------


def test_homography_power_scales_the_rotation():
  """`K R K^-1` to the power alpha is `K R^alpha K^-1` (the rotation vector scaled by alpha)."""
  from scipy.spatial.transform import Rotation
  from apt2_jax.data.worlds import relative_rotation
  rotation = relative_rotation(0.12, -0.05, 0.02)
  full = drift.relative_homography(rotation, H, W, 60.0)
  alphas = np.array([0.0, 0.35, 1.0, 1.6])
  got = drift.homography_power(full[None], alphas)[0]
  for alpha, h in zip(alphas, got):
    scaled = Rotation.from_rotvec(alpha * Rotation.from_matrix(rotation).as_rotvec()).as_matrix()
    want = drift.relative_homography(scaled, H, W, 60.0)
    np.testing.assert_allclose(h / h[2, 2], want / want[2, 2], atol=1e-9)
  # A pure translation (defective) falls back to the exact interpolation.
  np.testing.assert_allclose(drift.homography_power(drift.shift_homography(2, -4)[None], [0.5])[0, 0],
                             drift.shift_homography(1, -2), atol=1e-12)


@pytest.mark.parametrize("trajectory", ("wander_tethered", "bursty_tethered", "wander", "bursty"))
def test_motion_ratio_through_the_pca_codec(env, pca_roundtrip, trajectory):
  """The oracle through the codec reads ~1, a frozen video ~0, half the commanded speed ~0.5, noise
  ~0 (the former phase-correlation estimate read 0.03 for the oracle through this codec)."""
  seed, controls = _controls(env, 0, trajectory, 97)
  hs = drift.commanded_homographies(controls, H, W, env.config.fov_deg)
  commanded = env.image_shift(controls)
  oracle = env.render_frames(controls, seed)
  half = controls.copy()
  half[:, :2] *= 0.5
  noise = np.random.default_rng(0).integers(0, 256, oracle.shape).astype(np.uint8)
  videos = {"oracle": oracle, "frozen": drift.reference_frames(oracle, "frozen_first"),
            "half": env.render_frames(half, seed), "noise": noise}
  everywhere = np.ones(oracle.shape[:3], bool)
  ratio, burst = {}, {}
  for name, video in videos.items():
    m = drift.frame_metrics(pca_roundtrip(video), oracle, everywhere, hs, known=everywhere)
    ratio[name] = drift.motion_ratio(m["motion"][1:], commanded[1:])
    burst[name] = drift.motion_ratio(m["motion"][1:], commanded[1:], min_px=drift.BURST_PX)
  assert 0.85 <= ratio["oracle"] <= 1.15 and ratio["frozen"] < 0.1 and 0.35 <= ratio["half"] <= 0.65, ratio
  assert abs(ratio["noise"]) < 0.1, ratio     # no coherent content: no motion (the correlation gate)
  if trajectory.startswith("bursty"):
    assert 0.85 <= burst["oracle"] <= 1.15 and burst["frozen"] < 0.1 and 0.35 <= burst["half"] <= 0.65, burst


def test_chunked_curves_equal_the_whole_video(env, pca_roundtrip):
  """Scoring a video chunk by chunk as a stream delivers it (frame 0, then 4 frames per latent step;
  the last 4 frames and their homographies as `previous`) equals scoring it whole, as does
  `DriftCurves`: the motion estimate carries its 4 frames of context."""
  seed, controls = _controls(env, 1, "bursty_tethered", 41)
  hs = drift.commanded_homographies(controls, H, W, env.config.fov_deg)
  oracle = env.render_frames(controls, seed)
  video = pca_roundtrip(drift.reference_frames(oracle, "copy_last"))
  recent = env.visible_mask(controls, seed, 0, 41, 8)
  known = env.known_mask(controls, seed)
  whole = drift.frame_metrics(video, oracle, recent, hs, known=known)
  acc, parts = drift.DriftCurves(), []
  for a, b in [(0, 1)] + [(1 + 4 * j, 5 + 4 * j) for j in range(10)]:
    acc.add(video[a:b], oracle[a:b], recent[a:b], hs[a:b], known[a:b])
    c = max(0, a - drift.MOTION_STRIDE)
    parts.append(drift.frame_metrics(video[a:b], oracle[a:b], recent[a:b], hs[a:b], video[c:a] if a else None,
                                     known[a:b], hs[c:a]))
  chunked = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  assert set(chunked) == set(whole) == set(drift.FRAME_KEYS) | {"motion"}
  for key in whole:
    np.testing.assert_allclose(chunked[key], whole[key], rtol=1e-9, atol=1e-9, err_msg=key)
    np.testing.assert_array_equal(acc.result()[key], whole[key], err_msg=key)
  assert np.isnan(whole["motion_scale"][0]) and np.isfinite(whole["motion_scale"][1:]).mean() > 0.9
  # With only the frame before as context (no homographies), frames 2-4 of a chunk reach back less.
  single = drift.frame_metrics(video[5:9], oracle[5:9], recent[5:9], hs[5:9], video[4], known[5:9])
  np.testing.assert_allclose(single["motion_scale"][-1], whole["motion_scale"][8], rtol=1e-9)
