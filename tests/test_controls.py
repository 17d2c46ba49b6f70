"""The one control encoding (apt2_jax.controls): numpy == jax, training == streaming, unit scale."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt2_jax import controls
from apt2_jax.data import worlds

ENCODINGS = [("camera", "raw"), ("camera", "rays"), ("pose", "raw"), ("pose", "keypoint_maps")]


def _random_controls(kind, shape, rng):
  """Valid per-video-frame controls `shape + [D]`: camera within the limits, keypoints in [0, 1]."""
  if kind == "camera":
    return (rng.uniform(-1, 1, shape + (5,)) * controls.CAMERA_LIMITS).astype(np.float32)
  return rng.uniform(0, 1, shape + (controls.CONTROL_DIM["pose"],)).astype(np.float32)


def test_constants():
  assert controls.CONTROL_TYPES == ("none", "camera", "pose")
  assert controls.CONTROL_DIM == {"none": 0, "camera": 5, "pose": 30}
  assert controls.NUM_KEYPOINTS == len(worlds.PUPPET_KEYPOINTS) == len(controls.REST_POSE)
  assert controls.CAMERA_CONTROLS == worlds.CAMERA_CONTROLS
  np.testing.assert_array_equal(worlds.CAMERA_CONTROL_LIMITS, controls.CAMERA_LIMITS)
  assert set(controls.WORLD_CONTROL_TYPES) == set(worlds.WORLD_NAMES)
  channels = {e: controls.control_channels(e, controls.CONTROL_DIM[k]) for k, e in ENCODINGS[1:]}
  assert controls.control_channels("raw", 5) == 20 and controls.control_channels("raw", 30) == 120
  assert channels == {"rays": 24, "raw": 120, "keypoint_maps": 60}
  assert controls.control_channels("", 0) == 0
  assert [controls.default_encoding(k) for k in controls.CONTROL_TYPES] == ["", "rays", "keypoint_maps"]
  with pytest.raises(ValueError, match="camera controls"):
    controls.control_channels("rays", 30)


def test_encoding_from_channels():
  assert {c: controls.encoding_from_channels(c) for c in (0, 20, 24, 60, 120)} == {
      0: ("none", ""), 20: ("camera", "raw"), 24: ("camera", "rays"), 60: ("pose", "keypoint_maps"),
      120: ("pose", "raw")}
  for kind in ("camera", "pose"):
    encoding = controls.default_encoding(kind)
    channels = controls.control_channels(encoding, controls.CONTROL_DIM[kind])
    assert controls.encoding_from_channels(channels, kind) == (kind, encoding)
  with pytest.raises(ValueError, match="control_channels=7 is no known control layout"):
    controls.encoding_from_channels(7)
  with pytest.raises(ValueError, match="does not fit"):
    controls.encoding_from_channels(24, "pose")


@pytest.mark.parametrize("kind,encoding", ENCODINGS)
def test_numpy_and_jax_agree(kind, encoding):
  rng = np.random.default_rng(0)
  group = _random_controls(kind, (3, 4), rng)                                     # [3, 4, D]
  got_np = controls.frame_group_maps(group, 4, 6, encoding, xp=np)
  fn = jax.jit(functools.partial(controls.frame_group_maps, height=4, width=6, encoding=encoding))
  got_jax = np.asarray(fn(jnp.asarray(group)))
  cc = controls.control_channels(encoding, group.shape[-1])
  assert got_np.shape == got_jax.shape == (3, 4, 6, cc) and got_np.dtype == np.float32
  np.testing.assert_allclose(got_np, got_jax, rtol=1e-6, atol=1e-6)
  clip = _random_controls(kind, (2, 9), rng)                                      # [B, T, D]
  np.testing.assert_allclose(controls.latent_control_maps(clip, 3, 4, 6, encoding, xp=np),
                             jax.jit(functools.partial(controls.latent_control_maps, latent_frames=3,
                                                       height=4, width=6, encoding=encoding))(clip),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind,encoding", ENCODINGS)
def test_latent_maps_stack_frame_groups(kind, encoding):
  """Training (whole clip) and streaming (one latent frame at a time) give the same input."""
  clip = _random_controls(kind, (2, 13), np.random.default_rng(1))
  maps = controls.latent_control_maps(jnp.asarray(clip), 4, 3, 5, encoding)
  cc = controls.control_channels(encoding, clip.shape[-1])
  assert maps.shape == (2, 4, 3, 5, cc)
  np.testing.assert_array_equal(maps[:, 0], 0.0)                                 # the first image
  for j in range(1, 4):
    want = controls.frame_group_maps(jnp.asarray(clip[:, 4 * j - 3:4 * j + 1]), 3, 5, encoding)
    np.testing.assert_allclose(maps[:, j], want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="video frames"):
    controls.latent_control_maps(clip[:, :12], 4, 3, 5, encoding)


def test_layouts():
  rng = np.random.default_rng(2)
  group = _random_controls("camera", (4,), rng)
  raw = controls.frame_group_maps(group, 2, 3, "raw", xp=np)
  np.testing.assert_array_equal(raw[1, 2], group.reshape(-1))                    # frame-major
  rays = controls.frame_group_maps(group, 2, 3, "rays", xp=np)
  for f in range(4):
    np.testing.assert_allclose(rays[..., 6 * f:6 * f + 6],
                               controls.camera_ray_maps(group[f], 2, 3, xp=np), rtol=1e-6)
  pose = _random_controls("pose", (4,), rng)
  maps = controls.frame_group_maps(pose, 8, 8, "keypoint_maps", xp=np)
  for f in range(4):
    np.testing.assert_allclose(maps[..., 15 * f:15 * f + 15],
                               controls.keypoint_maps(pose[f].reshape(15, 2), 8, 8, xp=np))


def test_camera_rays_geometry():
  still = controls.camera_ray_maps(np.zeros((2, 5)), 4, 6, xp=np)
  assert still.shape == (2, 4, 6, 6)
  np.testing.assert_array_equal(still, 0.0)
  pan = controls.camera_ray_maps(np.array([0.05, 0, 0, 0, 0]), 4, 6, normalize=False, xp=np)
  np.testing.assert_allclose(pan[..., :3], 0.0, atol=1e-7)                       # no origin shift
  assert np.all(np.abs(pan[..., 3]) > 0.02)                                      # x direction moves
  fwd = controls.camera_ray_maps(np.array([0, 0, 0, 0.5, 0]), 4, 6, normalize=False, xp=np)
  np.testing.assert_allclose(fwd[..., :3], np.broadcast_to([0, 0, 0.5], fwd[..., :3].shape), atol=1e-6)
  # Against the textbook form R r' - s (float64): the cancellation-free form is the same function.
  c = np.array([0.1, -0.07, 0.05, 0.2, 0.12])
  ry, rx, rz = (worlds._ry(c[0]), worlds._rx(c[1]), worlds._rz(c[4]))
  focal = 0.5 * 6 / np.tan(np.radians(controls.CAMERA_FOV_DEG) / 2)
  y, x = np.meshgrid(np.arange(4) + 0.5 - 2, np.arange(6) + 0.5 - 3, indexing="ij")
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  s = unit(np.stack([x / focal, y / focal, np.ones_like(x)], -1))
  r = unit(np.stack([x / focal / np.exp(c[2]), y / focal / np.exp(c[2]), np.ones_like(x)], -1))
  want = (r @ (ry @ rx @ rz).T - s) / controls.RAY_DIRECTION_STD
  got = controls.camera_ray_maps(c, 4, 6, xp=np)
  np.testing.assert_allclose(got[..., 3:], want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got[0, 0, :3], c[3] * (ry @ rx @ rz)[:, 2] / controls.RAY_ORIGIN_STD,
                             rtol=1e-4)


def test_keypoint_maps_peak_at_keypoints():
  keypoints = np.tile(controls.REST_POSE, (1, 1))
  keypoints[3] = (0.25, 0.75)
  maps = controls.keypoint_maps(keypoints, 16, 16, normalize=False, xp=np)
  assert maps.shape == (16, 16, 15) and maps.max() <= 1.0
  assert np.unravel_index(maps[..., 3].argmax(), (16, 16)) in {(11, 3), (11, 4), (12, 3), (12, 4)}


def _std_per_channel(maps):
  return maps.reshape(-1, maps.shape[-1]).std(0)


@pytest.mark.parametrize("hw", [(4, 4), (8, 8), (6, 10)])
def test_unit_scale_on_world_trajectories(hw):
  """The encodings new models use reach the model at roughly unit scale on the worlds' training
  trajectories (a few dozen clips of 33 frames), at each latent resolution."""
  rng = np.random.default_rng(3)
  cam_world = worlds.make_world("camera", worlds.WorldConfig(height=32, width=32, num_frames=33))
  cam = np.stack([cam_world.random_controls(rng, 33) for _ in range(40)])       # [40, 33, 5]
  rays = controls.latent_control_maps(cam, 9, *hw, "rays", xp=np)[:, 1:]
  std = _std_per_channel(rays)
  assert np.all((0.5 < std) & (std < 2.0)), std
  puppet = worlds.make_world("puppet", worlds.WorldConfig(height=32, width=32, num_frames=33))
  pose = np.stack([puppet.random_controls(rng, 33) for _ in range(40)])          # [40, 33, 30]
  maps = controls.latent_control_maps(pose, 9, *hw, "keypoint_maps", xp=np)[:, 1:]
  std = _std_per_channel(maps)
  assert np.all((0.5 < std) & (std < 2.0)), std


def test_keys_to_camera():
  none = controls.camera_control_from_keys([])
  np.testing.assert_array_equal(none, np.zeros(5))
  w = controls.camera_control_from_keys(["w"])
  np.testing.assert_allclose(w, [0, 0, 0, 0.5 * 0.25, 0])                        # W: 0.125 / frame
  key = controls.camera_control_from_keys({"W", "a", "q", "+"})
  pan, tilt, zoom, forward, roll = key
  assert forward > 0 and pan < 0 and roll < 0 and zoom > 0 and tilt == 0
  np.testing.assert_array_equal(controls.camera_control_from_keys(["w", "s"]), 0)
  assert np.all(np.abs(controls.camera_control_from_keys(list(controls.KEY_BINDINGS)))
                <= controls.CAMERA_LIMITS)
  for key, (name, fraction) in controls.KEY_BINDINGS.items():
    assert name in controls.CAMERA_CONTROLS and 0 < abs(fraction) <= 1, key
  with pytest.raises(ValueError, match=r"keys\[1\]: unknown key 'x'"):
    controls.camera_control_from_keys(["w", "x"])
