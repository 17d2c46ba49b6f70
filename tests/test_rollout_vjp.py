"""The ring-cache rollout VJP (`RolloutOptions.backward="ring"`) equals autodiff of the scan;
stage 3's step on the memory-lean path equals the old one; the rollout's compiled temporaries grow
by one evicted ring slot per step, not by one whole cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt2_jax import sharding, train
from apt2_jax.benchmark.aot import AOT_XLA_FLAGS
from apt2_jax.configs import sizes
from apt2_jax.models import CausalDiT, DiTConfig, init_params, kv_cache
from apt2_jax.models.dit import unbox
from apt2_jax.rollout import RolloutOptions, rollout
from apt2_jax.train import data as train_data
from apt2_jax.train import registry
from tests.config_files import stage3_adversarial

B, H, W = 2, 4, 6
WARM = 5  # index of the non-empty initial cache (a long-video segment continues one)


def _leaves(tree):
  return [x for x in jax.tree.leaves(tree) if x.dtype != jax.dtypes.float0]


@pytest.fixture(scope="module")
def rollout_grads(tiny_dit):
  """grads(options, start): gradients of a loss on the frames and the final cache w.r.t. params,
  first frame, noise, controls and the initial cache, for a rollout of N + 3 steps (the ring
  wraps), from an empty cache or (`start`) a full one at index WARM. One compile per options."""
  model, params, config = tiny_dit
  steps = config.window + 3
  ks = jax.random.split(jax.random.key(3), 6)
  c = config.latent_channels
  first = jax.random.normal(ks[0], (B, 1, H, W, c))
  noise = jax.random.normal(ks[1], (B, steps, H, W, c))
  controls = jax.random.normal(ks[2], (B, steps, H, W, config.control_channels))
  text = jax.random.normal(ks[3], (B, 5, config.text_dim))
  weight = jax.random.normal(ks[4], noise.shape)
  empty = kv_cache.init_cache(config, B, H, W)
  # Any contents will do for the VJP: random keys/values at index WARM (sink set, ring full).
  warm = {k: jax.random.normal(jax.random.fold_in(ks[5], i), v.shape) for i, (k, v) in enumerate(empty.items())}
  warm["index"] = jnp.asarray(WARM, jnp.int32)
  fns = {}

  def grads(options, start, gather=None):
    if (options, gather) not in fns:
      def loss(params, first, noise, controls, cache):
        tkv = model.apply({"params": params}, text, method=CausalDiT.encode_text)
        frames, out = rollout(model, params, first, tkv, noise, controls, cache=cache, options=options, gather=gather)
        return jnp.sum(frames * weight) + sum(jnp.sum(jnp.sin(out[k])) for k in ("sink_v", "ring_k", "ring_v"))
      fns[options, gather] = jax.jit(jax.grad(loss, argnums=range(5), allow_int=True))
    return fns[options, gather](params, first, noise, controls, warm if start else empty)
  return grads


def _assert_same(new, old):
  """Equal up to float32 reassociation (two XLA programs sum in different orders): per leaf, relative
  L2 error <= 2e-6 (measured: <= 7.3e-7) and no element off by more than 1e-5 of the leaf's
  largest entry."""
  assert len(new) == len(old)
  for a, b in zip(new, old):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.linalg.norm(a - b) <= 2e-6 * max(np.linalg.norm(b), 1e-3), (np.linalg.norm(a - b), np.linalg.norm(b))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("kw", [{}, {"detach_cache": True, "recycle": False}], ids=["base", "detach_cache_no_recycle"])
def test_ring_vjp_equals_scan_autodiff(rollout_grads, kw):
  """From an empty cache and from a non-empty one (index WARM: the sink is set, the ring wraps)."""
  for start in (False, True):
    new = _leaves(rollout_grads(RolloutOptions(**kw), start))
    _assert_same(new, _leaves(rollout_grads(RolloutOptions(backward="scan", remat="full", **kw), start)))
    if start:  # the gradient reaches the non-empty initial cache
      assert max(float(jnp.max(jnp.abs(x))) for x in new[-4:]) > 1e-3


def _scaled(params):
  """A stand-in for ZeRO-2's gather (`sharding.gather_whole`): a linear map of the parameters."""
  return jax.tree.map(lambda x: 0.5 * x, params)


