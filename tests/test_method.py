"""The method's rules in the shipped configs and the stream: the timestep shift in tokens per frame,
controls at unit scale, and the matched multi-step sampler through `generation.stream`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt2_jax import controls
from apt2_jax.configs import benchmark, control, diffusion, sizes, testbed, toy_pipeline
from apt2_jax.configs import adversarial as adversarial_configs
from apt2_jax.generation import stream
from apt2_jax.models import CausalDiT, DiTConfig, init_params
from apt2_jax.models import vae as vae_lib
from apt2_jax.rollout import RolloutOptions
from tests.config_files import camera_control, pose_control

BUILDERS = (diffusion.pretrain_config, diffusion.adapt_config, diffusion.distill_config,
            adversarial_configs.adversarial_config, adversarial_configs.long_video_config)


def _shifts(c):
  out = {"flow": c.flow.shift, "eval": c.eval.sample_shift}
  if "distill" in c:
    out["distill"] = c.distill.shift
  return out


def test_shift_rule_in_tokens_per_frame():
  """shift = max(1, 24 sqrt(tokens / 1196)): 24 at the paper's 736x416 (the wan_1_3b / apt2_8b
  configs), ~1-3 at the toy sizes; every shift of every builder follows it."""
  assert sizes.VAE_SPATIAL_STRIDE == vae_lib.SPATIAL_FACTOR
  assert sizes.tokens_per_frame(416, 736) == sizes.PAPER_TOKENS_PER_FRAME == 1196
  assert sizes.tokens_per_frame(480, 832) == 1560 and sizes.tokens_per_frame(64, 64) == 16
  expected = {4: 1.388, 16: 2.776, 256: 11.104, 1196: 24.0, 1560: 27.410, 1: 1.0}
  for tokens, shift in expected.items():
    assert sizes.flow_shift(tokens) == pytest.approx(shift, abs=1e-3), tokens
  for size, want in (("tiny", 1.388), ("small", 2.776), ("wan_1_3b", 24.0), ("apt2_8b", 24.0)):
    for build in BUILDERS:
      c = build(size)
      tokens = sizes.tokens_per_frame(c.data.height, c.data.width, c.model.patch_size)
      assert all(v == sizes.flow_shift(tokens) for v in _shifts(c).values()), (size, build, _shifts(c))
      assert c.flow.shift == pytest.approx(want, abs=1e-3), (size, build)
  toy = toy_pipeline.get_config("demo")
  for name in ("pretrain", "adapt", "distill"):
    assert all(v == pytest.approx(2.776, abs=1e-3) for v in _shifts(toy.stages[name]).values()), name
  assert toy.evaluation.models.diffusion_stage1.shift == pytest.approx(2.776, abs=1e-3)
  bed = testbed.get_config("short")   # the PCA codec, patch 1x1: 64 tokens per latent frame
  assert testbed.TOKENS_PER_FRAME == 64
  assert all(v == sizes.flow_shift(64) for v in _shifts(bed.stages.distill).values())
  assert bed.stages.adapt.flow.shift == bed.evaluation.models.diffusion.shift == sizes.flow_shift(64)
  assert bed.stages.adapt.flow.weight_t == 1.0
  assert benchmark.get_config("apt2_8b").train.shift == 24.0


def test_shipped_configs_feed_controls_at_unit_scale():
  """Camera: "rays" (24 channels), pose: "keypoint_maps" (60), in every stage builder, the control
  chains and the toy pipeline; "raw" (20 / 120) only on request, for old checkpoints."""
  for build in BUILDERS:
    for world, encoding, channels in (("camera", "rays", 24), ("puppet", "keypoint_maps", 60), ("bouncing", "", 0)):
      c = build(f"small,world={world}")
      assert (c.data.control_encoding, c.model.control_channels) == (encoding, channels), (build, world)
      assert controls.control_channels(encoding, c.data.control_dim) == channels
  for stage in ("pretrain", "adapt", "long_video"):
    cam, pose = camera_control.get_config(f"{stage},tiny"), pose_control.get_config(f"{stage},tiny")
    assert (cam.data.control_encoding, cam.model.control_channels) == ("rays", 24)
    assert (pose.data.control_encoding, pose.model.control_channels) == ("keypoint_maps", 60)
  for name, c in toy_pipeline.get_config("tiny").stages.items():
    if name != "vae":
      assert (c.data.control_encoding, c.model.control_channels) == ("rays", 24), name
  raw = control.chain_config("adapt,small", "puppet", encoding="raw")
  assert (raw.data.control_encoding, raw.model.control_channels) == ("raw", 120)
  assert controls.encoding_from_channels(120, "pose")[1] == "raw"
  with pytest.raises(ValueError, match="control_channels=7"):
    control.chain_config("adapt,small", "camera", control_channels=7)


def test_multistep_baseline_samples_with_matched_caches_by_default():
  for size in ("tiny", "small", "wan_1_3b"):
    assert diffusion.adapt_config(size).eval.sample_cache_from == "matched"
  assert toy_pipeline.get_config("tiny").evaluation.models.diffusion_stage1.cache_from == "matched"
  assert testbed.get_config("tiny").evaluation.models.diffusion.cache_from == "matched"
  assert RolloutOptions(num_steps=4, cache_from="matched").forward_passes == 8
  spec = stream.StreamSpec(DiTConfig(), None, RolloutOptions(num_steps=4, cache_from="matched"), guidance=2.0)
  assert spec.forward_passes_per_frame == 16
  with pytest.raises(ValueError, match="cache_from"):
    RolloutOptions(num_steps=2, cache_from="last")


def test_matched_stream_step_equals_chunk_past_the_rebase():
  """`generation.stream` with the matched sampler: `init_state` allocates one cache per step time,
  L steps equal one chunk of L (same noise, same fresh re-noising), and the index rebase applies to
  every cache, far past the window."""
  config = DiTConfig.from_dict(sizes.model_config("tiny", caption_vocab_size=0))
  params = init_params(CausalDiT(config), jax.random.key(0))
  k, length = 3, 2 * config.window + 3
  spec = stream.StreamSpec(config, None, RolloutOptions(num_steps=k, shift=2.0, cache_from="matched"))
  latent0 = jax.random.normal(jax.random.key(1), (1, 1, 4, 4, config.latent_channels))
  text_kv = stream.text(spec, params, jax.random.normal(jax.random.key(2), (1, 3, config.text_dim)))
  state = stream.init_state(spec, latent0, 7)
  assert state["cache"]["ring_v"].shape[0] == k and state["cache"]["index"].shape == (k,)
  step = jax.jit(lambda s: stream.step(spec, params, s, text_kv))
  frames, s1 = [], state
  for _ in range(length):
    x, s1 = step(s1)
    frames.append(x)
  chunked, s2 = jax.jit(lambda s: stream.chunk(spec, params, s, text_kv, length=length))(state)
  np.testing.assert_allclose(jnp.concatenate(frames, 1), chunked, atol=1e-5, rtol=0)
  assert int(s1["counter"]) == int(s2["counter"]) == length
  np.testing.assert_array_equal(s1["cache"]["index"], s2["cache"]["index"])
  assert int(s1["cache"]["index"][0]) <= 2 * config.window
  for name in ("sink_k", "ring_k", "ring_v"):
    np.testing.assert_allclose(s1["cache"][name], s2["cache"][name], atol=1e-5, rtol=0)


def test_x0_prediction_gives_the_velocity_of_its_clean_estimate(tiny_dit):
  """`model.prediction="x0"`: the head's output is the clean latent and v = (x_t - x0) / max(t, 0.05);
  the one-step generator then returns the head's output; cached steps equal the whole clip."""
  import dataclasses
  from apt2_jax.models import kv_cache
  from apt2_jax.models.dit import X0_MIN_T
  model, params, config = tiny_dit
  x0_model = CausalDiT(dataclasses.replace(config, prediction="x0"))
  b, f, h, w = 2, 3, 4, 6
  ks = jax.random.split(jax.random.key(7), 4)
  noise = jax.random.normal(ks[0], (b, f, h, w, config.latent_channels))
  recycled = jax.random.normal(ks[1], noise.shape)
  control = jax.random.normal(ks[2], (b, f, h, w, config.control_channels))
  text = jax.random.normal(ks[3], (b, 5, config.text_dim))
  t = jnp.array([1.0, 0.02])

  def both(p):
    head = model.apply({"params": p}, noise, recycled, control, t, text)  # same parameters: the raw head
    v = x0_model.apply({"params": p}, noise, recycled, control, t, text)
    tkv = x0_model.apply({"params": p}, text, method=CausalDiT.encode_text)
    cache, steps = kv_cache.init_cache(x0_model.config, b, h, w), []
    for i in range(f):
      vi, cache = x0_model.apply({"params": p}, noise[:, i:i + 1], recycled[:, i:i + 1], control[:, i:i + 1], t,
                                 cache, tkv, method=CausalDiT.step)
      steps.append(vi)
    return head, v, jnp.concatenate(steps, 1)

  head, v, stepped = jax.jit(both)(params)
  scale = jnp.maximum(t, X0_MIN_T)[:, None, None, None, None]
  np.testing.assert_allclose(v, (noise - head) / scale, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stepped, v, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose((noise - v)[0], head[0], atol=1e-5)  # t = 1: x = eps - v is the head's x0
