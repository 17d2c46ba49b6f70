"""Sharded whole-clip forward and gradient equal the single-device result on 8 CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt2_jax import sharding
from apt2_jax.configs import sizes
from apt2_jax.models import CausalDiT, DiTConfig, init_params, kv_cache

MESHES = [dict(data=8, fsdp=1, tensor=1, sequence=1),
          dict(data=1, fsdp=4, tensor=2, sequence=1),
          dict(data=2, fsdp=1, tensor=1, sequence=4)]


@pytest.fixture(scope="module")
def setup():
  config = DiTConfig.from_dict(sizes.model_config("tiny", control_channels=2, caption_vocab_size=0))
  model = CausalDiT(config)
  boxed = jax.eval_shape(lambda: init_params(model, jax.random.key(0), boxed=True))
  params = init_params(model, jax.random.key(0))
  ks = jax.random.split(jax.random.key(1), 4)
  b, f, h, w = 8, 5, 4, 8  # 2 x 4 = 8 tokens per frame: divisible by sequence=4
  c = config.latent_channels
  batch = dict(noise=jax.random.normal(ks[0], (b, f, h, w, c)),
               recycled=jax.random.normal(ks[1], (b, f, h, w, c)),
               control=jax.random.normal(ks[2], (b, f, h, w, 2)),
               text=jax.random.normal(ks[3], (b, 3, config.text_dim)),
               t=jnp.linspace(0.1, 1.0, b))

  def loss_fn(params, batch):
    v = model.apply({"params": params}, batch["noise"], batch["recycled"], batch["control"],
                    batch["t"], batch["text"])
    return jnp.mean((v - batch["recycled"]) ** 2), v

  ref_loss, ref_v = jax.jit(loss_fn)(params, batch)
  ref_grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b)[0]))(params, batch)
  return model, config, boxed, params, batch, loss_fn, (ref_loss, ref_v, ref_grad)


@pytest.mark.parametrize("mesh_cfg", MESHES, ids=lambda m: "-".join(f"{k}{v}" for k, v in m.items() if v > 1))
def test_sharded_forward_and_grad_match_single_device(setup, mesh_cfg):
  model, config, boxed, params, batch, loss_fn, (ref_loss, ref_v, ref_grad) = setup
  mesh = sharding.make_mesh(mesh_cfg)
  with sharding.use_mesh(mesh):
    p_shard = sharding.param_shardings(boxed, mesh)
    b_shard = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
    params_s = jax.device_put(params, p_shard)
    batch_s = jax.device_put(batch, b_shard)
    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
                   in_shardings=(p_shard, b_shard), out_shardings=((None, None), p_shard))
    (loss, v), grad = step(params_s, batch_s)
  if mesh_cfg["fsdp"] > 1:  # parameters really are sharded
    assert not params_s["blocks"]["attn1"]["to_q"]["kernel"].sharding.is_fully_replicated
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(v, ref_v, atol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-4), grad, ref_grad)


def test_mesh_config_errors():
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh(dict(data=4, fsdp=4, tensor=1, sequence=1))
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.make_mesh(dict(data=-1, fsdp=-1, tensor=1, sequence=1))
  assert sharding.make_mesh(dict(data=-1, fsdp=2, tensor=1, sequence=1)).shape["data"] == 4


def test_sharded_cache_step(setup):
  model, config, boxed, params, batch, _, _ = setup
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=2, sequence=2))
  b, h, w = 2, 4, 8
  z = batch["noise"][:b, :1]
  def step(params, cache, tkv):
    return model.apply({"params": params}, z, z, batch["control"][:b, :1], jnp.ones((b,)), cache, tkv,
                       method=CausalDiT.step)
  tkv = model.apply({"params": params}, batch["text"][:b], method=CausalDiT.encode_text)
  cache = kv_cache.init_cache(config, b, h, w)
  ref_v, ref_cache = jax.jit(step)(params, cache, tkv)
  with sharding.use_mesh(mesh):
    c_shard = sharding.cache_shardings(jax.eval_shape(lambda: cache), mesh)
    p_shard = sharding.param_shardings(boxed, mesh)
    cache_s = jax.device_put(cache, c_shard)
    v, new_cache = jax.jit(step, in_shardings=(p_shard, c_shard, None), out_shardings=(None, c_shard),
                           donate_argnums=1)(jax.device_put(params, p_shard), cache_s, tkv)
  np.testing.assert_allclose(v, ref_v, atol=2e-5)
  np.testing.assert_allclose(new_cache["sink_k"], ref_cache["sink_k"], atol=2e-5)
