"""The testbed evaluation: drift metrics on known inputs, the commanded motion and the recent and
known regions against the panorama world's own helpers, the claims logic on hand-made summaries, the stage-1
learning check's predictors, and a tiny end-to-end `evaluate` (random tiny DiT, the
space-to-depth codec, the panorama world)."""
import json
import os

import numpy as np
import pytest

from apt2_jax.data import worlds
from apt2_jax.evaluation import claims, drift, metrics

H = W = 64


def _texture(seed=0, size=160):
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (size // 4, size // 4, 3))
  img = np.kron(coarse, np.ones((4, 4, 1))) + rng.uniform(-20, 20, (size, size, 3))
  return np.clip(img, 0, 255).astype(np.uint8)


def _shifting(dy, dx, frames=9):
  """A texture whose content moves by (dy, dx) pixels per frame: uint8 [frames, 64, 64, 3]."""
  big = _texture()
  return np.stack([big[48 - dy * t:48 - dy * t + H, 48 - dx * t:48 - dx * t + W] for t in range(frames)])


def _metrics(frames, oracle=None, homography=None):
  n = len(frames)
  hs = np.stack([np.eye(3) if homography is None else homography] * n)
  everywhere = np.ones(frames.shape[:3], bool)
  return drift.frame_metrics(frames, frames if oracle is None else oracle, everywhere, hs, known=everywhere), hs


# ------------------------------------------------------------------------------------------------
# Metrics on known inputs
# ------------------------------------------------------------------------------------------------

def test_psnr_recent_known_identical_and_masked():
  video = _shifting(0, 2, 3)
  m, _ = _metrics(video)
  assert np.all(m["psnr_recent"] == metrics.PSNR_CAP) and np.all(m["psnr_known"] == metrics.PSNR_CAP)
  noisy = video.copy()
  noisy[:, :, :32] = 255 - noisy[:, :, :32]           # wrong only on the left half
  right = np.zeros(video.shape[:3], bool)
  right[:, :, 32:] = True                             # the recent and known regions: the right half
  m = drift.frame_metrics(noisy, video, right, np.stack([np.eye(3)] * 3), known=right)
  assert np.all(m["psnr_recent"] == metrics.PSNR_CAP) and np.all(m["recent_fraction"] == 0.5)
  assert np.all(m["psnr_known"] == metrics.PSNR_CAP) and np.all(m["known_fraction"] == 0.5)
  # The same PSNR as `metrics.psnr` on any region; under KNOWN_MIN_FRACTION of the frame: NaN.
  left = ~right
  m = drift.frame_metrics(noisy, video, left, np.stack([np.eye(3)] * 3), known=left)
  np.testing.assert_allclose(m["psnr_known"], metrics.psnr(noisy, video, left), rtol=1e-12)
  np.testing.assert_allclose(m["psnr_recent"], metrics.psnr(noisy, video, left), rtol=1e-12)
  tiny = np.zeros(video.shape[:3], bool)
  tiny[:, :8, :8] = True                              # 1.6% of the frame
  m = drift.frame_metrics(noisy, video, right, np.stack([np.eye(3)] * 3), known=tiny)
  assert np.all(np.isnan(m["psnr_known"])) and np.all(m["known_fraction"] == 64 / 4096)
  # Without a known region psnr_known is undefined.
  assert np.all(np.isnan(drift.frame_metrics(video, video, right, np.stack([np.eye(3)] * 3))["psnr_known"]))


def test_known_shift_gives_ratio_one_and_zero_warp_error():
  dy, dx = 1, 3
  video = _shifting(dy, dx)
  m, hs = _metrics(video, homography=drift.shift_homography(dy, dx))
  commanded = drift.commanded_shift(hs, H, W)
  np.testing.assert_allclose(commanded[1:], [[dy, dx]] * 8)
  assert np.isnan(m["warp_error"][0]) and np.all(np.isnan(m["motion"][0]))
  np.testing.assert_allclose(m["warp_error"][1:], 0.0, atol=1e-9)    # integer shift: exact
  assert drift.motion_ratio(m["motion"][1:], commanded[1:]) == pytest.approx(1.0, abs=0.01)
  # The wrong direction: warp error large, ratio -1.
  m2, _ = _metrics(video, homography=drift.shift_homography(-dy, -dx))
  assert np.nanmin(m2["warp_error"]) > 20
  assert drift.motion_ratio(m["motion"][1:], -commanded[1:]) == pytest.approx(-1.0, abs=0.01)


def test_frozen_video_gives_ratio_zero():
  video = np.repeat(_shifting(0, 0, 1), 6, axis=0)
  m, hs = _metrics(video, homography=drift.shift_homography(0, 3))
  commanded = drift.commanded_shift(hs, H, W)
  np.testing.assert_allclose(commanded[1:], [[0.0, 3.0]] * 5)
  assert drift.motion_ratio(m["motion"][1:], commanded[1:]) == pytest.approx(0.0, abs=1e-6)
  np.testing.assert_array_equal(m["motion_scale"][1:], 0.0)
  # Below the minimum commanded motion there is no ratio (and no estimate).
  assert np.isnan(drift.motion_ratio(m["motion"][1:], commanded[1:] * 0.1))
  m, _ = _metrics(video)
  assert np.all(np.isnan(m["motion_scale"]))


def test_blur_and_colour_drift():
  from scipy import ndimage
  video = _shifting(0, 1, 4)
  blurred = np.stack([ndimage.uniform_filter(f.astype(float), size=(3, 3, 1)) for f in video]).round().astype(np.uint8)
  m, hs = _metrics(blurred, oracle=video)
  s = drift.summarize([m], [drift.commanded_shift(hs, H, W)], 24.0)
  assert s["overall"]["blur"] < 0.5
  assert np.all(drift.laplacian_variance(blurred) < drift.laplacian_variance(video))
  assert drift.summarize([_metrics(video)[0]], [np.zeros((4, 2))], 24.0)["overall"]["blur"] == 1.0
  shifted = np.clip(video.astype(int) + 10, 0, 255).astype(np.uint8)
  want = np.linalg.norm(shifted.reshape(4, -1, 3).mean(1) - video.reshape(4, -1, 3).mean(1), axis=-1)
  np.testing.assert_allclose(drift.colour_drift(shifted, video), want)
  assert 15 < want.mean() <= 10 * np.sqrt(3)


def test_summary_horizon_is_the_one_horizon_rule():
  """`drift.summarize`'s good horizon is `horizon.horizon` (full 1-s windows of generated frames,
  first and last crossing) on the set's mean psnr_known at the fixed `GOOD_PSNR`."""
  from apt2_jax.evaluation import horizon as hz
  fps = 24.0
  curve = np.concatenate([[100.0], np.full(48, 30.0), np.full(48, 10.0)])     # frames 1..48 good
  # The window of frames k+1 .. k+24 falls below 20 once it holds 13 bad frames: k = 37.
  assert hz.horizon(curve, fps, 20.0) == {"first_s": pytest.approx(38 / fps), "last_s": pytest.approx(38 / fps),
                                          "reached_end": False}
  assert hz.horizon(np.full(49, 25.0), fps, 20.0) == {"first_s": 49 / fps, "last_s": 49 / fps, "reached_end": True}
  assert hz.horizon(np.full(49, 15.0), fps, 20.0)["first_s"] == pytest.approx(1 / fps)
  n = len(curve)
  curves = {k: np.full(n, np.nan) for k in drift.FRAME_KEYS}
  curves.update(psnr_known=curve, psnr_recent=curve, motion=np.full((n, 2), np.nan))
  s = drift.summarize([curves, curves], [np.zeros((n, 2))] * 2, fps)
  assert (s["horizon_s"], s["horizon_last_s"], s["horizon_reached_end"]) == (pytest.approx(38 / fps),
                                                                             pytest.approx(38 / fps), False)
  assert s["world_horizons_s"] == [pytest.approx(38 / fps)] * 2 and s["horizon_recent_s"] == pytest.approx(38 / fps)
  assert drift.HORIZON_WINDOW_S == hz.WINDOW_S


def test_horizon_over_frames_without_a_value():
  """Frames without a known region are skipped inside a window; a window with none counts as below
  (nothing good to show); a model good again after such a gap has a last crossing before the end."""
  from apt2_jax.evaluation import horizon as hz
  fps = 24.0
  gap = np.full(100, np.nan)
  # 48 good frames then a gap: the windows keep good frames up to frame 48; the first window holding
  # only gap frames starts at frame 49.
  curve = np.concatenate([[100.0], np.full(48, 30.0), gap, np.full(48, 10.0)])
  h = hz.horizon(curve, fps, 20.0)
  assert h == {"first_s": pytest.approx(49 / fps), "last_s": pytest.approx(49 / fps), "reached_end": False}
  # Good frames around the gap: crossed in the gap, never lost for good (the last window is good).
  curve = np.concatenate([[100.0], np.full(10, 30.0), gap, np.full(10, 30.0)])
  h = hz.horizon(curve, fps, 20.0)
  assert h == {"first_s": pytest.approx(11 / fps), "last_s": len(curve) / fps, "reached_end": False}
  # Bad frames with gaps between them are averaged with each other, not with the gaps.
  curve = np.full(200, np.nan)
  curve[0], curve[1::20] = 100.0, 10.0
  assert hz.horizon(curve, fps, 20.0)["first_s"] == pytest.approx(1 / fps)


def test_summarize_bins_latents_late_and_bursts():
  fps, n = 4.0, 1 + 4 * 5                         # 5 latent frames, 20 generated frames = 5 s
  rng = np.random.default_rng(0)
  curves = {k: rng.uniform(10, 30, n) for k in drift.FRAME_KEYS}
  curves["psnr_known"] = np.arange(n, dtype=float)
  curves["psnr_known"][[5, 6]] = np.nan                # no known region in frames 5, 6
  curves["psnr_recent"] = np.arange(n, dtype=float) + 19
  curves["motion"] = np.tile([[0.0, 5.0]], (n, 1))
  commanded = np.tile([[0.0, 2.0]], (n, 1))
  commanded[10:] = [0.0, 5.0]                      # frames 10.. are bursts
  s = drift.summarize([curves], [commanded], fps, bin_s=2.0)
  assert s["bins"]["start_s"] == [0.0, 2.0, 4.0]
  assert s["bins"]["psnr_recent"] == pytest.approx([23.5, 31.5, 37.5])   # frames 1-8, 9-16, 17-20
  assert s["bins"]["psnr_known"] == pytest.approx([(1 + 2 + 3 + 4 + 7 + 8) / 6, 12.5, 18.5])
  assert s["bins"]["known_frames"] == pytest.approx([6 / 8, 1.0, 1.0])
  assert len(s["per_latent"]["psnr_known"]) == 5
  assert s["per_latent"]["psnr_known"][0] == pytest.approx(2.5)
  assert s["late"]["psnr_known"] == pytest.approx(18.5)                  # the last 20%: 4 frames
  assert s["overall"]["burst_pairs"] == 11 and s["overall"]["motion_ratio_burst"] == pytest.approx(1.0)
  assert s["overall"]["motion_ratio"] == pytest.approx((9 * 10 + 11 * 25) / (9 * 4 + 11 * 25))
  assert s["horizon_s"] == pytest.approx(1 / fps) and s["horizon_reached_end"] is False   # frame 1: 1 dB
  assert s["horizon_metric"] == "psnr_known" and s["world_horizons_s"] == [pytest.approx(1 / fps)]
  # psnr_recent's horizon (secondary): 20, 21, .. never falls below 20.
  assert s["horizon_recent_s"] == pytest.approx(n / fps) and s["horizon_recent_reached_end"] is True


def test_references():
  oracle = _shifting(0, 2, 5)
  np.testing.assert_array_equal(drift.reference_frames(oracle, "copy_last")[1:], oracle[:-1])
  assert np.all(drift.reference_frames(oracle, "frozen_first") == oracle[0])
  with pytest.raises(ValueError):
    drift.reference_frames(oracle, "nope")


# ------------------------------------------------------------------------------------------------
# The panorama world: commanded motion, recent region, the oracle's own figures
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def panorama():
  env = worlds.make_world("panorama", worlds.WorldConfig(height=H, width=W, num_frames=65))
  seed = worlds.split_seed("validation", 0)
  controls = env.random_controls(np.random.default_rng([seed, 1]), 65, trajectory="bursty", seed=seed)
  return env, seed, controls


def test_commanded_motion_and_recent_region_match_the_world(panorama):
  env, seed, controls = panorama
  hs = drift.commanded_homographies(controls, H, W, env.config.fov_deg)
  mine = drift.commanded_shift(hs, H, W)
  theirs = env.image_shift(controls)              # (dy, dx); theirs maps forward, ours backward
  np.testing.assert_allclose(mine, theirs, atol=0.05)
  assert np.abs(mine).max() > drift.BURST_PX      # the bursty trajectory has bursts
  # Two implementations of the recent region: the world's and the rotation-only fallback.
  rotations, _, log_focals = env.poses(controls, seed)
  in_view = drift.rotation_in_view(rotations, log_focals, H, W, env.config.fov_deg)
  want = env.visible_mask(controls, seed, 0, 65, window_frames=8)
  got = drift.windowed_recent(in_view, H, W, 8, 0, 65)
  np.testing.assert_array_equal(got, want)
  assert 0.5 < want.mean() < 1.0
  # The known region (frame 0's) three ways: the world's, window 0 of both recent regions.
  known = env.known_mask(controls, seed)
  np.testing.assert_array_equal(known, env.visible_mask(controls, seed, 0, 65, window_frames=0))
  np.testing.assert_array_equal(known, drift.windowed_recent(in_view, H, W, 0, 0, 65))
  assert known[0].all() and np.all(known <= want) and known.mean() < want.mean()
  # The oracle follows its own controls: warp error ~ resampling, ratio ~ 1 (the estimator's bias).
  oracle = env.render_frames(controls, seed)
  m = drift.frame_metrics(oracle, oracle, want, hs, known=known)
  copy = drift.frame_metrics(drift.reference_frames(oracle, "copy_last")[1:], oracle[1:], want[1:], hs[1:])
  assert np.all(m["psnr_known"][known.mean(axis=(1, 2)) >= 0.05] == metrics.PSNR_CAP)
  assert np.nanmean(m["warp_error"]) < 2.0 < np.nanmean(copy["warp_error"])
  assert drift.motion_ratio(m["motion"][1:], mine[1:]) == pytest.approx(1.0, abs=0.05)
  assert drift.motion_ratio(m["motion"][1:], mine[1:], min_px=drift.BURST_PX) == pytest.approx(1.0, abs=0.05)


def test_eval_sets_are_disjoint_from_training_and_hold_bursts():
  from apt2_jax.evaluation import oracle, run
  config = run.EvalConfig(num_worlds=4, seconds=2.0)
  assert [s.name for s in config.eval_sets] == ["in_distribution", "unseen_appearance"]
  seeds = {}
  for eval_set in config.eval_sets:
    env = config.env(eval_set)
    tws = oracle.eval_worlds(env, eval_set, 4, config.video_frames())
    seeds[eval_set.name] = [t.seed for t in tws]
    assert [t.trajectory for t in tws] == ["bursty_tethered"] + ["wander_tethered"] * 3
    assert [t.caption for t in tws] == [env.caption(t.seed, t.trajectory.split("_")[0]) for t in tws]
    untethered = oracle.eval_worlds(env, eval_set, 4, config.video_frames(), tethered=False)
    assert [t.trajectory for t in untethered] == ["bursty", "wander", "wander", "wander"]
    assert all(np.linalg.norm(t.controls[1:, :2], axis=-1).min() > 0 for t in tws)   # never hovers
    assert {env.appearance(s) for s in seeds[eval_set.name]} == {"seen" if eval_set.split == "validation" else "unseen"}
  assert all(worlds.seed_split(s) != "train" for v in seeds.values() for s in v)
  assert not set(seeds["in_distribution"]) & set(seeds["unseen_appearance"])


# ------------------------------------------------------------------------------------------------
# Claims
# ------------------------------------------------------------------------------------------------

def _summary(horizon=10.0, end=False, late=25.0, burst=0.9, pairs=20, duration=30.0):
  return {"horizon_s": horizon, "horizon_reached_end": end, "duration_s": duration,
          "late": {"psnr_known": late, "psnr_recent": 0.0}, "overall": {"motion_ratio_burst": burst, "burst_pairs": pairs}}


def _cells(by_role, sets=("in_distribution", "unseen_appearance"), seeds=("0", "1")):
  return {s: {seed: dict(by_role) for seed in seeds} for s in sets}


def test_claims_hold_fail_and_not_measurable():
  good = {"aapt": _summary(30.0, True, 26.0, 0.9), "diffusion": _summary(5.0, late=20.0),
          "distilled": _summary(8.0, late=22.0), "aapt_short": _summary(6.0, late=21.0),
          "teacher_forcing": _summary(2.0, late=15.0), "no_recycle": _summary(20.0, burst=0.3)}
  v = claims.evaluate_claims(_cells(good), {"short_clip_s": 1.375})
  assert {k: x["verdict"] for k, x in v.items()} == {"a": claims.HOLDS, "b": claims.HOLDS, "c": claims.HOLDS,
                                                      "d": claims.HOLDS}
  assert v["a"]["cells"][0]["numbers"]["late_margin_vs_distilled_db"] == pytest.approx(4.0)
  # (d) needs a rollout of >= 20x the short clip: 30 s < 20 x 2 s.
  assert claims.evaluate_claims(_cells(good), {"short_clip_s": 2.0})["d"]["verdict"] == claims.UNMEASURABLE
  # A missing role: not measurable, and named.
  partial = {k: x for k, x in good.items() if k != "no_recycle"}
  v = claims.evaluate_claims(_cells(partial), {"short_clip_s": 1.375})
  assert v["c"]["verdict"] == claims.UNMEASURABLE and v["c"]["missing_roles"] == ["no_recycle"]
  # The late margin misses by 0.5 dB: does not hold.
  worse = dict(good, distilled=_summary(8.0, late=24.5))
  assert claims.evaluate_claims(_cells(worse))["a"]["verdict"] == claims.FAILS
  # No bursts: (c) not measurable.
  calm = dict(good, aapt=_summary(30.0, True, 26.0, float("nan"), 0), no_recycle=_summary(burst=float("nan"), pairs=0))
  assert claims.evaluate_claims(_cells(calm))["c"]["verdict"] == claims.UNMEASURABLE


def test_claim_sign_must_hold_in_every_seed_and_set():
  good = {"teacher_forcing": _summary(2.0), "aapt_short": _summary(10.0)}
  cells = _cells(good)
  assert claims.evaluate_claims(cells)["b"]["verdict"] == claims.HOLDS
  # Beyond the in-distribution set only the sign counts: 6 s vs 10 s keeps it (not the 0.5x)...
  cells["unseen_appearance"]["1"] = {"teacher_forcing": _summary(6.0), "aapt_short": _summary(10.0)}
  assert claims.evaluate_claims(cells)["b"]["verdict"] == claims.HOLDS
  # ...which the in-distribution set must meet in full,
  cells["in_distribution"]["1"] = {"teacher_forcing": _summary(6.0), "aapt_short": _summary(10.0)}
  v = claims.evaluate_claims(cells)["b"]
  assert v["per_set"] == {"in_distribution": claims.FAILS, "unseen_appearance": claims.HOLDS}
  assert v["verdict"] == claims.FAILS
  # and a flipped sign in any unseen cell fails it; two horizons of 0 fall back to late psnr_recent.
  cells = _cells(good)
  cells["unseen_appearance"]["1"] = {"teacher_forcing": _summary(12.0), "aapt_short": _summary(10.0)}
  v = claims.evaluate_claims(cells)["b"]
  assert v["verdict"] == claims.FAILS
  assert v["per_set"] == {"in_distribution": claims.HOLDS, "unseen_appearance": claims.FAILS}
  cells["unseen_appearance"]["1"] = {"teacher_forcing": _summary(0.0, late=14.0), "aapt_short": _summary(0.0, late=16.0)}
  assert claims.evaluate_claims(cells)["b"]["verdict"] == claims.HOLDS
  # One seed undecidable (both horizons censored), the rest hold: not measurable, not "holds".
  cells = _cells(good)
  cells["in_distribution"]["1"] = {"teacher_forcing": _summary(30.0, True), "aapt_short": _summary(30.0, True)}
  assert claims.evaluate_claims(cells)["b"]["verdict"] == claims.UNMEASURABLE


def test_censored_horizons():
  assert claims.at_least(30.0, True, 10.0, False, 2.0) is True       # lower bound suffices
  assert claims.at_least(15.0, True, 10.0, False, 2.0) is None       # could be more
  assert claims.at_least(15.0, False, 10.0, False, 2.0) is False
  assert claims.at_least(20.0, False, 30.0, True, 2.0) is False      # b outlived the rollout
  assert claims.at_least(30.0, True, 30.0, True, 2.0) is None
  assert claims.at_least(0.0, False, 0.0, False, 2.0) is False       # two horizons of 0 show nothing
  assert claims.less_than(2.0, False, 30.0, True, 0.5) is True
  assert claims.less_than(20.0, False, 30.0, True, 0.5) is None
  assert claims.less_than(30.0, True, 10.0, False, 0.5) is False
  # A horizon censored before the rollout's end (no known frames after it) is still a lower bound.
  assert claims.at_least(28.0, False, 25.0, True, 2.0) is False     # b >= 25: a < 2 b
  assert claims.at_least(60.0, False, 25.0, True, 2.0) is None      # b may exceed 30
  assert claims.less_than(10.0, True, 30.0, False, 0.5) is None     # a >= 10 may be under 15
  assert claims.less_than(20.0, True, 30.0, False, 0.5) is False


# ------------------------------------------------------------------------------------------------
# The stage-1 learning check and the end-to-end testbed (random tiny DiT, space-to-depth codec)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pixel_spec():
  from apt2_jax import generation
  from apt2_jax.configs import sizes
  from apt2_jax.evaluation import ModelSpec
  from apt2_jax.models import DiTConfig
  from apt2_jax.models import vae as vae_lib
  config = DiTConfig.from_dict(sizes.model_config("tiny", latent_channels=768, control_channels=20,
                                                  caption_vocab_size=64))
  gen = generation.random_generator(config, vae_lib.vae_config("pixels"), control_type="camera", height=H, width=W)
  return ModelSpec(gen)


def test_teacher_forced_check_and_copy_last_predictor(pixel_spec):
  import jax.numpy as jnp
  from apt2_jax.evaluation import learning
  from apt2_jax.generation import stream
  from apt2_jax.models import vae as vae_lib
  clips = learning.in_distribution_clips("panorama", {}, H, W, 17, 2)
  g = pixel_spec.generator
  # Copying the last latent frame, decoded by the lossless codec, is `copy_last_latent_frames`.
  vae = vae_lib.VAE(g.vae_config)
  video = clips[0]["video"]
  z, _ = vae.apply(g.vae_params, stream.from_uint8(jnp.asarray(video))[None], method=vae_lib.VAE.encode)
  copied = np.asarray(stream.to_uint8(vae.apply(g.vae_params, jnp.concatenate([z[:, :1], z[:, :-1]], 1),
                                                method=vae_lib.VAE.decode)))[0]
  np.testing.assert_array_equal(copied, learning.copy_last_latent_frames(video))
  out = learning.teacher_forced_check(g, clips, t=0.5)
  assert out["clips"] == 2 and out["t"] == 0.5
  assert out["copy_last_mse"] > 0 and np.isfinite(out["model_mse"]) and out["mse_ratio"] > 0
  assert 15 < out["copy_last_psnr"] < 60 and out["model_psnr"] < out["copy_last_psnr"]   # random weights lose
  assert out["beats_copy_last"] is False


def test_evaluate_testbed_end_to_end(pixel_spec, tmp_path):
  import jax
  from apt2_jax.evaluation import learning, run
  models = {"aapt": pixel_spec, "diffusion": pixel_spec.with_params(jax.tree.map(lambda x: 0.9 * x, pixel_spec.params))}
  config = run.EvalConfig(roles={"aapt": "aapt", "diffusion": "diffusion"}, num_worlds=1, noise_seeds=(0, 1),
                          seconds=0.5, short_clip_s=0.025, chunk_frames=2, progress=False)
  fake_learning = {"teacher_forced": {"t": 0.5, "model_mse": 1.0, "copy_last_mse": 2.0, "mse_ratio": 0.5,
                                      "model_psnr": 30.0, "copy_last_psnr": 25.0, "beats_copy_last": True},
                   "rollout": learning.rollout_check(pixel_spec, config, chunk_frames=2)}
  report = run.evaluate(models, config, str(tmp_path), learning=fake_learning)
  assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
  assert report["config"]["video_frames"] == 13 and report["config"]["reference_window"] == pixel_spec.dit_config.window
  for set_name in ("in_distribution", "unseen_appearance"):
    s = report["sets"][set_name]
    assert s["worlds"][0]["trajectory"] == "bursty_tethered"
    for name in models:
      assert set(s["models"][name]) == {"0", "1"}
      x = s["models"][name]["0"]
      assert len(x["per_latent"]["psnr_recent"]) == 3 and len(x["bins"]["psnr_recent"]) == 1
      assert len(x["per_latent"]["psnr_known"]) == 3 and x["horizon_metric"] == "psnr_known"
      assert np.isfinite(x["overall"]["psnr_known"]) and x["overall"]["psnr_known"] < 30
      assert np.isfinite(x["overall"]["psnr_recent"]) and x["overall"]["psnr_recent"] < 30
      assert np.isfinite(x["overall"]["warp_error"]) and 0 <= x["horizon_s"] <= 13 / 24 + 1e-5   # 6 digits in JSON
    refs = s["references"]
    assert refs["oracle"]["overall"]["psnr_recent"] == metrics.PSNR_CAP and refs["oracle"]["horizon_reached_end"]
    assert refs["oracle"]["overall"]["psnr_known"] == metrics.PSNR_CAP
    assert refs["oracle"]["overall"]["motion_ratio"] == pytest.approx(1.0, abs=0.1)
    assert refs["frozen_first"]["overall"]["motion_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert refs["one_step_back"]["overall"]["psnr_recent"] > refs["frozen_first"]["overall"]["psnr_recent"]
    assert (tmp_path / report["plots"][set_name]).read_bytes()[:4] == b"\x89PNG"
    for path in report["gifs"][set_name].values():
      assert 0 < os.path.getsize(tmp_path / path) < 1_000_000
  # Noise seeds differ; models differ.
  a = report["sets"]["in_distribution"]["models"]["aapt"]
  assert a["0"]["per_latent"]["psnr_recent"] != a["1"]["per_latent"]["psnr_recent"]
  v = report["claims"]
  from apt2_jax.evaluation import gates
  assert v["a"]["verdict"] == gates.NOT_MEASURED and v["gate2"]["verdict"] == gates.NOT_MEASURED
  text = (tmp_path / "claims.md").read_text()
  assert text.index("## Gates and claims") < text.index("## Drift summaries") and "not measured" in text
  assert report["learning"]["rollout"]["worlds"] == 1 and np.isfinite(report["learning"]["rollout"]["motion_ratio"])
  assert report["criteria"]["drift"]["good_psnr_db"] == 20.0
  assert report["criteria"]["drift"]["horizon_metric"] == "psnr_known"
  assert "psnr_known mean" in text


def test_stage1_learning_check_from_a_workdir(pixel_spec, tmp_path):
  """`stage1_learning_check` on a trainer-style stage-1 workdir (EMA params + saved config)."""
  import ml_collections
  from apt2_jax import checkpointing
  from apt2_jax.configs import sizes
  from apt2_jax.evaluation import learning
  config = ml_collections.ConfigDict({
      "stage": "adapt",
      "model": dict(sizes.model_config("tiny", latent_channels=768, control_channels=20, caption_vocab_size=64)),
      "vae": {"size": "pixels", "checkpoint": ""}, "flow": {"shift": 2.0},
      "eval": {"sample_steps": 2, "sample_shift": 2.0},
      "data": {"world": "panorama", "height": H, "width": W, "frames": 9, "text_len": 16}})
  workdir = str(tmp_path / "adapt")
  manager = checkpointing.make_manager(workdir, save_every=1, keep=1, async_save=False)
  checkpointing.save(manager, 1, {"ema_params": pixel_spec.params}, config=config, force=True)
  manager.wait_until_finished()
  out = learning.stage1_learning_check(workdir, num_clips=1, num_worlds=1)
  assert out["stage"] == "adapt" and out["world"] == "panorama"
  tf, roll = out["teacher_forced"], out["rollout"]
  assert tf["clips"] == 1 and tf["t"] == learning.TEACHER_FORCED_T and tf["beats_copy_last"] is False
  assert roll["num_steps"] == 2 and roll["shift"] == 2.0 and roll["seconds"] == pytest.approx(9 / 24)
  assert roll["oracle_motion_ratio"] == pytest.approx(1.0, abs=0.1) and np.isfinite(roll["motion_ratio"])
  assert "does not beat copying the last frame" in claims.learning_line(out)