def test_ring_vjp_pulls_each_step_back_through_the_gather(rollout_grads):
  """`rollout(gather=)`: the steps use `gather(params)`; the ring VJP pulls each step's gradient
  back through the gather before summing. Equal to autodiff of the scan through the same map."""
  new = _leaves(rollout_grads(RolloutOptions(), True, _scaled))
  _assert_same(new, _leaves(rollout_grads(RolloutOptions(backward="scan", remat="full"), True, _scaled)))


def _stage3_config(**adversarial):
  c = stage3_adversarial.get_config("tiny")
  c.data.source = "random_latents"
  c.data.frames = 1 + 4 * 6  # 6 generated latent frames: past the ring (N = 3)
  c.batch_size = 2
  c.mesh = dict(data=1, fsdp=1, tensor=1, sequence=1)
  c.model.num_layers = 1
  c.adversarial.d_head_layers = (1,)
  for opt in (c.optimizer, c.d_optimizer):
    opt.name, opt.learning_rate, opt.grad_clip = "sgd", 0.1, 0.0
  for k, v in adversarial.items():
    c.adversarial[k] = v
  return c


def test_stage3_step_lean_path_equals_old():
  """New: ring-cache VJP, G rolled out again after D's update, D's clips one pass each. Old:
  autodiff of the scan with remat, G pulled back through the rollout D trained on, D's clips in
  one pass. Same state, batch and key."""
  configs = (_stage3_config(d_clips_per_pass=1), _stage3_config(rollout_backward="scan", g_pass="keep"))
  mesh = sharding.make_mesh(configs[0].mesh, jax.devices()[:1])
  stages = [registry.make_stage(c, mesh) for c in configs]
  with sharding.use_mesh(mesh, sharding.rules_from_config(configs[0])):
    state = jax.jit(lambda r: unbox(stages[0].init_state(r)))(jax.random.key(0))
    batch = next(train_data.make_iterator(configs[0], "train"))
    batch = train.global_batch(batch, train.batch_shardings(batch, mesh))
    (new_state, new_metrics), (old_state, old_metrics) = (
        jax.device_get(jax.jit(s.train_step)(state, s.frozen, batch, jax.random.key(5))) for s in stages)
  for k in ("g_loss", "d_loss", "r1", "r2", "g_grad_norm", "d_grad_norm"):
    np.testing.assert_allclose(new_metrics[k], old_metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for name in ("params", "d_params"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new_state[name], old_state[name])


def _compiler_options():
  """`AOT_XLA_FLAGS` as per-compile options (the backend has started; XLA_FLAGS would be ignored)."""
  return dict(f[2:].split("=", 1) for f in AOT_XLA_FLAGS)


def test_rollout_temporaries_grow_by_one_slot_per_step():
  """Temporaries of a rollout's gradient (w.r.t. G's parameters) per extra step: one evicted ring
  slot, 1 / (N + 1) of the cache, plus the step's frame and its cotangent. The tiny model with
  N = 8: a slot is 0.11 of the cache (at tiny's N = 3 it is 0.25; at N = 30, 0.03)."""
  config = DiTConfig.from_dict(sizes.model_config("tiny", control_channels=2, caption_vocab_size=0, window=8))
  model = CausalDiT(config)
  params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  b, h, w, c = 1, 16, 16, config.latent_channels
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)

  def temp(steps):
    def loss(params, first, noise, controls, text):
      tkv = model.apply({"params": params}, text, method=CausalDiT.encode_text)
      frames, _ = rollout(model, params, first, tkv, noise, controls, cache=kv_cache.init_cache(config, b, h, w))
      return jnp.sum(frames ** 2)
    args = (params, spec(b, 1, h, w, c), spec(b, steps, h, w, c), spec(b, steps, h, w, 2), spec(b, 5, config.text_dim))
    compiled = jax.jit(jax.grad(loss)).lower(*args).compile(_compiler_options())
    return compiled.memory_analysis().temp_size_in_bytes

  s1, s2 = config.window + 2, config.window + 6
  per_step = (temp(s2) - temp(s1)) / (s2 - s1)
  cache = kv_cache.cache_bytes(config, b, h, w)
  assert per_step <= 0.2 * cache, (per_step, cache)
