"""Sharded training equals one device on 8 CPU devices, on every mesh.

The slow sweep runs one program per mesh that covers what the stages differentiate: the
generator's block-causal pass (stages 1-2) and full pass (stage 0), a student-forcing rollout
through the KV cache (stage 3's generator) and the discriminator (stage 3), then one clipped AdamW
step; its loss, every gradient leaf and the updated parameters must equal the single-device run,
on every factorisation of 8 devices over (data, fsdp, tensor, sequence). The fast tests run the
block-causal part alone on two meshes, one combining tensor and sequence parallelism (where a
strided-conv patch embedding used to get its kernel's gradient `tensor` times too large).
"""
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from apt2_jax import sharding, train
from apt2_jax.configs import sizes
from apt2_jax.models import CausalDiT, Discriminator, DiTConfig, init_params, kv_cache
from apt2_jax.models.discriminator import init_discriminator_params
from apt2_jax.rollout import rollout

B, F, H, W = 8, 5, 4, 8  # batch 8 splits over data x fsdp = 8; 2 x 4 = 8 tokens per frame: sequence up to 8
ROLLOUT = 3              # generated frames of the student-forcing rollout


def factorisations(n=8):
  """Every (data, fsdp, tensor, sequence) with product n, as mesh config dicts."""
  divisors = [d for d in range(1, n + 1) if n % d == 0]
  return [dict(zip(sharding.MESH_AXES, s)) for s in itertools.product(divisors, repeat=4) if np.prod(s) == n]


def mesh_id(m):
  return "-".join(f"{k}{v}" for k, v in m.items() if v > 1) or "single"


ALL_PARTS = ("block_causal", "full", "rollout", "discriminator")


