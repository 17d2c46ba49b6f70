"""Rectified flow, consistency distillation and stage helpers: known values, no model compiles."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt2_jax import train
from apt2_jax.models import DiTConfig
from apt2_jax.objectives import consistency, flow
from apt2_jax.stages import common
from apt2_jax.configs import sizes


def test_shift_time_known_values():
  t = jnp.array([0.0, 0.5, 1.0])
  np.testing.assert_allclose(flow.shift_time(t, 24.0), [0.0, 24 * 0.5 / (1 + 23 * 0.5), 1.0], rtol=1e-6)
  np.testing.assert_allclose(flow.shift_time(t, 1.0), t)
  s = flow.sample_time(jax.random.key(0), 4096, 24.0)
  assert s.shape == (4096,) and float(s.min()) > 0 and float(s.max()) < 1
  assert float(jnp.median(s)) > 0.9  # s = 24 puts most clips near pure noise


def test_noisy_target_and_teacher_forcing_shift():
  x0 = jnp.arange(2 * 3 * 2 * 2 * 1, dtype=jnp.float32).reshape(2, 3, 2, 2, 1)
  eps = jnp.ones_like(x0)
  t = jnp.array([0.0, 1.0])
  xt = flow.noisy(x0, eps, t)
  np.testing.assert_allclose(xt[0], x0[0])
  np.testing.assert_allclose(xt[1], eps[1])
  np.testing.assert_allclose(flow.velocity_target(x0, eps), eps - x0)
  # x_t - t v recovers x_0 for the true velocity, at any t.
  tt = jnp.array([0.3, 0.8])
  np.testing.assert_allclose(consistency.consistency_fn(flow.noisy(x0, eps, tt), tt, eps - x0), x0, atol=1e-5)
  controls = jnp.arange(3.0)[None, :, None, None, None] * jnp.ones((2, 3, 2, 2, 1))
  recycled, target, ctrl = flow.teacher_forcing_inputs(x0, controls)
  np.testing.assert_array_equal(recycled, x0[:, :2])   # block s recycles frame s
  np.testing.assert_array_equal(target, x0[:, 1:])     # and generates frame s + 1
  np.testing.assert_array_equal(ctrl[:, :, 0, 0, 0], [[1, 2], [1, 2]])  # with frame s + 1's control


def test_consistency_schedule_and_boundary():
  times = flow.euler_schedule(32, 24.0)
  assert times.shape == (33,) and float(times[0]) == 1.0 and float(times[-1]) == 0.0
  assert bool(jnp.all(jnp.diff(times) < 0))
  t, t_next = consistency.sample_interval(jax.random.key(0), 512, 32, 24.0)
  idx = jnp.searchsorted(-times, -t)
  np.testing.assert_allclose(times[idx + 1], t_next)   # adjacent schedule points
  x = jax.random.normal(jax.random.key(1), (2, 1, 2, 2, 1))
  np.testing.assert_allclose(consistency.consistency_fn(x, jnp.zeros(2), 5 * x), x)  # f(x, 0) = x
  # A teacher Euler step along the true velocity lands on the straight path.
  x0, eps = x, jnp.ones_like(x)
  xt = flow.noisy(x0, eps, jnp.array([0.9, 0.5]))
  out = consistency.teacher_euler_step(xt, jnp.array([0.9, 0.5]), jnp.array([0.4, 0.0]), eps - x0)
  np.testing.assert_allclose(out, flow.noisy(x0, eps, jnp.array([0.4, 0.0])), atol=1e-6)


def test_latent_controls_layout():
  controls = jnp.arange(9 * 2, dtype=jnp.float32).reshape(1, 9, 2)  # 9 video frames, D = 2
  out = common.latent_controls(controls, 3, 2, 2)
  assert out.shape == (1, 3, 2, 2, 8)
  np.testing.assert_array_equal(out[0, 0, 0, 0], np.zeros(8))
  np.testing.assert_array_equal(out[0, 1, 1, 1], controls[0, 1:5].reshape(-1))
  np.testing.assert_array_equal(out[0, 2, 0, 1], controls[0, 5:9].reshape(-1))
  with pytest.raises(ValueError, match="video frames"):
    common.latent_controls(controls[:, :8], 3, 2, 2)


def test_caption_dropout():
  tokens = jnp.ones((1000, 4), jnp.int32)
  out = common.caption_dropout(jax.random.key(0), tokens, 0.25)
  dropped = jnp.all(out == 0, axis=1)
  assert bool(jnp.all(jnp.all(out == 1, axis=1) | dropped))
  assert 0.2 < float(dropped.mean()) < 0.3
  assert common.caption_dropout(jax.random.key(0), tokens, 0.0) is tokens


def test_split_microbatches_is_strided():
  x = jnp.arange(8)
  np.testing.assert_array_equal(train.split_microbatches({"x": x}, 4)["x"], [[0, 4], [1, 5], [2, 6], [3, 7]])
  with pytest.raises(ValueError, match="microbatches"):
    train.split_microbatches({"x": x}, 3)


def _params(config, key):
  c = config.latent_channels
  return {"patch_embedding": {"kernel": jax.random.normal(key, (1, 2, 2, config.in_channels, 8)),
                              "bias": jnp.zeros(8)},
          "proj_out": {"kernel": jnp.ones((8, 4 * c))}}


def test_merge_pretrained_widens_patch_embedding_and_names_errors():
  base = sizes.model_config("tiny")
  old = DiTConfig.from_dict(dict(base, recycled_channels=False, control_channels=0))
  new = DiTConfig.from_dict(dict(base, recycled_channels=True, control_channels=3))
  loaded, fresh = _params(old, jax.random.key(0)), _params(new, jax.random.key(1))
  merged = common.merge_pretrained(fresh, loaded, new, old)
  k_new, k_old, k_fresh = (p["patch_embedding"]["kernel"] for p in (merged, loaded, fresh))
  c = new.latent_channels
  np.testing.assert_array_equal(k_new[..., :c, :], k_old)            # noise channels copied
  np.testing.assert_array_equal(k_new[..., c:, :], k_fresh[..., c:, :])  # recycled + control: random
  assert float(jnp.std(k_new[..., c:, :])) > 0.1                       # (not zeros)
  missing = {"patch_embedding": loaded["patch_embedding"]}
  with pytest.raises(ValueError, match=r"config.init_from.*missing.*proj_out/kernel"):
    common.merge_pretrained(fresh, missing, new, old)
  bad = dict(loaded, proj_out={"kernel": jnp.ones((8, 5))})
  with pytest.raises(ValueError, match=r"proj_out/kernel: checkpoint \(8, 5\) vs model \(8, 16\)"):
    common.merge_pretrained(fresh, bad, new, old)


def test_optimizer_schedule():
  import ml_collections
  opt = ml_collections.ConfigDict(dict(name="adamw", learning_rate=1e-3, warmup_steps=10, schedule="cosine",
                                       end_factor=0.1, weight_decay=0.01, grad_clip=1.0))
  sched = train.learning_rate_schedule(opt, 110)
  np.testing.assert_allclose([sched(0), sched(10), sched(110)], [0.0, 1e-3, 1e-4], rtol=1e-5)
  with pytest.raises(ValueError, match="optimizer.name"):
    train.make_optimizer(ml_collections.ConfigDict(dict(opt.to_dict(), name="lion")), 10)


def test_loss_weight_caps_the_clean_latent_weight():
  t = jnp.array([0.05, 0.25, 0.5, 1.0])
  np.testing.assert_array_equal(flow.loss_weight(t, 0.0), np.ones(4))
  # weight_t = 1: the velocity MSE times t^2 is the clean-latent MSE (x0 = x_t - t v).
  np.testing.assert_allclose(flow.loss_weight(t, 1.0), np.square(t), rtol=1e-6)
  np.testing.assert_allclose(flow.loss_weight(t, 0.5), [0.01, 0.25, 1.0, 1.0], rtol=1e-6)
  x0, eps = jax.random.normal(jax.random.key(0), (2, 4, 3)), jax.random.normal(jax.random.key(1), (2, 4, 3))
  tt = jnp.array([0.2, 0.9])
  x0_hat = x0 + 0.1
  v_hat = (flow.noisy(x0, eps, tt) - x0_hat) / tt[:, None, None]
  np.testing.assert_allclose(flow.loss_weight(tt, 1.0) * flow.mse(v_hat, flow.velocity_target(x0, eps)),
                             flow.mse(x0_hat, x0), rtol=1e-4)
