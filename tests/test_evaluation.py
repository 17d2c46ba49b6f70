"""Evaluation: metric functions on known inputs, the oracle helpers, chunked streaming == one
rollout == the `StreamingGenerator` step by step, and a tiny end-to-end `evaluate_models` (random
tiny DiT + tiny VAE, 32x32, 3 latent frames)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt2_jax import evaluate as evaluate_cli
from apt2_jax import evaluation
from apt2_jax.data import worlds

H = W = 32


def _texture(seed=0, size=32):
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (size // 4, size // 4, 3))
  img = np.kron(coarse, np.ones((4, 4, 1))) + rng.uniform(-20, 20, (size, size, 3))
  return np.clip(img, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------

def test_psnr_known_values():
  a = np.full((2, 8, 8, 3), 100, np.uint8)
  b = a + np.uint8(5)
  np.testing.assert_allclose(evaluation.psnr(a, b), 20 * np.log10(255 / 5), rtol=1e-9)
  assert np.all(np.isinf(evaluation.psnr(a, a)))
  assert np.all(evaluation.psnr(a, a, cap=evaluation.PSNR_CAP) == evaluation.PSNR_CAP)
  # A mask restricts the error: only the masked half differs by 10, the rest is identical.
  c = a.copy()
  c[:, :, :4] += 10
  mask = np.zeros((8, 8), bool)
  mask[:, :4] = True
  np.testing.assert_allclose(evaluation.psnr(a, c, mask), 20 * np.log10(255 / 10), rtol=1e-9)
  np.testing.assert_allclose(evaluation.psnr(a, c), 20 * np.log10(255 / 10) + 10 * np.log10(2), rtol=1e-9)
  assert np.all(np.isnan(evaluation.psnr(a, c, np.zeros((8, 8), bool))))


def test_ssim_identical_is_one_and_matches_skimage():
  a, b = _texture(0), _texture(1)
  np.testing.assert_allclose(evaluation.ssim(a, a), 1.0, atol=1e-12)
  assert evaluation.ssim(a, b) < 0.5
  metrics = pytest.importorskip("skimage.metrics")
  want = metrics.structural_similarity(a, b, channel_axis=-1, data_range=255)
  np.testing.assert_allclose(evaluation.ssim(a, b), want, rtol=1e-6)


def test_phase_correlation_recovers_integer_shift():
  a = _texture(3)
  for shift in [(3, -5), (0, 7), (-6, 2)]:
    b = np.roll(a, shift, axis=(0, 1))
    est = evaluation.phase_correlation(a, b)
    np.testing.assert_array_equal(np.round(est), shift)
    np.testing.assert_allclose(est, shift, atol=0.1)


def test_good_horizon_and_summary():
  fps = 4.0
  curve = np.array([30.0] * 8 + [10.0] * 8)
  seconds, reached = evaluation.good_horizon(curve, fps, 20.0)
  assert not reached and seconds == pytest.approx(10 / fps)  # the 1 s mean drops at frame 10
  assert evaluation.good_horizon(np.full(8, 30.0), fps, 20.0) == (2.0, True)
  s = evaluation.summarize({"psnr": curve}, fps, 20.0)
  assert s["psnr"]["mean"] == pytest.approx(20.0) and s["duration_s"] == 4.0


# ------------------------------------------------------------------------------------------------
# Worlds: oracle chunks, visible region, puppet figure
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def camera_world():
  world = worlds.make_world("camera", worlds.WorldConfig(height=H, width=W, num_frames=13, texture_size=64))
  seed = worlds.split_seed("test", 0)
  controls = np.zeros((13, 5), np.float32)
  controls[1:, 0] = 0.05   # pan right
  return world, seed, controls


def test_oracle_chunks_and_visible_region(camera_world):
  world, seed, controls = camera_world
  full = world.render(controls, seed)
  np.testing.assert_array_equal(evaluation.render_oracle(world, controls, seed, 5, 9), full[5:9])
  mask = evaluation.visible_mask(world, controls, seed, 0, 13)
  assert mask[0].all()                               # frame 0 sees itself
  frac = mask.mean(axis=(1, 2))
  assert np.all(np.diff(frac) <= 1e-9) and frac[-1] < 0.9   # panning right loses the left part
  assert mask[-1][:, -1].sum() < mask[-1][:, 0].sum()       # the new part enters on the right
  np.testing.assert_array_equal(evaluation.visible_mask(world, controls, seed, 4, 8), mask[4:8])
  # The oracle's own motion estimate is a leftward image shift.
  dy, dx = evaluation.phase_correlation(full[0], full[4])
  assert dx < -1.0 and abs(dy) < abs(dx)


def test_long_camera_controls_stay_in_limits_and_are_prefixes():
  world = worlds.make_world("camera", worlds.WorldConfig(height=H, width=W, texture_size=64))
  seed = worlds.split_seed("test", 1)
  long, hover = evaluation.long_controls(world, np.random.default_rng(0), 81, seed, "orbit", segment_frames=8)
  short, _ = evaluation.long_controls(world, np.random.default_rng(0), 41, seed, "orbit", segment_frames=8)
  assert long.shape == (81, 5) and hover == 0
  np.testing.assert_array_equal(long[:41], short)
  scene = world._scene(seed)
  assert evaluation._camera_within_limits(world, long, scene["rotation"], scene["position"], 0.0)


def test_training_sampler_unchanged_by_the_long_trajectory_helpers():
  """`random_controls` (training's clips) draws what it drew before `continue_controls` shared
  its AR(1) helper: a fixed clip of the train split."""
  world = worlds.make_world("camera", worlds.WorldConfig(height=H, width=W, num_frames=17, texture_size=64))
  seed = worlds.split_seed("train", 3)
  c = world.random_controls(np.random.default_rng([seed, 1]), 17, seed=seed)
  assert c.shape == (17, 5) and not c[0].any() and np.all(np.abs(c[1:]).sum(-1) > 0)
  rng = np.random.default_rng([seed, 1])
  trajectory = world._pick_trajectory(rng, seed)
  std = world._motion_std()
  mean = world._draw_mean(rng, trajectory, std)
  rate = mean + std * rng.normal(size=5)
  want = world._ar_rates(rng, rate, mean, std, 16)[0].astype(np.float32)
  np.testing.assert_array_equal(world.random_controls(np.random.default_rng([seed, 1]), 17, seed=seed)[1:], want)


@pytest.mark.parametrize("split", ["validation", "test"])
def test_evaluation_trajectories_keep_moving_at_training_speed(split):
  """No hovering: over 3 worlds x 60 s every latent step moves, and the median motion per latent
  step (the 4 frames' summed controls in units of the per-frame std) is within a factor 2 of the
  training clips' (`World.sample`, 17 frames), as is the oracle's image motion (phase correlation)."""
  world = worlds.make_world("camera", worlds.WorldConfig(height=H, width=W, num_frames=17, texture_size=64))
  std = world._motion_std()

  def step_speed(c):
    c = np.asarray(c[1:])
    k = len(c) // 4
    return np.linalg.norm(c[:4 * k].reshape(k, 4, 5).sum(1) / std, axis=-1)

  train = np.concatenate([step_speed(world.sample(worlds.split_seed("train", i), num_frames=17)["controls"])
                          for i in range(32)])
  from apt2_jax.evaluation import oracle
  tests = oracle.eval_worlds(world, 3, 1 + 24 * 60, split=split)
  assert all(t.hover_segments == 0 for t in tests)
  speed = np.concatenate([step_speed(t.controls) for t in tests])
  assert speed.min() > 0.05 * np.median(train)
  assert 0.5 < np.median(speed) / np.median(train) < 2.0
  # The same in pixels on the rendered oracle (first 5 s of one world vs 16 training clips).
  pixels = oracle.latent_step_motion(world.render(tests[0].controls[:121], tests[0].seed))
  train_pixels = oracle.training_motion(world, 16, 17)
  assert 0.5 < np.median(pixels) / np.median(train_pixels) < 2.0


def test_puppet_figure_metrics():
  world = worlds.make_world("puppet", worlds.WorldConfig(height=H, width=W, texture_size=64))
  seed = worlds.split_seed("test", 0)
  controls = world.random_controls(np.random.default_rng(0), 5, seed=seed)
  frames = world.render(controls, seed)
  background = evaluation.world_background(world, seed)
  m = evaluation.figure_metrics(frames, frames, background)
  assert np.all(m["figure_iou"] == 1.0) and np.all(m["figure_centroid_error_px"] == 0.0)
  assert np.all(m["figure_psnr"] == evaluation.PSNR_CAP)
  shifted = np.broadcast_to(background, frames.shape).copy()   # the figure vanished
  m = evaluation.figure_metrics(shifted, frames, background)
  assert np.all(m["figure_iou"] == 0.0) and np.all(m["figure_psnr"] < 30)


# ------------------------------------------------------------------------------------------------
# Models: chunked stream == one rollout; end to end
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_spec():
  from apt2_jax import generation
  from apt2_jax.configs import sizes
  from apt2_jax.models import DiTConfig
  from apt2_jax.models import vae as vae_lib
  config = DiTConfig.from_dict(sizes.model_config("tiny", control_channels=20, caption_vocab_size=64))
  params = generation.random_dit_params(config, 0)
  vae_config = vae_lib.vae_config("tiny")
  vae_params = vae_lib.init_params(vae_lib.VAE(vae_config), jax.random.key(1), H, W)
  generator = generation.Generator(config, params, vae_config, vae_params, control_type="camera",
                                   control_encoding="raw", control_dim=5, height=H, width=W)
  return evaluation.ModelSpec(generator)


def _chunked_rollout(spec, camera_world, steps=3):
  """The evaluation's stream of `steps` latent frames in chunks of 2 (the last one padded):
  (stream, frame 0, tokens, latents [1, steps, h, w, C], decoded frames [steps, 4, H, W, 3])."""
  world, seed, controls = camera_world
  stream = evaluation.ModelStream(spec, H, W, chunk_frames=2)
  frame0 = world.render(controls[:1], seed)[0]
  tokens = np.arange(2, 18, dtype=np.int32)
  stream.start(frame0, tokens, seed=7)
  latents, videos, done = [], [], 0
  while done < steps:
    n = min(2, steps - done)
    videos += list(stream.chunk(evaluation.chunk_controls(controls, "camera", done + 1, done + 3), n))
    latents.append(stream.last_latents[:, :n])
    done += n
  return stream, frame0, tokens, jnp.concatenate(latents, axis=1), np.stack(videos)


def _check_chunked_equals_one_rollout(spec, camera_world):
  from apt2_jax.generation import stream as stream_lib
  _, _, controls = camera_world
  steps = 3
  stream, frame0, tokens, latents, _ = _chunked_rollout(spec, camera_world, steps)
  latent0 = stream_lib.encode_image(stream.spec, spec.vae_params, jnp.asarray(frame0)[None])
  h, w = latent0.shape[2:4]
  raw = jnp.asarray(controls[1:1 + 4 * steps]).reshape(1, steps, 4, -1)
  noise = stream_lib.noise_block(7, 0, steps, (1, 1, h, w, 4))
  want = stream_lib.generate(stream.spec, spec.params, latent0, jnp.asarray(tokens)[None], raw, noise)
  np.testing.assert_allclose(latents, want, atol=2e-5)
  t = stream.throughput()   # the second chunk and the later decodes are timed (the first calls compile)
  assert t["dit_step_s"] > 0 and t["decode_step_s"] > 0 and t["timed_dit_frames"] == 2 and t["timed_decodes"] == 2


def test_chunked_stream_equals_one_rollout(tiny_spec, camera_world):
  """Two chunks carrying the KV cache (the last one padded) == one uninterrupted rollout."""
  _check_chunked_equals_one_rollout(tiny_spec, camera_world)


@pytest.mark.slow
def test_chunked_guided_multistep_no_recycling_equals_one_rollout(tiny_spec, camera_world):
  import dataclasses
  spec = dataclasses.replace(tiny_spec, num_steps=2, shift=3.0, guidance=2.0, recycle=False)
  _check_chunked_equals_one_rollout(spec, camera_world)


def test_chunked_rollout_equals_streaming_generator(tiny_spec, camera_world):
  """The evaluation's chunked stream == `StreamingGenerator` step by step (same first frame, seed,
  prompt and controls): the evaluation measures what users stream."""
  from apt2_jax.inference import StreamingGenerator
  _, _, controls = camera_world
  steps = 3
  _, frame0, tokens, latents, videos = _chunked_rollout(tiny_spec, camera_world, steps)
  gen = StreamingGenerator(tiny_spec.generator, height=H, width=W)
  gen.start(frame0, text=tokens, seed=7)
  want, frames = [], []
  for j in range(1, steps + 1):
    frames.append(gen.step({"camera": controls[4 * j - 3:4 * j + 1]})[0])
    want.append(gen.last_latent)
  np.testing.assert_allclose(latents, np.concatenate(want, axis=1), atol=2e-5)
  assert np.abs(videos.astype(int) - np.stack(frames).astype(int)).max() <= 1


def test_evaluate_models_report(tiny_spec, tmp_path):
  import dataclasses
  # Two models that differ only in parameters share one compilation (the guided, multi-step and
  # no-recycling samplers compile their own: tests marked slow).
  other = jax.tree.map(lambda x: x * 0.8, tiny_spec.params)
  models = {"one_step": tiny_spec,
            "other": dataclasses.replace(tiny_spec.with_params(other), benchmark={"frames_per_s": 1.0})}
  fps = 24.0
  report = evaluation.evaluate_models(models, world="camera", num_worlds=1, seconds=[0.25, 0.5],
                                      fps=fps, out_dir=str(tmp_path), progress=False, chunk_frames=2,
                                      world_config={"texture_size": 64})
  on_disk = json.loads((tmp_path / "report.json").read_text())
  assert on_disk == json.loads(json.dumps(report))
  assert report["config"]["video_frames"] == 13 and report["config"]["latent_frames"] == 4
  for name in models:
    m = report["models"][name]
    (w,) = m["worlds"]
    curves = w["curves"]
    for key in ("psnr", "ssim", "psnr_visible", "ssim_visible", "visible_fraction"):
      assert len(curves[key]) == 13 and all(np.isfinite(curves[key])), key
    assert len(curves["control_error_px"]) == 3 and all(np.isfinite(curves["control_error_px"]))
    assert curves["visible_fraction"][0] == 1.0
    assert set(m["summary"]) == {"0.25s", "0.5s"}
    s = m["summary"]["0.5s"]
    for key in ("mean", "first_10s", "last_10s", "good_horizon_s"):
      assert np.isfinite(s["psnr"][key]), key
    assert np.isfinite(s["control_error_px"]["mean"]) and np.isfinite(s["ssim_visible"]["mean"])
    assert m["throughput"]["frames_per_s"] > 0
    for path in w["videos"].values():
      assert os.path.getsize(tmp_path / path) > 0
    assert os.path.getsize(tmp_path / w["videos"]["gif"]) < 1_000_000
  assert report["models"]["other"]["benchmark"] == {"frames_per_s": 1.0}
  # Same noise, same controls, different sampler: the curves differ, frame 0 (the VAE's) agrees.
  a, b = (report["models"][n]["worlds"][0]["curves"]["psnr"] for n in models)
  assert a[0] == b[0] and a[-1] != b[-1]
  for png in report["plots"].values():
    assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
  assert (tmp_path / "videos" / "world0_all.gif").exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith("oracle_")]  # scratch removed
  # References through the same VAE: the ceiling (its first 4 s: `vae_reconstruction`), copy-last
  # (frame t = the ceiling's frame t-1), frozen frame 0 and the flat colour (no VAE).
  refs = report["references"]
  (v,) = refs["vae_reconstruction"]["worlds"]
  assert v["frames"] == 13 and 0 < refs["vae_reconstruction"]["psnr"] < 100
  ceiling, copy = refs["vae_ceiling"]["mean_curves"], refs["copy_last"]["mean_curves"]
  frozen, flat = refs["frozen_frame0"]["mean_curves"], refs["flat_colour"]["mean_curves"]
  assert v["psnr"] == pytest.approx(np.mean(ceiling["psnr"]), rel=1e-4)
  for curves in (ceiling, copy, frozen, flat):
    assert len(curves["psnr"]) == 13 and np.all(np.isfinite(curves["psnr"])) and max(curves["psnr"]) < 100
  assert copy["psnr"][0] == ceiling["psnr"][0] == frozen["psnr"][0]   # all start from the VAE's frame 0
  assert set(refs["frozen_frame0"]["summary"]) == {"0.25s", "0.5s"} == set(refs["flat_colour"]["summary"])
  vf = refs["vae_vs_flat"]
  assert vf["margin_db"] == pytest.approx(np.mean(ceiling["psnr"]) - np.mean(flat["psnr"]), abs=1e-3)
  text = (tmp_path / "summary.md").read_text()
  assert "## in_distribution" in text and "## held_out" in text and "VAE vs flat colour" in text
  assert "Frozen frame 0" in text and "| flat_colour | 0.5s |" in text
  # The horizon against the VAE's ceiling: its threshold is the reconstruction PSNR minus 3 dB.
  ps = report["models"]["one_step"]["summary"]["0.5s"]["psnr"]
  assert ps["horizon_vs_vae_threshold"] == pytest.approx(refs["vae_reconstruction"]["psnr"] - 3.0, abs=1e-3)
  assert 0 <= ps["horizon_vs_vae_s"] <= 13 / fps + 1e-3
  # Two sets: in-distribution (validation worlds, the top level) and held-out (test worlds).
  sets = report["sets"]
  assert sets["in_distribution"]["split"] == "validation" and sets["held_out"]["split"] == "test"
  assert report["config"]["world_seeds"] == sets["in_distribution"]["world_seeds"] == [worlds.split_seed("validation", 0)]
  assert sets["held_out"]["world_seeds"] == [worlds.split_seed("test", 0)]
  assert sets["in_distribution"]["hover_segments"] == [0] == sets["held_out"]["hover_segments"]
  held = report["held_out"]
  assert set(held["models"]) == set(models) and "vae_vs_flat" in held["references"]
  assert len(held["models"]["one_step"]["worlds"][0]["curves"]["psnr"]) == 13
  assert held["models"]["one_step"]["worlds"][0]["videos"]["gif"].startswith("held_out/videos/")
  for png in held["plots"].values():
    assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG" and png.startswith("held_out/")
  motion = report["config"]["motion"]
  assert motion["training_median_px"] > 0 and motion["held_out"]["ratio_to_training"] > 0


def test_vae_stream_equals_the_whole_clip_and_the_still_video_shortcut(tiny_spec, camera_world):
  """The references' streaming VAE (chunks of 4L frames, the last one padded) == the whole-clip
  encode/decode; the still video's repeated steady chunk == streaming every chunk."""
  from apt2_jax.evaluation import references
  world, seed, controls = camera_world
  frames = world.render(controls, seed)                               # 13 frames
  want = references.vae_reconstruction(tiny_spec, frames)
  s = references.VAEStream(tiny_spec, chunk_latents=2)
  got = np.concatenate([s.start(frames[0])[None], s.chunk(frames[1:9]), s.chunk(frames[9:13])])
  assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
  still = np.broadcast_to(frames[0], (41,) + frames.shape[1:])
  s = references.VAEStream(tiny_spec, chunk_latents=1)
  full = np.concatenate([s.start(frames[0])[None]] + [s.chunk(np.ascontiguousarray(still[a:a + 4]))
                                                      for a in range(1, 41, 4)])
  short = np.concatenate(list(references.still_video_chunks(tiny_spec, frames[0], 41, chunk_latents=1)))
  np.testing.assert_array_equal(short, full)
  flat = references.flat_colour(frames[0])
  assert flat.shape == frames[0].shape and len(np.unique(flat.reshape(-1, 3), axis=0)) == 1


def test_vae_references_tool_scores_the_evaluation_worlds(tiny_spec):
  """`tools.vae_references`: per set and world, the VAE ceiling, flat colour, copy-last and the 8x
  average pool, on the evaluation's own worlds; the margin is the VAE's mean minus the flat's."""
  from apt2_jax.evaluation import references
  from apt2_jax.tools import vae_references
  frames = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
  blocks = np.repeat(np.repeat(frames[:, ::8, ::8], 8, 1), 8, 2)  # constant on 8x8 blocks
  np.testing.assert_array_equal(vae_references.average_pool(blocks), blocks)
  with pytest.raises(ValueError, match="pool factor"):
    vae_references.average_pool(frames[:, :12])
  out = vae_references.score(tiny_spec, "camera", pixels=H, num_worlds=1, seconds=8 / 24)
  assert out["video_frames"] == 9 and set(out["sets"]) == {"in_distribution", "held_out"}
  for s in out["sets"].values():
    (row,) = s["worlds"]
    assert s["margin_db"] == pytest.approx(row["vae_psnr"] - row["flat_psnr"])
    assert s["clear_margin"] == (s["margin_db"] >= references.VAE_MARGIN_DB)
    assert row["avgpool_psnr"] > row["flat_psnr"]  # a low-pass of the frame beats its mean colour
    assert all(np.isfinite(row[k]) for k in ("vae_psnr", "copy_last_psnr"))


def test_cli_parse_models():
  parsed = evaluate_cli.parse_models(
      "diff=/r/s1:steps=32,shift=24,guidance=3,aapt=/r/s4,abl=/r/a[recycle=0,key=params]")
  assert parsed == {
      "diff": {"workdir": "/r/s1", "options": {"num_steps": 32, "shift": 24.0, "guidance": 3.0}},
      "aapt": {"workdir": "/r/s4", "options": {}},
      "abl": {"workdir": "/r/a", "options": {"recycle": False, "key": "params"}}}
  with pytest.raises(ValueError, match="bad option"):
    evaluate_cli.parse_models("a=/x[bogus=1]")
  with pytest.raises(ValueError, match="expected name=WORKDIR"):
    evaluate_cli.parse_models("/x")


@pytest.mark.slow
def test_cli_from_training_workdir(tiny_spec, tmp_path, capsys):
  """`python -m apt2_jax.evaluate` on a trainer-style workdir (EMA params + saved config)."""
  import ml_collections
  from absl import flags
  from apt2_jax import checkpointing
  from apt2_jax.configs import sizes
  config = ml_collections.ConfigDict({
      "model": dict(sizes.model_config("tiny", control_channels=20, caption_vocab_size=64)),
      "vae": {"size": "tiny", "checkpoint": ""},
      "data": {"world": "camera", "height": H, "width": W, "text_len": 16}})
  workdir = str(tmp_path / "run")
  manager = checkpointing.make_manager(workdir, save_every=1, keep=1, async_save=False)
  state = {"ema_params": tiny_spec.params, "params": jax.tree.map(lambda x: x * 0, tiny_spec.params)}
  checkpointing.save(manager, 1, state, config=config, force=True)
  manager.wait_until_finished()
  spec = evaluation.model_spec_from_workdir(workdir, num_steps=1)
  assert spec.dit_config == tiny_spec.dit_config and (spec.height, spec.width) == (H, W)
  jax.tree.map(np.testing.assert_array_equal, spec.params, tiny_spec.params)
  out = tmp_path / "eval"
  argv = ["evaluate", f"--models=aapt={workdir}", "--seconds=0.5", f"--out={out}", "--num_worlds=1",
          "--chunk_frames=2", "--noprogress", "--gif_seconds=0.5"]
  evaluate_cli.define_flags()
  flags.FLAGS.unparse_flags()
  flags.FLAGS(argv)
  try:
    evaluate_cli.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()
  report = json.loads((out / "report.json").read_text())
  assert report["config"]["height"] == H and len(report["models"]["aapt"]["mean_curves"]["psnr"]) == 13
  assert "good horizon" in capsys.readouterr().out
