"""Camera ray maps: still camera is zero, unit std on the world's trajectories, shared layout."""
import jax.numpy as jnp
import numpy as np

from apt2_jax.models import conditioning


def test_still_camera_gives_zero_maps_and_pan_moves_directions():
  maps = np.asarray(conditioning.camera_ray_maps(jnp.zeros((2, 5)), 4, 6))
  assert maps.shape == (2, 4, 6, 6)
  np.testing.assert_allclose(maps, 0.0, atol=1e-6)
  pan = np.asarray(conditioning.camera_ray_maps(jnp.array([[0.05, 0, 0, 0, 0]]), 4, 6, normalize=False))[0]
  np.testing.assert_allclose(pan[..., :3], 0.0, atol=1e-7)        # rotation only: no origin shift
  assert np.all(np.abs(pan[..., 3]) > 0.02)                        # x direction changes everywhere
  fwd = np.asarray(conditioning.camera_ray_maps(jnp.array([[0, 0, 0, 0.5, 0]]), 4, 6, normalize=False))[0]
  np.testing.assert_allclose(fwd[..., :3], np.broadcast_to([0, 0, 0.5], fwd[..., :3].shape), atol=1e-6)


def test_ray_maps_have_unit_std_on_world_trajectories():
  from apt2_jax.data import worlds
  world = worlds.make_world("camera", worlds.WorldConfig(height=32, width=32, num_frames=33))
  rng = np.random.default_rng(1)
  controls = np.concatenate([world.random_controls(rng, 33)[1:] for _ in range(60)])
  std = np.asarray(conditioning.camera_ray_maps(controls, 4, 4)).reshape(-1, 6).std(0)
  assert np.all((0.5 < std) & (std < 1.6)), std


def test_latent_control_layouts():
  controls = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 5)) * 0.02, jnp.float32)
  raw = conditioning.latent_control_maps(controls, 3, 2, 2, "raw")
  assert raw.shape == (2, 3, 2, 2, 20)
  np.testing.assert_allclose(raw[:, 0], 0.0)
  np.testing.assert_allclose(raw[0, 1, 0, 0], np.asarray(controls[0, 1:5]).reshape(-1), rtol=1e-6)
  rays = conditioning.latent_control_maps(controls, 3, 2, 2, "rays")
  assert rays.shape == (2, 3, 2, 2, 24)
  np.testing.assert_allclose(rays[1, 2, ..., 6:12], conditioning.camera_ray_maps(controls[1, 6], 2, 2), rtol=1e-5)
  assert conditioning.control_channels("rays", 5) == 24 and conditioning.control_channels("raw", 30) == 120
