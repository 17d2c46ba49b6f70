"""StreamingGenerator == scan rollout; set_text mid-stream; controls and controls-file errors; sampler."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt2_jax import media
from apt2_jax import controls as encodings
from apt2_jax.inference import ControlError, StreamingGenerator, controls, stream_noise
from apt2_jax.models import kv_cache
from apt2_jax.models import vae as vae_lib
from apt2_jax.rollout import rollout
from apt2_jax.configs import sizes

from apt2_jax.models import DiTConfig

H = W = 32
SEED = 5


def tiny_generator(control_channels=20, **kwargs):
  """Tiny camera generator at 32x32 (the trainer's control layout, 4 x 5 channels); compiled
  functions are shared by every test module."""
  config = DiTConfig.from_dict(sizes.model_config("tiny", control_channels=control_channels))
  return StreamingGenerator.random(config, vae_lib.vae_config("tiny"), seed=0, height=H, width=W,
                                   **kwargs)


def first_image():
  y, x = np.mgrid[0:H, 0:W]
  return np.stack([x * 255 // W, y * 255 // H, (x + y) * 127 // (H + W)], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def gen():
  return tiny_generator()


def _stream(gen, controls_seq, text="a camera glides over grass", switch=None):
  frame0 = gen.start(first_image(), text=text, seed=SEED)
  first = gen.last_latent
  text_kv = gen._text_kv
  latents, frames = [], [frame0]
  for i, c in enumerate(controls_seq):
    if switch is not None and i == switch[0]:
      gen.set_text(switch[1])
    frames.append(gen.step(c))
    latents.append(gen.last_latent)
  return first, text_kv, np.concatenate(latents, 1), np.concatenate(frames, 1)


@functools.partial(jax.jit, static_argnums=(0,))
def _jit_rollout(model, params, first, text_kv, noise, maps, cache):
  return rollout(model, params, first, text_kv, noise, maps, cache=cache)


def _rollout(gen, first, text_kv, controls_seq, start=0, cache=None):
  """The scan rollout with the stream's noise and control maps."""
  c = gen.dit_config
  noise = jnp.concatenate([stream_noise(SEED, start + i, first.shape)
                           for i in range(len(controls_seq))], 1)
  raw = np.concatenate([gen.control_input(u) for u in controls_seq])  # [S, 4, D]
  maps = encodings.frame_group_maps(jnp.asarray(raw), *gen.latent_hw, gen.spec.control_encoding)[None]
  cache = kv_cache.init_cache(c, 1, *gen.latent_hw) if cache is None else cache
  return _jit_rollout(gen.model, gen.params, first, text_kv, noise, maps, cache)


KEYS = [{"keys": ["w"]}, {"keys": ["a", "arrowup"]}, None, {"camera": [0.1, 0, 0.05, 0.2, 0]},
        {"keys": ["e", "+"]}, {"keys": ["d"]}, None, {"keys": ["s", "q"]}]


def test_stream_equals_scan_rollout_and_positions_stay_bounded(gen):
  n = gen.dit_config.window
  assert len(KEYS) > 2 * n + 1  # the cache index wraps at least once
  first, text_kv, latents, frames = _stream(gen, KEYS)
  assert frames.shape == (1, 1 + 4 * len(KEYS), H, W, 3) and frames.dtype == np.uint8
  assert n + 1 <= gen.cache_index <= 2 * n
  # One compilation each for the whole stream (no retracing as the index wraps or controls vary).
  assert gen._fns.step._cache_size() == 1 and gen._fns.decode._cache_size() == 1
  expected, _ = _rollout(gen, first, text_kv, KEYS)
  np.testing.assert_allclose(latents, np.asarray(expected), atol=2e-5, rtol=0)
  # The streamed decode equals the whole-clip decode of the rollout's latents.
  z = vae_lib.denormalize_latents(jnp.concatenate([first, expected], 1), gen.vae_config)
  video = jax.jit(lambda p, z: gen.vae.apply(p, z, method=vae_lib.VAE.decode))(gen.vae_params, z)
  want = np.asarray(jnp.round((video + 1) * 127.5)).astype(np.int32)
  assert np.abs(frames.astype(np.int32) - want).max() <= 1
  # Controls matter: another key sequence gives other frames from step 1 on.
  _, _, other, _ = _stream(gen, [{"keys": ["s"]}] + KEYS[1:3])
  np.testing.assert_allclose(other[:, :0], latents[:, :0])
  assert np.abs(other[:, 0] - latents[:, 0]).max() > 1e-3


def test_set_text_mid_stream_keeps_the_visual_cache(gen):
  seq, k = KEYS, len(KEYS) // 2
  first, text_kv, latents, _ = _stream(gen, seq, switch=(k, "a camera circles over sand"))
  part1, cache = _rollout(gen, first, text_kv, seq[:k])
  np.testing.assert_allclose(latents[:, :k], np.asarray(part1), atol=2e-5, rtol=0)
  text_b = gen._fns.text(gen.params, gen._prepare_text("a camera circles over sand"))
  part2, _ = _rollout(gen, part1[:, -1:], text_b, seq[k:], start=k, cache=cache)
  np.testing.assert_allclose(latents[:, k:], np.asarray(part2), atol=2e-5, rtol=0)
  _, _, same_text, _ = _stream(gen, seq)
  assert np.abs(same_text[:, k:] - latents[:, k:]).max() > 1e-4  # the new prompt is used


def test_step_rejects_bad_controls_and_the_stream_continues(gen):
  gen.start(first_image(), text="a camera drifts over grass", seed=0)
  gen.step({"keys": ["w"]})
  index = gen.cache_index
  with pytest.raises(ControlError, match=r"control\.camera\[1\]: 0\.9 is outside \[-0\.15, 0\.15\] \(tilt\)"):
    gen.step({"camera": [0, 0.9, 0, 0, 0]})
  with pytest.raises(ControlError, match=r"control\.keys\[1\]: unknown key 'x'"):
    gen.step({"keys": ["w", "x"]})
  with pytest.raises(ControlError, match=r"control\.keypoints: this model takes 'keys' or 'camera'"):
    gen.step({"keypoints": controls.REST_POSE.tolist()})
  assert gen.cache_index == index
  assert gen.step(None).shape == (1, 4, H, W, 3)
  # `generate` (L latent frames per call, raw controls) checks their shape before touching the stream.
  with pytest.raises(ValueError, match="needs controls"):
    gen.generate(None, 2)
  with pytest.raises(ValueError, match=r"controls must be \[1, L, 4, 5\]"):
    gen.generate(np.zeros((2, 4, 4), np.float32))
  with pytest.raises(ValueError, match="length=3"):
    gen.generate(np.zeros((2, 4, 5), np.float32), 3)
  assert gen.cache_index == index + 1
  assert gen.steps(np.zeros((2, 4, 5), np.float32)).shape == (1, 8, H, W, 3)
  assert gen.cache_index == index + 3 and gen.frames_generated == 1 + 4 * 4


@pytest.mark.parametrize("control, kind, message", [
    ({"camera": [0, 0, 0, 0]}, "camera", r"control\.camera: expected \[pan, tilt, zoom, forward, roll\]"),
    ({"camera": [0, 0, 0, "x", 0]}, "camera", r"control\.camera: expected 5 or \[4, 5\] numbers"),
    ({"camera": [0, 0, float("nan"), 0, 0]}, "camera", r"control\.camera: expected finite numbers"),
    ({"keys": "w"}, "camera", r"control\.keys: expected a list of key names"),
    ({"keys": ["w"], "camera": [0] * 5}, "camera", r"give one of"),
    ({"speed": 3}, "camera", r"unknown field\(s\) \['speed'\]"),
    ([1, 2], "camera", r"control: expected an object"),
    ({"keypoints": [[0.5, 0.5]] * 14}, "pose", r"control\.keypoints: expected 15 \[x, y\] pairs"),
    ({"keypoints": [[0.5, 0.5]] * 3 + [[0.5, 1.5]] + [[0.5, 0.5]] * 11}, "pose",
     r"control\.keypoints\[3\]\[1\]: 1\.5 is outside \[0, 1\]"),
    ({"keys": ["w"]}, "none", r"control\.keys: this model takes no control"),
])
def test_parse_control_errors_name_the_entry(control, kind, message):
  with pytest.raises(ControlError, match=message):
    controls.parse_control(control, kind)


def test_keys_and_control_maps_match_the_trainer():
  """The stream's raw controls [B, 4, D] encode (inside the step) to the trainer's maps."""
  c = controls.parse_control({"keys": ["w", "d", "+"]}, "camera")
  assert c.shape == (4, 5)
  np.testing.assert_allclose(c[0], [0.4 * 0.15, 0, 0.5 * 0.1, 0.5 * 0.25, 0], rtol=1e-6)
  pose = np.stack([controls.REST_POSE + 0.01 * i for i in range(4)])
  # Latent frame 1 of a 5-frame clip with these controls, as the trainer encodes it.
  for kind, user, d, encoding in (("camera", {"camera": c}, 5, "raw"), ("pose", {"keypoints": pose}, 30, "raw"),
                                  ("camera", {"camera": c}, 5, "rays"),
                                  ("pose", {"keypoints": pose}, 30, "keypoint_maps")):
    raw = controls.ControlInput(kind, d, batch=2)(user)
    assert raw.shape == (2, 4, d)
    maps = encodings.frame_group_maps(raw[0], 4, 6, encoding, xp=np)
    clip = np.concatenate([np.zeros((1, d)), raw[0]])[None]
    want = np.asarray(encodings.latent_control_maps(jnp.asarray(clip, jnp.float32), 2, 4, 6, encoding))[0, 1]
    np.testing.assert_allclose(maps, want, rtol=1e-5, atol=1e-6)
  # No control: a still camera (zero ray maps), the last pose held (the rest pose at first).
  still = encodings.frame_group_maps(controls.ControlInput("camera", 5, 1)(None)[0], 4, 4, "rays", xp=np)
  np.testing.assert_allclose(still, 0.0, atol=1e-6)
  held = controls.ControlInput("pose", 30, 1)
  np.testing.assert_array_equal(held(None)[0], np.broadcast_to(controls.REST_POSE.reshape(-1), (4, 30)))
  held({"keypoints": pose})
  np.testing.assert_array_equal(held(None)[0], pose.reshape(4, 30))
  assert controls.ControlInput("none", 0, 1)(None) is None
  assert [controls.control_type({"control_channels": n}) for n in (0, 20, 24, 120, 60)] == [
      "none", "camera", "camera", "pose", "pose"]
  with pytest.raises(ValueError, match="control_channels=7 is no known control layout"):
    controls.control_type({"control_channels": 7})


def test_controls_file_validation(tmp_path):
  good = {"steps": [{"keys": ["w"]}, None, {"camera": [0.05, 0, 0, 0.1, 0], "text": "a camera glides over sand"}]}
  parsed = controls.parse_controls_file(good, "camera")
  steps = controls.controls_for_steps(parsed, 5)
  assert len(steps) == 5 and steps[1]["control"] is None and steps[2]["text"]
  np.testing.assert_allclose(steps[4]["control"], steps[2]["control"])
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"steps": [{"keys": ["w"]}, {"camera": [0, 0, 0, 0.9, 0]}]}))
  with pytest.raises(ControlError, match=r"bad\.json\.steps\[1\]\.camera\[3\]: 0\.9 is outside \[-0\.25, 0\.25\] \(forward\)"):
    controls.load_controls_file(str(bad), "camera")
  bad.write_text("{\"steps\": [")
  with pytest.raises(ControlError, match=r"bad\.json: not valid JSON"):
    controls.load_controls_file(str(bad), "camera")
  with pytest.raises(ControlError, match=r"steps\[0\]\.text: expected a non-empty string"):
    controls.parse_controls_file([{"text": 3}], "camera")
  with pytest.raises(ControlError, match=r"controls\.steps: expected a non-empty list"):
    controls.parse_controls_file({"steps": []}, "camera")
  with pytest.raises(ControlError, match=r"3 steps given, 5 needed and repeat_last is false"):
    controls.controls_for_steps(controls.parse_controls_file(dict(good, repeat_last=False), "camera"), 5)


def test_sample_writes_mp4_and_gif(gen, tmp_path):
  from apt2_jax.inference import sample
  parsed = controls.parse_controls_file([{"keys": ["w"]}, {"text": "a camera circles over sand"}], "camera")
  out = str(tmp_path / "clip.mp4")
  result = sample.sample(gen, first_image(), controls.controls_for_steps(parsed, 3), "a camera glides over grass",
                         0, out, progress=False)
  assert result["frames"] == 13
  mp4, gif = media.read_video(result["mp4"]), media.read_video(result["gif"])
  assert mp4.shape == (13, H, W, 3) and gif.shape == (13, H, W, 3)
