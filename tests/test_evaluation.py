"""Evaluation: metric functions on known inputs, the oracle helpers, chunked streaming == one
rollout == the `StreamingGenerator` step by step, and a tiny end-to-end `evaluate` of the camera
world (random tiny DiT + tiny VAE, 32x32, 3 latent frames) and its command line."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt2_jax import evaluation
from apt2_jax.evaluation import __main__ as evaluate_cli
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


def test_horizon_and_summary_of_a_whole_frame_curve():
  """The one horizon rule (`horizon.horizon`, full 1-s windows of generated frames) and the drift
  summary's whole-frame PSNR."""
  from apt2_jax.evaluation import drift
  from apt2_jax.evaluation import horizon as hz
  fps = 4.0
  curve = np.array([30.0] * 8 + [10.0] * 8)
  # Windows of 4 generated frames: frames 6-9 hold two bad ones (mean 20, not below), frames 7-10
  # three (15): the first crossing is the window starting at frame 7.
  h = hz.horizon(curve, fps, 20.0)
  assert not h["reached_end"] and h["first_s"] == pytest.approx(7 / fps) == h["last_s"]
  assert hz.horizon(np.full(8, 30.0), fps, 20.0) == {"first_s": 2.0, "last_s": 2.0, "reached_end": True}
  n = len(curve)
  curves = {k: np.full(n, np.nan) for k in drift.FRAME_KEYS}
  curves.update(psnr=curve, motion=np.full((n, 2), np.nan))
  s = drift.summarize([curves], [np.zeros((n, 2))], fps)
  assert s["overall"]["psnr"] == pytest.approx((7 * 30 + 8 * 10) / 15) and s["duration_s"] == 4.0


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
  from apt2_jax.evaluation import oracle
  assert oracle._camera_within_limits(world, long, scene["rotation"], scene["position"], 0.0)


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


@pytest.mark.parametrize("set_name", ["in_distribution", "held_out"])
def test_evaluation_trajectories_keep_moving_at_training_speed(set_name):
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
  tests = oracle.eval_worlds(world, oracle.EVAL_SETS[set_name], 3, 1 + 24 * 60)
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


def test_evaluate_the_camera_world(tiny_spec, tmp_path):
  """The camera world through the one evaluation: both sets, paired noise, the references through
  the models' VAE (no warp references: the camera world has no exact warp), a shorter duration on
  the prefix, the checks, GIFs, MP4s, plots, report.json == the returned report."""
  import dataclasses
  # Two models that differ only in parameters share one compilation (the guided, multi-step and
  # no-recycling samplers compile their own: tests marked slow).
  other = jax.tree.map(lambda x: x * 0.8, tiny_spec.params)
  models = {"one_step": tiny_spec,
            "other": dataclasses.replace(tiny_spec.with_params(other), benchmark={"frames_per_s": 1.0})}
  fps = 24.0
  config = evaluation.EvalConfig(world="camera", world_config={"texture_size": 64}, num_worlds=1, noise_seeds=(0,),
                                 seconds=0.5, summary_seconds=(0.25,), height=H, width=W, fps=fps, chunk_frames=2,
                                 videos=True, ssim=True, progress=False)
  assert [s.name for s in config.eval_sets] == ["in_distribution", "held_out"]
  report = evaluation.evaluate(models, config, str(tmp_path))
  on_disk = json.loads((tmp_path / "report.json").read_text())
  assert on_disk == json.loads(json.dumps(report))
  assert report["config"]["video_frames"] == 13 and report["config"]["latent_steps"] == 3
  for name in models:
    m = report["models"][name]
    assert m["throughput"]["frames_per_s"] > 0 and m["role"] is None
  assert report["models"]["other"]["benchmark"] == {"frames_per_s": 1.0}
  for set_name, split in (("in_distribution", "validation"), ("held_out", "test")):
    s = report["sets"][set_name]
    assert s["set"]["split"] == split and s["set"]["world_seeds"] == [worlds.split_seed(split, 0)]
    assert s["set"]["hover_segments"] == [0]
    for name in models:
      x = s["models"][name]["0"]
      assert len(x["per_latent"]["psnr_known"]) == 3 and x["duration_s"] == pytest.approx(13 / fps)
      for key in ("psnr_known", "psnr", "ssim", "psnr_recent", "known_fraction", "warp_error"):
        assert np.isfinite(x["overall"][key]), key
      assert 0 < x["overall"]["known_fraction"] <= 1.0          # the frustum test of frame 0's view
      (video,) = s["videos"][name]
      assert os.path.getsize(tmp_path / video) > 0 and video.startswith("videos/")
    # Same noise, same controls, different parameters: the curves differ.
    a, b = (s["models"][n]["0"]["per_latent"]["psnr_known"] for n in models)
    assert a != b
    refs = s["references"]
    assert set(refs) == {"oracle", "one_step_back", "flat_colour", "frozen_first"}   # no exact warp
    assert 0 < refs["oracle"]["overall"]["psnr"] < 100                                # through the lossy VAE
    st = s["statistics"]
    assert set(st["models"]) == set(models) and "frozen_first" in st["references"]
    assert set(s["by_duration"]) == {"0.25s"} and set(s["by_duration"]["0.25s"]["models"]) == set(models)
    vf = s["vae_vs_flat"]
    (w,) = vf["worlds"]
    assert vf["margin_db"] == pytest.approx(w["vae_psnr"] - w["flat_psnr"], abs=1e-3)
    assert s["motion"]["training_median_px"] > 0 and s["motion"]["ratio_to_training"] > 0
    assert (tmp_path / report["plots"][set_name]).read_bytes()[:4] == b"\x89PNG"
    assert set(report["gifs"][set_name]) == {"one_step", "other", "all"}
    for path in report["gifs"][set_name].values():
      assert 0 < os.path.getsize(tmp_path / path) < 1_000_000
  assert report["claims"]["gate2"]["verdict"] == "not measured"   # no model has the role
  text = (tmp_path / "claims.md").read_text()
  assert "## Gates and claims" in text and "## Sets" in text and "### held_out" in text
  assert "clear margin" in text and "First 0.25s" in text and "## Models" in text