def make_setup(parts):
  """Model, data, optimiser and the single-device result of the step over the losses `parts`."""
  config = DiTConfig.from_dict(sizes.model_config("tiny", control_channels=2, caption_vocab_size=0))
  model, disc = CausalDiT(config), Discriminator(config)
  boxed = (jax.eval_shape(lambda: init_params(model, jax.random.key(0), boxed=True)),
           jax.eval_shape(lambda: init_discriminator_params(disc, jax.random.key(0), boxed=True)))
  params = (init_params(model, jax.random.key(0)), init_discriminator_params(disc, jax.random.key(5)))
  if "discriminator" not in parts:
    boxed, params = boxed[:1], params[:1]
  ks = jax.random.split(jax.random.key(1), 4)
  c = config.latent_channels
  batch = dict(noise=jax.random.normal(ks[0], (B, F, H, W, c)),
               recycled=jax.random.normal(ks[1], (B, F, H, W, c)),
               control=jax.random.normal(ks[2], (B, F, H, W, 2)),
               text=jax.random.normal(ks[3], (B, 3, config.text_dim)),
               t=jnp.linspace(0.1, 1.0, B))
  # Clipping on: a wrong gradient norm would rescale every update (the bug this file guards).
  tx = train.make_optimizer(ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-3, weight_decay=0.01, grad_clip=1.0, eps=1e-3)), 10)

  def loss_fn(ps, batch):
    g = ps[0]
    x = (batch["noise"], batch["recycled"], batch["control"], batch["t"], batch["text"])
    losses = {}
    if "block_causal" in parts:
      losses["block_causal"] = jnp.mean((model.apply({"params": g}, *x) - batch["recycled"]) ** 2)
    if "full" in parts:
      losses["full"] = jnp.mean((model.apply({"params": g}, *x, mode="full") - batch["noise"]) ** 2)
    if "rollout" in parts:
      tkv = model.apply({"params": g}, batch["text"], method=CausalDiT.encode_text)
      frames, _ = rollout(model, g, batch["recycled"][:, :1], tkv, batch["noise"][:, :ROLLOUT],
                          batch["control"][:, 1:ROLLOUT + 1], cache=kv_cache.init_cache(config, B, H, W))
      losses["rollout"] = jnp.mean((frames - batch["recycled"][:, 1:ROLLOUT + 1]) ** 2)
    if "discriminator" in parts:
      losses["discriminator"] = jnp.mean(jax.nn.softplus(disc.apply({"params": ps[1]}, *x)))
    return sum(losses.values()), losses

  def step(ps, opt_state, batch):
    (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(ps, batch)
    new_ps, _, extra = train.apply_gradients(tx, ps, opt_state, grads)
    return dict(losses, loss=loss, grad_norm=extra["grad_norm"]), grads, new_ps

  opt_state = tx.init(params)
  reference = jax.device_get(jax.jit(step)(params, opt_state, batch))
  return dict(config=config, step=step, boxed=boxed, params=params, opt_state=opt_state, batch=batch,
              reference=reference)


@pytest.fixture(scope="module")
def setup():
  return make_setup(("block_causal",))


def run_on_mesh(setup, mesh_cfg):
  """The step on `mesh_cfg` with sharded parameters and batch; (metrics, grads, new params) on the host."""
  mesh = sharding.make_mesh(mesh_cfg)
  with sharding.use_mesh(mesh):
    p_shard = tuple(sharding.param_shardings(b, mesh) for b in setup["boxed"])
    b_shard = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in setup["batch"].items()}
    params = jax.device_put(setup["params"], p_shard)
    if mesh_cfg["fsdp"] > 1:  # parameters really are sharded
      assert not params[0]["blocks"]["attn1"]["to_q"]["kernel"].sharding.is_fully_replicated
    out = jax.jit(setup["step"], in_shardings=(p_shard, None, b_shard),
                  out_shardings=(None, p_shard, p_shard))(params, setup["opt_state"],
                                                          jax.device_put(setup["batch"], b_shard))
  return jax.device_get(out)


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def check_mesh(setup, mesh_cfg):
  """Asserts loss, every gradient leaf and the updated parameters equal one device's; returns the
  largest absolute gradient difference."""
  metrics, grads, new_params = run_on_mesh(setup, mesh_cfg)
  ref_metrics, ref_grads, ref_params = setup["reference"]
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  for k in ref_metrics:
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=2e-5, err_msg=k)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(ref_grads)]
  for path, g, r in zip(paths, jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, atol=2e-6, rtol=2e-4, err_msg=f"gradient {path} on {mesh_id(mesh_cfg)}")
  for path, p, r in zip(paths, jax.tree.leaves(new_params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(p, r, atol=2e-6, rtol=1e-5, err_msg=f"updated {path} on {mesh_id(mesh_cfg)}")
  return max_diff(grads, ref_grads)


FAST_MESHES = [dict(data=1, fsdp=4, tensor=2, sequence=1), dict(data=2, fsdp=1, tensor=2, sequence=2)]


@pytest.mark.parametrize("mesh_cfg", FAST_MESHES, ids=mesh_id)
def test_sharded_step_matches_single_device(setup, mesh_cfg):
  check_mesh(setup, mesh_cfg)


@pytest.mark.slow
def test_every_mesh_of_8_devices_matches_single_device():
  setup = make_setup(ALL_PARTS)
  meshes = factorisations(8)
  assert len(meshes) == 20
  diffs = {mesh_id(m): check_mesh(setup, m) for m in meshes}
  print("\nlargest gradient difference per mesh:\n" + "\n".join(f"  {k}: {v:.2e}" for k, v in diffs.items()))


def test_mesh_config_errors():
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh(dict(data=4, fsdp=4, tensor=1, sequence=1))
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.make_mesh(dict(data=-1, fsdp=-1, tensor=1, sequence=1))
  assert sharding.make_mesh(dict(data=-1, fsdp=2, tensor=1, sequence=1)).shape["data"] == 4
  with pytest.raises(ValueError, match=r"config.logical_rules: unknown logical axis name\(s\) \['embeds'\]"):
    sharding.check_rules((("embeds", "fsdp"),))
  with pytest.raises(ValueError, match=r"config.logical_rules: 'mlp' maps to 'model', not a mesh axis"):
    sharding.check_rules((("mlp", "model"),))
  assert sharding.check_rules(sharding.LOGICAL_RULES) == tuple(sharding.LOGICAL_RULES)
  # The VAE stages shard the batch only: a tensor or sequence axis is refused at start.
  from apt2_jax.configs import vae as vae_configs
  from apt2_jax.train.validate import ConfigError, validate_config
  c = vae_configs.get_config("tiny")
  with c.unlocked():
    c.mesh = sizes.mesh_config(data=-1, tensor=2, sequence=2)
  with pytest.raises(ConfigError, match=r"config.mesh: tensor=2, sequence=2 is not supported by stage 'vae'"):
    validate_config(c)


def test_sharded_cache_step(setup):
  config = setup["config"]
  model = CausalDiT(config)
  params, batch, boxed = setup["params"][0], setup["batch"], setup["boxed"][0]
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=2, sequence=2))
  b = 2
  z = batch["noise"][:b, :1]

  def step(params, cache, tkv):
    return model.apply({"params": params}, z, z, batch["control"][:b, :1], jnp.ones((b,)), cache, tkv,
                       method=CausalDiT.step)
  tkv = model.apply({"params": params}, batch["text"][:b], method=CausalDiT.encode_text)
  cache = kv_cache.init_cache(config, b, H, W)
  ref_v, ref_cache = jax.jit(step)(params, cache, tkv)
  with sharding.use_mesh(mesh):
    c_shard = sharding.cache_shardings(jax.eval_shape(lambda: cache), mesh)
    p_shard = sharding.param_shardings(boxed, mesh)
    cache_s = jax.device_put(cache, c_shard)
    v, new_cache = jax.jit(step, in_shardings=(p_shard, c_shard, None), out_shardings=(None, c_shard),
                           donate_argnums=1)(jax.device_put(params, p_shard), cache_s, tkv)
  np.testing.assert_allclose(v, ref_v, atol=2e-5)
  np.testing.assert_allclose(new_cache["sink_k"], ref_cache["sink_k"], atol=2e-5)
