"""The torus world: every frame is an exact wrap-around shift of frame 0 (oracle and warps exact)."""
import numpy as np
import pytest

from apt2_jax.data import torus, worlds
from apt2_jax.evaluation import metrics


@pytest.fixture(scope="module")
def world():
  return worlds.make_world("torus", worlds.WorldConfig(height=64, width=64, num_frames=97))


def test_registered(world):
  assert "torus" in worlds.WORLD_NAMES and world.control_dim == 5


@pytest.mark.parametrize("index", [0, 1, 2, 5])
def test_oracle_and_warps_exact(world, index):
  sample = world.sample(seed=worlds.split_seed("validation", index))
  video, controls = sample["video"], sample["controls"]
  shifts = world.shifts(controls)
  assert shifts.dtype == np.int64 and np.abs(shifts).sum() > 0
  # The controls are whole pixels over the focal length.
  np.testing.assert_allclose(controls[:, :2] * world.focal, np.rint(controls[:, :2] * world.focal), atol=1e-3)
  for t in range(1, len(video)):
    np.testing.assert_array_equal(world.warp(video[t - 1], controls, t - 1, t), video[t])   # warp-last
    np.testing.assert_array_equal(world.warp(video[0], controls, 0, t), video[t])           # warp-frame-0
  np.testing.assert_array_equal(world.render_frames(controls, sample["seed"], 10, 20), video[10:20])
  assert world.known_mask(controls, sample["seed"]).all()


def test_image_shift_is_the_content_motion(world):
  """`image_shift` is the motion phase correlation measures between frames (the evaluation's
  convention): content moves left under a pan right."""
  sample = world.sample(seed=worlds.split_seed("validation", 3))
  video, controls = sample["video"].astype(np.float64), sample["controls"]
  shift = world.image_shift(controls, 4)
  for t in (8, 20, 40):
    measured = metrics.phase_correlation(video[t - 4], video[t])
    np.testing.assert_allclose(measured, shift[t], atol=0.51)
  pan_right = np.zeros((5, 5), np.float32)
  pan_right[1:, 0] = 2 / world.focal
  assert world.image_shift(pan_right, 1)[1].tolist() == [0.0, -2.0]


def test_periodic_scene(world):
  base = world._scene(7)["base"]
  # Tiled twice, any 64x64 window is a roll of the base image.
  tiled = np.tile(base, (2, 2, 1))
  np.testing.assert_array_equal(tiled[5:69, 17:81], torus.roll(base, (-5, -17)))


def test_whitened_codec_loss_is_the_pixel_loss():
  """`pixels_pca_torus_white`'s weighted latent MSE is `pixels_pca_torus`'s latent MSE: both are the
  pixel MSE inside the basis' span (orthonormal basis), up to the same constant."""
  import jax.numpy as jnp
  from apt2_jax.models import vae as vae_lib
  from apt2_jax.objectives import flow
  rms, white = vae_lib.vae_config("pixels_pca_torus"), vae_lib.vae_config("pixels_pca_torus_white")
  assert vae_lib.latent_loss_weights(rms) is None
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.normal(size=(2, 3, 8, 8, 32)) * np.asarray(white.latents_std), jnp.float32)
          for _ in range(2))
  to = lambda z, cfg: vae_lib.normalize_latents(z, cfg)
  want = flow.mse(to(a, rms), to(b, rms))
  got = flow.mse(to(a, white), to(b, white), vae_lib.latent_loss_weights(white))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)