def test_vae_stream_equals_the_whole_clip(tiny_spec, camera_world):
  """The references' codec: the learned VAE streamed (chunks of 4L frames, the last one padded) ==
  its whole-clip encode/decode within one grey level; a pixel codec goes whole clip, exactly."""
  from apt2_jax.evaluation import references
  from apt2_jax.models import vae as vae_lib
  world, seed, controls = camera_world
  frames = world.render(controls, seed)                               # 13 frames
  want = np.asarray(references._whole_clip(tiny_spec.vae_config)(tiny_spec.vae_params, frames))
  s = references.VAEStream(tiny_spec, chunk_latents=2)
  got = np.concatenate([s.start(frames[0])[None], s.chunk(frames[1:9]), s.chunk(frames[9:13])])
  assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
  np.testing.assert_array_equal(references.codec_roundtrip(tiny_spec, chunk_latents=2)(frames), got)
  lossless = type("Codec", (), {"vae_config": vae_lib.vae_config("pixels"), "vae_params": {"params": {}}})()
  video = np.random.default_rng(0).integers(0, 256, (9, 16, 16, 3), dtype=np.uint8)
  np.testing.assert_array_equal(references.codec_roundtrip(lossless)(video), video)


def test_vae_references_tool_scores_the_evaluation_worlds(tiny_spec):
  """`tools.vae_references`: per set and world, the VAE ceiling, flat colour, one step back and the
  8x average pool, on the evaluation's own worlds; the margin is the VAE's mean minus the flat's."""
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
    assert all(np.isfinite(row[k]) for k in ("vae_psnr", "one_step_back_psnr"))


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
  """`python -m apt2_jax.evaluation` on a trainer-style workdir (EMA params + saved config)."""
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
          "--chunk_frames=2", "--noprogress", "--novideos"]
  evaluate_cli.define_flags()
  flags.FLAGS.unparse_flags()
  flags.FLAGS(argv)
  try:
    evaluate_cli.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()
  report = json.loads((out / "report.json").read_text())
  assert report["config"]["height"] == H and report["config"]["video_frames"] == 13
  assert report["models"]["aapt"]["role"] == "aapt" and set(report["sets"]) == {"in_distribution", "held_out"}
  assert len(report["sets"]["in_distribution"]["models"]["aapt"]["0"]["per_latent"]["psnr_known"]) == 3
  assert "good horizon" in capsys.readouterr().out
