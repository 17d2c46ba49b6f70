"""The testbed: the lossless pixel codec (VAE size `pixels`), the PCA codec (`pixels_pca`) and the
panorama world."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt2_jax import controls as controls_lib
from apt2_jax.data import captions
from apt2_jax.data import panorama
from apt2_jax.data import pipeline
from apt2_jax.data import worlds
from apt2_jax.models import pixel_codec
from apt2_jax.models import vae as vae_lib

CFG = worlds.WorldConfig()   # 64x64, 33 frames


@pytest.fixture(scope="module")
def world():
  return worlds.make_world("panorama", CFG)


@pytest.fixture(scope="module")
def clips(world):
  """Rendered training clips, uint8 [8, 33, 64, 64, 3]."""
  return np.stack([world.sample(worlds.split_seed("train", i))["video"] for i in range(8)])


def _to_unit(video):
  return jnp.asarray(video, jnp.float32) / 127.5 - 1.0


def _to_uint8(video):
  return np.clip(np.round((np.asarray(video) + 1.0) * 127.5), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Pixel codec
# ------------------------------------------------------------------------------------------------


def test_codec_round_trip_whole_clip_and_streamed(clips):
  cfg = vae_lib.vae_config("pixels")
  assert cfg.codec == "space_to_depth" and cfg.z_dim == pixel_codec.Z_DIM == 768
  model = vae_lib.VAE(cfg)
  params = vae_lib.init_params(model, jax.random.key(0))
  assert params == {"params": {}}
  video = _to_unit(clips[:2])
  mean, logvar = model.apply(params, video, method=vae_lib.VAE.encode)
  assert mean.shape == logvar.shape == (2, 9, 8, 8, 768)
  assert vae_lib.latent_frames(33) == 9
  np.testing.assert_array_equal(model.apply(params, mean, method=vae_lib.VAE.decode), video)
  # Latent frame 0 is frame 0 in all 4 slots; latent frame 1 holds video frames 1..4.
  groups = pixel_codec.depth_to_space(mean)
  np.testing.assert_array_equal(groups[:, 0], jnp.broadcast_to(video[:, :1], groups[:, 0].shape))
  np.testing.assert_array_equal(groups[:, 1], video[:, 1:5])
  # Block (0, 0) of latent frame 1: channel ((t * 8 + dy) * 8 + dx) * 3 + c.
  np.testing.assert_array_equal(mean[0, 1, 0, 0].reshape(4, 8, 8, 3), video[0, 1:5, :8, :8])
  # Training pass (never samples), chunked encode, streamed decode (jitted, donated cache).
  recon, _, _ = model.apply(params, video, rngs={"sample": jax.random.key(1)})
  np.testing.assert_array_equal(recon, video)
  chunked, _ = vae_lib.encode_chunked(model, params, video)
  np.testing.assert_array_equal(chunked, mean)
  cache = vae_lib.init_decode_cache(model, 2, 8, 8)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), cache) == {"latent_frames": ((2,), jnp.int32)}
  frames = []
  for j in range(9):
    out, cache = vae_lib.decode_step(model, params, cache, mean[:, j:j + 1], j == 0)
    assert out.shape == (2, 1 if j == 0 else 4, 64, 64, 3)
    frames.append(out)
  np.testing.assert_array_equal(jnp.concatenate(frames, axis=1), video)
  assert int(cache["latent_frames"][0]) == 9
  # Through the DiT's normalised latent space, uint8 frames come back exactly.
  z = vae_lib.normalize_latents(mean, cfg)
  back = model.apply(params, vae_lib.denormalize_latents(z, cfg), method=vae_lib.VAE.decode)
  np.testing.assert_array_equal(_to_uint8(back), clips[:2])


def test_codec_config_round_trip_and_checks():
  cfg = vae_lib.vae_config("pixels")
  fields = json.loads(json.dumps({**dataclasses.asdict(cfg), "dtype": "float32"}))
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  assert vae_lib.VAEConfig(**{**fields, "dtype": jnp.float32}) == cfg
  try:  # the one config codec, when present in this checkout
    from apt2_jax.generation import vae as generation_vae
  except ImportError:
    generation_vae = None
  if generation_vae is not None:
    d = json.loads(json.dumps(generation_vae.vae_config_to_dict(cfg)))
    assert generation_vae.vae_config_from_dict(d) == cfg
    assert generation_vae.vae_config_from_block({"size": "pixels", "checkpoint": ""}) == cfg
  with pytest.raises(ValueError, match="z_dim=768"):
    vae_lib.VAEConfig(codec="space_to_depth", z_dim=16)
  with pytest.raises(ValueError, match="codec"):
    vae_lib.VAEConfig(codec="jpeg")
  assert vae_lib.vae_config("tiny").codec == "learned"


def test_codec_normalised_latents_have_unit_scale(clips):
  cfg = vae_lib.vae_config("pixels")
  latents = pixel_codec.encode(_to_unit(clips))
  z = np.asarray(vae_lib.normalize_latents(latents, cfg)).reshape(-1, 3)   # channels by colour
  # The stored statistics come from 1024 clips; 8 clips (one palette each) scatter around them.
  assert np.all(np.abs(z.mean(0)) < 0.4), z.mean(0)
  assert np.all((z.std(0) > 0.7) & (z.std(0) < 1.4)), z.std(0)
  assert 0.85 < z.std() < 1.2


def test_pca_codec_round_trip_ceiling_and_streaming(world):
  """The PCA codec (size `pixels_pca`): 32 channels, unit-variance latents, its stored basis holds
  held-out clips above 30 dB (flat colour and copying the last frame far below), the streamed decode
  equals the whole clip, and a re-fit on a few clips agrees with the stored one."""
  cfg = vae_lib.vae_config("pixels_pca")
  assert cfg.codec == "pca" and cfg.z_dim == pixel_codec.PCA_RANK == 32
  model = vae_lib.VAE(cfg)
  params = vae_lib.init_params(model, jax.random.key(0))
  held_out = np.stack([world.sample(worlds.split_seed("validation", i))["video"] for i in range(4)])
  video = _to_unit(held_out)
  mean, _ = model.apply(params, video, method=vae_lib.VAE.encode)
  assert mean.shape == (4, 9, 8, 8, 32)
  z = np.asarray(vae_lib.normalize_latents(mean, cfg))
  assert 0.7 < z.std() < 1.3, z.std()
  recon = _to_uint8(model.apply(params, mean, method=vae_lib.VAE.decode))
  mse = np.mean(np.square(recon.astype(np.float64) - held_out), axis=(1, 2, 3, 4))
  psnr = 10 * np.log10(255.0 ** 2 / mse)
  assert np.all(psnr > 29.0), psnr
  flat = np.broadcast_to(held_out[:, :1].mean(axis=(2, 3), keepdims=True), held_out.shape)
  psnr_flat = 10 * np.log10(255.0 ** 2 / np.mean(np.square(flat - held_out), axis=(1, 2, 3, 4)))
  assert np.all(psnr > psnr_flat + 8), (psnr, psnr_flat)
  cache = vae_lib.init_decode_cache(model, 4, 8, 8)
  frames = []
  for j in range(9):
    out, cache = vae_lib.decode_step(model, params, cache, mean[:, j:j + 1], j == 0)
    frames.append(out)
  np.testing.assert_allclose(jnp.concatenate(frames, axis=1),
                             jnp.clip(model.apply(params, mean, method=vae_lib.VAE.decode), -1, 1), atol=1e-6)
  basis, _, _, refit_psnr = pixel_codec.fit_pca(num_clips=8, blocks=8_000, heldout_clips=4)
  assert refit_psnr > 29.0, refit_psnr
  stored, _, _ = pixel_codec.pca_basis()
  # The leading components span the same subspace (sign and order within near-ties aside).
  overlap = np.linalg.svd(stored[:4] @ basis[:8].T, compute_uv=False)
  assert overlap.min() > 0.9, overlap
  with pytest.raises(ValueError, match="z_dim=32"):
    vae_lib.VAEConfig(codec="pca", z_dim=16)


# ------------------------------------------------------------------------------------------------
# Panorama world
# ------------------------------------------------------------------------------------------------


def test_world_registration_and_sample(world):
  assert "panorama" in worlds.WORLD_NAMES and world.control_dim == 5
  assert controls_lib.WORLD_CONTROL_TYPES["panorama"] == "camera"
  example = world.sample(worlds.split_seed("train", 3))
  assert example["video"].shape == (33, 64, 64, 3) and example["video"].dtype == np.uint8
  assert example["controls"].shape == (33, 5) and example["controls"].dtype == np.float32
  np.testing.assert_array_equal(example["controls"][0], 0)
  np.testing.assert_array_equal(example["controls"][:, 2:], 0)          # zoom, forward, roll
  assert np.all(np.abs(example["controls"]) <= controls_lib.CAMERA_LIMITS)
  assert example["poses"].shape == (33, 13)
  assert captions.CAPTIONS[example["caption_id"]] == example["caption"]
  assert captions.detokenize(example["text_tokens"]) == example["caption"]
  assert captions.VOCAB_SIZE <= 128 and captions.VOCAB[:4] == ("<pad>", "<unk>", "a", "astronaut")
  assert example["trajectory"] in panorama.TRAJECTORIES
  assert example["textures"] in panorama.APPEARANCES["seen"]
  assert example["video"].std() > 10


def test_render_is_deterministic_and_fast(world):
  import time
  seed = worlds.split_seed("train", 5)
  example = world.sample(seed)
  np.testing.assert_array_equal(world.render(example["controls"], seed), example["video"])
  np.testing.assert_array_equal(world.sample(seed)["video"], example["video"])
  np.testing.assert_array_equal(world.render_frames(example["controls"], seed, 10, 20),
                                example["video"][10:20])
  assert np.abs(world.render(example["controls"], seed + 1).astype(float) - example["video"]).mean() > 5
  times = []
  for _ in range(3):
    start = time.perf_counter()
    world.render(example["controls"], seed)
    times.append(time.perf_counter() - start)
  assert min(times) < 0.2   # ~10 ms on a free core; loose for shared CI machines


@pytest.mark.parametrize("axis", [0, 1])
def test_pure_pan_or_tilt_translates_by_focal_times_angle(world, axis):
  """A pan (tilt) of atan(k / f) moves the content at the centre by k px left (down):
  `image_shift` (dy, dx) = (0, -k) ((k, 0))."""
  k = 4
  controls = np.zeros((5, 5), np.float32)
  controls[1, axis] = np.arctan(k / world.focal)
  seed = worlds.split_seed("train", 2)
  a, b = world.render(controls, seed)[:2].astype(float)
  shift = world.image_shift(controls)
  expected = (0, -k) if axis == 0 else (k, 0)
  np.testing.assert_allclose(shift[1], expected, atol=1e-4)
  c = slice(20, 44)
  if axis == 0:   # content at x + k in frame 0 is at x in frame 1
    moved, still = np.abs(b[c, c] - a[c, 20 + k:44 + k]).mean(), np.abs(b[c, c] - a[c, c]).mean()
  else:           # content at y - k in frame 0 is at y in frame 1
    moved, still = np.abs(b[c, c] - a[20 - k:44 - k, c]).mean(), np.abs(b[c, c] - a[c, c]).mean()
  assert moved < 0.15 * still, (moved, still)
  # Per latent step: 4 frames of a constant pan add up; `motion_px` is the per-frame speed.
  steady = np.zeros((33, 5), np.float32)
  steady[1:, 0] = 0.02
  np.testing.assert_allclose(world.latent_shift(steady)[1:], [[0, -world.focal * np.tan(0.08)]] * 8,
                             rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(world.motion_px(steady)[1:], world.focal * np.tan(0.02), rtol=1e-6)


def test_visible_mask(world):
  seed = worlds.split_seed("train", 1)
  still = np.zeros((9, 5), np.float32)
  assert world.visible_mask(still, seed, 0, 9, window_frames=0).all()
  moving = np.zeros((33, 5), np.float32)
  moving[1:, 0] = 0.06                                   # 3.3 px per frame to the right
  sink = world.visible_mask(moving, seed, 0, 33, window_frames=0)
  window = world.visible_mask(moving, seed, 0, 33, window_frames=8)
  assert sink.shape == (33, 64, 64) and sink[0].all() and window[0].all() and not window[1].all()
  fraction = sink.mean(axis=(1, 2))
  assert np.all(np.diff(fraction) <= 0) and fraction[-1] < 0.05 and fraction[8] < 0.7
  assert np.all(window >= sink) and window.mean() > sink.mean()
  # Panning right reveals the right edge: there frame t is new, the left part was seen.
  assert not window[20, :, -4:].any() and window[20, :, :40].all()
  np.testing.assert_array_equal(world.visible_mask(moving, seed, 10, 20, 8), window[10:20])


def test_trajectories_bursts_and_bounds(world):
  cfg = world.config
  limit = cfg.pano_rate_range[1] * world.focal * 1.01
  trajectories, speeds = [], {"wander": [], "bursty": []}
  for i in range(200):
    seed = worlds.split_seed("train", i)
    rng = np.random.default_rng([seed, 1])
    trajectory = world._pick_trajectory(rng, seed)  # pylint: disable=protected-access
    controls = world.random_controls(rng, 33, trajectory=trajectory, seed=seed)
    trajectories.append(trajectory)
    speeds[trajectory].append(world.motion_px(controls)[1:])
  assert 0.15 < np.mean(np.array(trajectories) == "bursty") < 0.35      # pano_burst_fraction 0.25
  wander, bursty = np.concatenate(speeds["wander"]), np.concatenate(speeds["bursty"])
  assert wander.min() > 0.5 and wander.max() < limit and 1.0 < np.median(wander) < 2.0
  assert np.all([s.max() > 4.0 for s in speeds["bursty"]])              # one burst per 32 frames
  assert bursty.max() < 0.15 * world.focal * 1.01
  # A long trajectory keeps moving within the bounds; shorter ones are its prefixes.
  rng = lambda: np.random.default_rng(7)
  long = world.random_controls(rng(), 721, trajectory="bursty", seed=3)
  np.testing.assert_array_equal(world.random_controls(rng(), 100, trajectory="bursty", seed=3), long[:100])
  rotations, _, _ = world.poses(long, 3)
  assert np.abs(np.rad2deg(panorama.elevation(rotations))).max() < 60
  assert np.abs(np.rad2deg(panorama.horizon_roll(rotations))).max() < 45
  assert world.motion_px(long)[1:].min() > 0.5


def test_unseen_appearance(world):
  def saturation(video):  # HSV saturation, mean over pixels
    v = video.astype(float) / 255
    return float(((v.max(-1) - v.min(-1)) / np.maximum(v.max(-1), 1e-3)).mean())
  seen = [world.sample(worlds.split_seed("validation", i)) for i in range(6)]
  unseen = [world.sample(worlds.split_seed("test", i)) for i in range(6)]
  assert {e["textures"] for e in seen} <= set(panorama.APPEARANCES["seen"])
  assert {e["textures"] for e in unseen} <= set(panorama.APPEARANCES["unseen"])
  # Unseen: saturated colours on dark skies (HSV saturation ~0.8 vs ~0.35, brightness ~0.26 vs ~0.54).
  assert np.mean([saturation(e["video"]) for e in unseen]) > np.mean([saturation(e["video"]) for e in seen]) + 0.25
  assert np.mean([e["video"].mean() for e in unseen]) < np.mean([e["video"].mean() for e in seen]) - 40
  # The config field overrides the split; the motion does not change with the appearance.
  forced = worlds.make_world("panorama", dataclasses.replace(CFG, pano_appearance="unseen"))
  seed = worlds.split_seed("train", 0)
  assert forced.sample(seed)["textures"] in panorama.APPEARANCES["unseen"]
  np.testing.assert_array_equal(forced.sample(seed)["controls"], world.sample(seed)["controls"])


def test_grain_pipeline_fresh_clips():
  config = pipeline.default_data_config("panorama", "small")
  config.num_train = 0                      # unbounded: a fresh world for every example
  config.stored_num_frames = config.num_frames = 33
  config.batch_size = 2
  config.read_threads = 1
  config.world_options = {"pano_burst_fraction": 0.5}
  it = iter(pipeline.make_dataset(config, "train", seed=0))
  batches = [next(it) for _ in range(3)]
  batch = batches[0]
  assert batch["video"].shape == (2, 33, 64, 64, 3) and batch["video"].dtype == np.float32
  assert batch["controls"].shape == (2, 33, 5) and batch["text_tokens"].shape == (2, captions.MAX_LEN)
  np.testing.assert_array_equal(batch["first_frame"], batch["video"][:, 0])
  np.testing.assert_array_equal(batch["controls"][:, 0], 0)
  seeds = [int(s) for b in batches for s in b["seed"]]
  assert len(set(seeds)) == 6 and all(worlds.seed_split(s) == "train" for s in seeds)
  again = next(iter(pipeline.make_dataset(config, "train", seed=0)))
  np.testing.assert_array_equal(again["video"], batch["video"])       # deterministic
