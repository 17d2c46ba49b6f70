"""Stage 3: adversarial step (sharded == single device), variants (teacher forcing judged in the
real context), long video (memory, unpaired real short clips)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt2_jax import sharding, train
from apt2_jax.models.dit import unbox
from apt2_jax.train import data as train_data
from apt2_jax.train import registry
from tests.config_files import stage3_adversarial, stage3_long_video


def _config(arg="tiny", mesh=None, **overrides):
  c = stage3_adversarial.get_config(arg) if "long" not in overrides.pop("_kind", "") else \
      stage3_long_video.get_config(arg)
  c.data.source = "random_latents"
  c.mesh = mesh or dict(data=1, fsdp=1, tensor=1, sequence=1)
  # One block keeps the compiles of a whole G + D step small; SGD makes the parameter update
  # linear in the gradient, so sharded and single-device updates compare tightly (Adam with
  # b1 = 0 would amplify float noise in near-zero gradients to +-lr).
  c.model.num_layers = 1
  c.adversarial.d_head_layers = (1,)
  for opt in (c.optimizer, c.d_optimizer):
    opt.name, opt.learning_rate, opt.grad_clip = "sgd", 0.1, 0.0
  for k, v in overrides.items():
    c[k] = v
  return c


def _build(config, devices):
  mesh = sharding.make_mesh(config.mesh, devices)
  stage = registry.make_stage(config, mesh)
  rules = sharding.rules_from_config(config)
  with sharding.use_mesh(mesh, rules):
    _, shardings = train.state_shardings(stage, mesh, rules, jax.random.key(0))
    state = jax.jit(lambda r: unbox(stage.init_state(r)), out_shardings=shardings)(jax.random.key(0))
    local = next(train_data.make_iterator(config, "train"))
    batch = train.global_batch(local, train.batch_shardings(local, mesh))
  return mesh, stage, state, batch, shardings


@pytest.fixture(scope="module")
def single():
  config = _config()
  mesh, stage, state, batch, shardings = _build(config, jax.devices()[:1])
  with sharding.use_mesh(mesh):
    new, metrics = jax.jit(stage.train_step)(state, stage.frozen, batch, jax.random.key(5))
  return config, state, new, metrics


def test_adversarial_step_updates_g_and_d(single):
  _, state, new, metrics = single
  for k in ("loss", "g_loss", "d_loss", "r1", "r2", "realism_gap", "d_real", "d_fake"):
    assert np.isfinite(float(metrics[k])), (k, metrics[k])
  assert float(metrics["r1"]) >= 0 and float(metrics["r2"]) >= 0
  moved = lambda a, b: max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert moved(new["params"], state["params"]) > 0
  assert moved(new["d_params"], state["d_params"]) > 0


@pytest.mark.parametrize("zero", [("zero2", "zero3"), pytest.param(("zero3", "zero2"), marks=pytest.mark.slow)],
                         ids=["g_zero2_d_zero3", "g_zero3_d_zero2"])
def test_adversarial_step_on_8_devices_equals_1_device(single, zero):
  """The paper's sharding (G ZeRO-2, D ZeRO-3, the config's default) and the reverse."""
  config, _, new1, metrics1 = single
  config8 = _config(mesh=dict(data=2, fsdp=4, tensor=1, sequence=1))
  config8.adversarial.g_sharding, config8.adversarial.d_sharding = zero
  mesh, stage, state, batch, shardings = _build(config8, jax.devices())
  with sharding.use_mesh(mesh):
    new8, metrics8 = jax.jit(stage.train_step, out_shardings=(shardings, None))(
        state, stage.frozen, batch, jax.random.key(5))
  assert not new8["d_params"]["backbone"]["blocks"]["attn1"]["to_q"]["kernel"].sharding.is_fully_replicated
  for k in ("g_loss", "d_loss", "r1", "r2"):
    np.testing.assert_allclose(float(metrics8[k]), float(metrics1[k]), rtol=2e-4, atol=1e-5)
  for name in ("params", "d_params"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=1e-3),
                 new8[name], new1[name])


def test_one_rollout_vjp_step_equals_rollout_per_gradient(single):
  """micro=1 reuses one rollout for D and (by its VJP) for G; micro=2 rolls out again inside G's
  gradient of each half batch. Same losses and the same updates (losses are batch means)."""
  config, _, new1, metrics1 = single
  config2 = _config(microbatches=2)
  mesh, stage, state, batch, _ = _build(config2, jax.devices()[:1])
  with sharding.use_mesh(mesh):
    new2, metrics2 = jax.jit(stage.train_step)(state, stage.frozen, batch, jax.random.key(5))
  for k in ("g_loss", "d_loss", "r1", "r2"):
    np.testing.assert_allclose(float(metrics2[k]), float(metrics1[k]), rtol=1e-4, atol=1e-6)
  for name in ("params", "d_params"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-3),
                 new2[name], new1[name])


def test_teacher_forcing_variant_recycles_real_frames():
  config = _config("tiny,variant=teacher_forcing")
  mesh, stage, state, batch, _ = _build(config, jax.devices()[:1])
  mb = jax.jit(stage.draw)(stage.frozen, batch, jax.random.key(1))
  fake, _ = jax.jit(stage.generate)(state["params"], mb["first"], mb["eps"], mb["controls"], mb["text"],
                                     mb["real_recycled"])
  b = fake.shape[0]
  v = jax.jit(stage.model.apply, static_argnames="mode")({"params": state["params"]}, mb["eps"], mb["real_recycled"],
                                                         mb["controls"], jnp.ones((b,)), mb["text"], mode="block_causal")
  np.testing.assert_allclose(fake, mb["eps"] - v, atol=1e-5)
  assert stage.fake_recycled(mb["first"], fake, mb["real_recycled"]) is mb["real_recycled"]
  with pytest.raises(ValueError, match="adversarial.variant"):
    _build(_config("tiny,variant=half_forcing"), jax.devices()[:1])


def test_zero2_gathers_g_whole_once_with_bf16_block_kernels():
  """`stage.whole("g", ...)` under ZeRO-2 on fsdp 8: every leaf whole on every device; the block
  kernels in the compute dtype (what their Dense casts them to on use), the rest as stored."""
  config = _config(mesh=dict(data=1, fsdp=8, tensor=1, sequence=1))
  config.model.dtype = "bfloat16"
  mesh = sharding.make_mesh(config.mesh, jax.devices())
  stage = registry.make_stage(config, mesh)
  assert stage.zero == {"g": "zero2", "d": "zero3"}  # the paper's, the config's default
  rules = sharding.rules_from_config(config)
  with sharding.use_mesh(mesh, rules):
    _, shardings = train.state_shardings(stage, mesh, rules, jax.random.key(0))
    state = jax.jit(lambda r: unbox(stage.init_state(r)), out_shardings=shardings)(jax.random.key(0))
    whole = jax.jit(lambda p: stage.whole("g", p))(state["params"])
  kernel = state["params"]["blocks"]["attn1"]["to_q"]["kernel"]
  assert not kernel.sharding.is_fully_replicated
  assert whole["blocks"]["attn1"]["to_q"]["kernel"].dtype == jnp.bfloat16
  assert whole["blocks"]["norm2"]["scale"].dtype == jnp.float32
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(whole))
  np.testing.assert_array_equal(np.asarray(whole["blocks"]["attn1"]["to_q"]["kernel"], np.float32),
                                np.asarray(kernel.astype(jnp.bfloat16), np.float32))


def test_memory_options_fail_at_start_naming_the_field():
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, sequence=1), jax.devices()[:1])
  for arg, field in (("tiny,rollout_backward=reverse", "adversarial.rollout_backward='reverse'"),
                     ("tiny,g_pass=later", "adversarial.g_pass='later'"),
                     ("tiny,g_sharding=zero1", "adversarial.g_sharding='zero1'"),
                     ("tiny,d_sharding=fsdp", "adversarial.d_sharding='fsdp'"),
                     ("tiny,d_clips_per_pass=-1", "adversarial.d_clips_per_pass=-1")):
    with pytest.raises(ValueError, match=field):
      registry.make_stage(_config(arg), mesh)


def test_teacher_forcing_discriminator_judges_fakes_in_the_real_context():
  """Teacher forcing: D judges generated frame i with the REAL frames < i as its context (as G made
  it): equal to a brute-force block-causal pass per frame over the real clip with block i
  replaced; the D loss and G's loss use these logits. Past the window (ring eviction)."""
  config = _config("tiny,variant=teacher_forcing")
  config.data.frames = 1 + 4 * 6  # 6 judged frames, window 3
  mesh, stage, state, batch, _ = _build(config, jax.devices()[:1])
  mb = jax.jit(stage.draw)(stage.frozen, batch, jax.random.key(1))
  # Any generated frames will do; far from the real ones, so that the context matters to a fresh D.
  fake = 10.0 * jax.random.normal(jax.random.key(2), mb["real"].shape)
  d_params = state["d_params"]
  tf = jax.jit(lambda d, mb, f: stage.teacher_forced_logits(d, mb, [f, f + 0.1])[0])(d_params, mb, fake)
  logits = jax.jit(lambda judged: stage.d_logits(d_params, judged, mb["real_recycled"], mb["controls"], mb["text"],
                                                 mb["t_d"], mb["d_eps"]))
  steps = fake.shape[1]
  brute = jnp.stack([logits(mb["real"].at[:, i].set(fake[:, i]))[:, i] for i in range(steps)], axis=1)
  np.testing.assert_allclose(tf, brute, atol=5e-6, rtol=0)
  own_context = logits(fake)  # the old formulation: generated frames as D's context
  assert float(jnp.abs(own_context[:, 1:] - brute[:, 1:]).max()) > 5e-5
  np.testing.assert_allclose(own_context[:, 0], brute[:, 0], atol=5e-6)  # frame 0: no context either way
  mb_d = dict(mb, fake=fake, fake_recycled=mb["real_recycled"])
  _, metrics = jax.jit(stage.d_loss_fn)(d_params, mb_d)
  np.testing.assert_allclose(float(metrics["d_fake"]), float(jnp.mean(brute)), rtol=1e-5, atol=1e-6)
  _, g_metrics = jax.jit(stage._g_loss_on)(d_params, mb, fake, mb["real_recycled"])
  np.testing.assert_allclose(float(g_metrics["g_fake_logit"]), float(jnp.mean(brute)), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_teacher_forcing_step_runs():
  config = _config("tiny,variant=teacher_forcing")
  mesh, stage, state, batch, _ = _build(config, jax.devices()[:1])
  with sharding.use_mesh(mesh):
    _, metrics = jax.jit(stage.train_step)(state, stage.frozen, batch, jax.random.key(0))
  assert np.isfinite(float(metrics["loss"])) and float(metrics["r2"]) >= 0


def test_long_video_judges_unpaired_real_clips():
  """Long video: the rollouts (even batch rows) need only their first frame, prompt and controls;
  D's real side comes from the independent clips of the odd rows. Changing the even rows' later
  frames changes nothing; changing the odd rows' frames changes D's real logits."""
  config = _config("tiny,num_segments=2", _kind="long")
  mesh, stage, state, batch, _ = _build(config, jax.devices()[:1])
  latents = np.asarray(batch["latents"])
  even, odd = latents.copy(), latents.copy()
  even[0::2, 1:] = -even[0::2, 1:] + 1.0
  odd[1::2, 1:] = -odd[1::2, 1:] + 1.0
  with sharding.use_mesh(mesh):
    step = jax.jit(stage.train_step)
    runs = [step(state, stage.frozen, dict(batch, latents=jnp.asarray(x)), jax.random.key(3))
            for x in (latents, even, odd)]
  (a, ma), (b, mb), (_, mc) = runs
  for k in ("g_loss", "d_loss", "d_real", "d_fake", "r1"):
    assert float(ma[k]) == float(mb[k]), k
  for x, y in zip(jax.tree.leaves((a["params"], a["d_params"])), jax.tree.leaves((b["params"], b["d_params"]))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert abs(float(ma["d_real"]) - float(mc["d_real"])) > 1e-4
  assert float(ma["d_fake"]) == float(mc["d_fake"])  # the rollouts never see the real clips
  with pytest.raises(ValueError, match="batch_size=7 must be even"):
    _build(_config("tiny,num_segments=2", _kind="long", batch_size=7), jax.devices()[:1])


def test_long_video_segments_scan_as_one_program_and_memory_does_not_grow_with_length():
  """With overlap 1 all segments scan as one program, equal to the general path (segment 0
  traced apart, as for overlap > 1); the compiled temp memory at 2 vs 4 segments (the video
  doubles) stays flat."""
  compiled, built = {}, {}
  for segments, fold in ((2, True), (2, False), (4, True)):
    config = _config(f"tiny,num_segments={segments}", _kind="long")
    mesh, stage, state, batch, _ = built.get(segments) or _build(config, jax.devices()[:1])
    built[segments] = (mesh, stage, state, batch, None)
    assert stage.fold_segments
    stage.fold_segments = fold
    with sharding.use_mesh(mesh):
      compiled[segments, fold] = jax.jit(stage.train_step).lower(state, stage.frozen, batch, jax.random.key(3)).compile()
  temps = {k: c.memory_analysis().temp_size_in_bytes for k, c in compiled.items()}
  assert temps[2, True] > 0
  assert temps[4, True] < 1.25 * temps[2, True], temps

  _, stage, state, batch, _ = built[2]
  (a, ma), (b, mb) = (compiled[2, fold](state, stage.frozen, batch, jax.random.key(3)) for fold in (True, False))
  for k in ("g_loss", "d_loss", "r1", "realism_gap"):
    np.testing.assert_allclose(float(ma[k]), float(mb[k]), rtol=1e-5, atol=1e-6, err_msg=k)
  for x, y in zip(jax.tree.leaves((a["params"], a["d_params"])), jax.tree.leaves((b["params"], b["d_params"]))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  moved = max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(state["params"])))
  assert moved > 0


@pytest.mark.slow
def test_long_video_step_runs():
  config = _config("tiny,num_segments=3", _kind="long")
  mesh, stage, state, batch, _ = _build(config, jax.devices()[:1])
  with sharding.use_mesh(mesh):
    new, metrics = jax.jit(stage.train_step)(state, stage.frozen, batch, jax.random.key(0))
  assert np.isfinite(float(metrics["loss"]))
