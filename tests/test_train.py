"""The shared trainer on the tiny stage-1 config (random latents, 8 virtual CPU devices).

Equivalences: loss decreases on a fixed batch; 4 microbatches == one batch; fsdp and data+tensor
meshes == 1 device; a killed and restarted run == the uninterrupted run; restore onto another
mesh; init_from / load_params; config errors name their field. Compiles are shared through
module fixtures and a per-module persistent compilation cache (the loop's step compiles once
for three runs).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt2_jax import checkpointing, sharding, train
from apt2_jax.train import data as train_data
from tests.config_files import stage0_pretrain, stage1_adapt, stage2_distill


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  from jax._src import compilation_cache as cc
  old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  cc.reset_cache()
  yield
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
  cc.reset_cache()


def tiny_config(module=stage1_adapt, **overrides):
  c = module.get_config("tiny")
  c.data.source = "random_latents"
  c.data.text_len = 8
  c.batch_size = 8
  c.progress_bar = False
  c.eval_at_end = False
  # Adam's first steps move near-zero-gradient weights by ~g / (|g| + eps): with eps = 1e-8, float
  # noise in g decides their sign. A larger eps keeps equivalence tests about the gradients.
  c.optimizer.eps = 1e-3
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


class Runner:
  """A stage, its sharded state and its jitted (guarded) step on `devices`."""

  def __init__(self, config, devices):
    self.config = config
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.rules = sharding.rules_from_config(config)
    with self.ctx():
      self.stage = train.make_stage(config, self.mesh)
      self.abstract, self.shardings = train.state_shardings(self.stage, self.mesh, self.rules,
                                                            jax.random.key(config.seed))
      local = train_data.make_iterator(config, "train").peek()
      self.b_shard = train.batch_shardings(local, self.mesh)
      self.step_fn = jax.jit(train.guarded_step(self.stage, config.seed),
                             in_shardings=(self.shardings, {}, self.b_shard),
                             out_shardings=(self.shardings, sharding.replicated(self.mesh)),
                             donate_argnums=(0,))

  def ctx(self):
    return sharding.use_mesh(self.mesh, self.rules)

  def init(self):
    with self.ctx():
      return jax.jit(lambda r: train.unbox(self.stage.init_state(r)),
                     out_shardings=self.shardings)(jax.random.key(self.config.seed))

  def put(self, host_state):
    return jax.device_put(host_state, self.shardings)

  def batch(self, index=0):
    it = train_data.make_iterator(self.config, "train")
    it.count = index
    return train.global_batch(next(it), self.b_shard)

  def step(self, state, batch):
    with self.ctx():
      return self.step_fn(state, {}, batch)


@pytest.fixture(scope="module")
def single(devices):
  return Runner(tiny_config(), devices[:1])


@pytest.fixture(scope="module")
def reference(single):
  """Host copies of the initial state, the state after 2 steps and their losses (1 device)."""
  state0 = jax.device_get(single.init())
  state, losses = single.put(state0), []
  for i in range(2):
    state, m = single.step(state, single.batch(i))
    losses.append(float(m["loss"]))
  return state0, jax.device_get(state), losses


# ------------------------------------------------------------------------------------------------
def test_one_step_smoke_and_loss_decreases_on_a_fixed_batch(single, reference):
  state0, _, _ = reference
  state, batch, losses = single.put(state0), single.batch(0), []
  for _ in range(30):
    state, m = single.step(state, batch)
    losses.append(float(m["loss"]))
    assert np.isfinite(losses[-1]) and int(m["nonfinite_total"]) == 0
  assert int(state["step"]) == 30
  assert set(m) >= {"loss", "grad_norm", "learning_rate"}
  # 0.7: with the token-rule shift (1.4 at 4 tokens) and ray-map controls the ratio is ~0.61-0.66
  # after 30 steps (it was 0.60 with shift 24 and raw controls); the fit is what this checks.
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_gradient_accumulation_matches_one_big_batch(single, reference):
  state0 = reference[0]
  stage = single.stage
  batch = single.batch(0)

  def both(params, batch):  # one compile for both: the step's draw, then 1 and 4 microbatches
    mb = stage.draw({}, batch, jax.random.key(3))
    return (train.accumulate_gradients(stage.loss_fn, params, mb, 1),
            train.accumulate_gradients(stage.loss_fn, params, mb, 4))

  with single.ctx():
    (g1, m1), (g4, m4) = jax.device_get(jax.jit(both)(single.put(state0)["params"], batch))
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), g4, g1)
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(g1)) > 1e-3  # not all zero


@pytest.mark.parametrize("mesh", [dict(data=1, fsdp=8), dict(data=4, tensor=2)], ids=["fsdp8", "data4-tensor2"])
def test_sharded_step_matches_single_device(devices, reference, mesh):
  state0, after2, losses = reference
  runner = Runner(tiny_config(**{f"mesh.{k}": v for k, v in dict(dict(data=1, fsdp=1, tensor=1), **mesh).items()}),
                  devices)
  state = runner.put(state0)
  if mesh.get("fsdp", 1) > 1:
    assert not state["params"]["blocks"]["attn1"]["to_q"]["kernel"].sharding.is_fully_replicated
    assert not state["opt_state"][1][0].mu["blocks"]["attn1"]["to_q"]["kernel"].sharding.is_fully_replicated
  got = []
  for i in range(2):
    state, m = runner.step(state, runner.batch(i))
    got.append(float(m["loss"]))
  np.testing.assert_allclose(got, losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4),
               jax.device_get(state["params"]), after2["params"])


# ------------------------------------------------------------------------------------------------
LOOP_MESH = {"mesh.data": 4, "mesh.tensor": 2}  # the data+tensor case above: same compiled step


def test_restart_reproduces_uninterrupted_run(tmp_path, devices):
  config = tiny_config(num_steps=6, checkpoint_every=2, **LOOP_MESH)
  full = str(tmp_path / "full")
  train.train_and_evaluate(config, full)
  with open(os.path.join(full, "metrics.jsonl")) as f:
    rows = f.read()
  again = train.train_and_evaluate(config, full)  # finished: says so, trains and writes nothing
  assert again["finished"] and again["train"]["loss"] == train.read_metrics(full)[6]
  with open(os.path.join(full, "metrics.jsonl")) as f:
    assert f.read() == rows
  killed = str(tmp_path / "killed")
  train.train_and_evaluate(config, killed, stop_after_step=5)  # "killed" after step 5
  assert checkpointing.resolve(killed)[1] == 4
  out = train.train_and_evaluate(config, killed)              # resumes at step 4
  a, b = train.read_metrics(full), train.read_metrics(killed)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  assert a == b  # exactly
  # Everything the run needs to resume was saved: state, per-process data state, config (JSON).
  step_dir = os.path.join(killed, "checkpoints", "6")
  assert os.path.exists(os.path.join(step_dir, "data", "process_0-of-1.json"))
  assert checkpointing.load_config(killed).stage == "adapt"
  assert os.listdir(os.path.join(killed, "tensorboard"))

  # Restoring onto another mesh (fsdp over 8) gives the same numbers.
  other = Runner(tiny_config(**{"mesh.data": 1, "mesh.fsdp": 8}), devices)
  manager = checkpointing.make_manager(killed, save_every=1, keep=3, read_only=True)
  with other.ctx():
    state, step = checkpointing.restore(manager, checkpointing.abstract_with_shardings(other.abstract, other.shardings))
  assert step == 6 and not state["params"]["blocks"]["attn1"]["to_q"]["kernel"].sharding.is_fully_replicated
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(out["state"]))

  # load_params: the contract for other stages (no EMA in tiny: falls back to params).
  params, saved = checkpointing.load_params(killed, key="ema_params")
  jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(out["state"]["params"]))
  assert saved.model.dim == config.model.dim
  with pytest.raises(KeyError, match="d_params"):
    checkpointing.load_params(killed, key="d_params")

  # init_from: a new run starts from these parameters with a fresh optimiser.
  single = Runner(tiny_config(init_from=killed), devices[:1])
  with single.ctx():
    fresh = single.stage.load_pretrained(single.init())
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(fresh["params"]), params)


def test_unalias_lets_a_loaded_state_with_shared_ema_be_donated(devices):
  # After init_from, `ema_params` is the very array of `params`; donating both failed in XLA.
  mesh = jax.make_mesh((8,), ("data",), devices=devices)
  w = jax.device_put(jnp.arange(16.0), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  state = {"params": {"w": w}, "ema_params": {"w": w}, "step": jnp.zeros((), jnp.int32)}
  step = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=(0,))
  state = train.unalias(state)
  a, b = state["params"]["w"], state["ema_params"]["w"]
  assert a is not b and (a is w or b is w)
  assert a.sharding == b.sharding == w.sharding
  out = step(state)
  np.testing.assert_array_equal(out["ema_params"]["w"], np.arange(16.0) + 1)


def test_nonfinite_steps_are_skipped_and_counted(single, reference):
  state0 = reference[0]
  state = single.put(state0)
  batch = single.batch(0)
  batch = dict(batch, latents=batch["latents"] * jnp.nan)
  for k in (1, 2):
    state, m = single.step(state, batch)
    assert int(m["nonfinite_in_a_row"]) == k and not np.isfinite(float(m["loss"]))
  assert int(state["step"]) == 2 and int(state["nonfinite_total"]) == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), state0["params"])
  state, m = single.step(state, single.batch(0))
  assert int(m["nonfinite_in_a_row"]) == 0 and int(state["nonfinite_total"]) == 2
  with pytest.raises(FloatingPointError, match="3 non-finite steps in a row.*max_nonfinite_in_a_row=3"):
    train.check_nonfinite({"nonfinite_in_a_row": 3.0, "loss": float("nan")}, 7, 3)


# ------------------------------------------------------------------------------------------------
def test_config_errors_name_their_field(tmp_path):
  with pytest.raises(ValueError, match="config.stage='adapted'"):
    train.validate_config(tiny_config(stage="adapted"))
  with pytest.raises(ValueError, match="config.mesh.*needs 16 devices"):
    train.validate_config(tiny_config(**{"mesh.data": 16}))
  with pytest.raises(ValueError, match=r"config.batch_size=12 must be divisible by the data axes"):
    train.validate_config(tiny_config(batch_size=12))
  with pytest.raises(ValueError, match=r"config.microbatches=3"):
    train.validate_config(tiny_config(microbatches=3))
  with pytest.raises(ValueError, match="config.init_from='.*nowhere' holds no checkpoint"):
    train.validate_config(tiny_config(init_from=str(tmp_path / "nowhere")))
  with pytest.raises(ValueError, match="config.vae.checkpoint"):
    train.validate_config(tiny_config(**{"vae.checkpoint": str(tmp_path / "novae")}))
  with pytest.raises(ValueError, match="config.model.recycled_channels must be False"):
    train.make_stage(tiny_config(module=stage0_pretrain, **{"model.recycled_channels": True}), None)
  with pytest.raises(ValueError, match="config.init_from must name the stage-1"):
    train.make_stage(tiny_config(module=stage2_distill), None)
  with pytest.raises(ValueError, match="config.model.control_channels=7"):
    train.make_stage(tiny_config(**{"model.control_channels": 7}), None)
