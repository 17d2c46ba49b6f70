"""The shared training loop: sharded state, checkpoint/resume, metrics, progress, non-finite guard.

`train_and_evaluate(config, workdir)` runs one stage. The loop knows nothing about models; each
stage module (`STAGE_MODULES[config.stage]`) provides `make_stage(config, mesh) -> Stage`:

  stage.init_state(rng) -> state
      The train state as a dict pytree. Leaves that should be sharded are boxed with logical axis
      names (`nn.Partitioned`, as `init_params(..., boxed=True)` and `optax` on boxed parameters
      give); the loop calls it under `jax.eval_shape`, derives the shardings from the boxes
      (`sharding.LOGICAL_RULES` via `config.logical_rules`) and runs it jitted with those
      `out_shardings`, so no host ever holds the whole state. Conventions (the checkpoint contract,
      `checkpointing.load_params`): the generator's parameters under `params`, their EMA under
      `ema_params` (when `config.ema_decay > 0`), its optimiser state under `opt_state`; other
      models under their own keys (stage 3: `d_params`, `d_opt_state`, ...). The loop adds the
      counters `step`, `nonfinite_in_a_row`, `nonfinite_total` (`init_counters`).
  stage.frozen -> pytree of arrays already on the mesh (teacher, VAE; may be `{}`), passed to
      every step as an argument, never saved.
  stage.load_pretrained(state) -> state
      Called once on a fresh start when `config.init_from` is set (not on resume).
  stage.train_step(state, frozen, batch, rng) -> (state, metrics)
      Pure and jittable. `batch` is a dict of global arrays, leading dim sharded over
      (data, fsdp). `metrics` is a dict of scalars and must hold `loss`. The loop jits it with
      explicit in/out shardings and donates the state; it also guards it: if `loss` or any
      floating-point leaf of the new state is not finite, the old state is kept (the step counter
      still advances) and `nonfinite_in_a_row` grows; the loop aborts after
      `config.max_nonfinite_in_a_row` in a row.
  stage.evaluate(state, frozen, step) -> dict of floats (called on every process, every
      `config.eval_every` steps and at the end).

Helpers for stages below: `make_optimizer`, `accumulate_gradients` (microbatches),
`ema_update`, `apply_gradients`.
"""
from __future__ import annotations

import importlib
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import flax.linen as nn
from absl import logging

from apt2_jax import checkpointing, sharding
from apt2_jax.models.dit import unbox

# Stage name -> module with `make_stage(config, mesh)`. Stages with their own loop (the VAE's
# `train_vae`) are dispatched by `main.py` and listed there.
STAGE_MODULES = {
    "pretrain": "apt2_jax.stages.diffusion",
    "adapt": "apt2_jax.stages.diffusion",
    "distill": "apt2_jax.stages.distill",
    "adversarial": "apt2_jax.stages.adversarial",
    "long_video": "apt2_jax.stages.adversarial",
}
ALL_STAGES = ("vae", "vae_distill") + tuple(STAGE_MODULES)


class Stage:
  """Base class of a stage (see the module docstring); subclasses override what they need."""
  frozen: Any = {}

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh

  def init_state(self, rng):
    raise NotImplementedError

  def load_pretrained(self, state):
    return state

  def train_step(self, state, frozen, batch, rng):
    raise NotImplementedError

  def evaluate(self, state, frozen, step) -> dict:
    return {}


# ================================================================================================
# Config validation
# ================================================================================================

def validate_config(config, num_devices: int | None = None, process_count: int | None = None):
  """Fails at start, naming the field, for the errors that would otherwise surface much later."""
  stage = config.get("stage", None)
  if stage not in ALL_STAGES:
    raise ValueError(f"config.stage={stage!r} is not one of {list(ALL_STAGES)}")
  if stage in ("vae", "vae_distill"):
    return
  num_devices = len(sharding.config_devices(config)) if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices)))
  batch_ways = shape["data"] * shape["fsdp"]
  micro = int(config.get("microbatches", 1))
  if micro < 1:
    raise ValueError(f"config.microbatches={micro} must be >= 1")
  if config.batch_size % (batch_ways * micro):
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the data axes "
                     f"(mesh data x fsdp = {batch_ways}) times config.microbatches={micro}")
  if config.batch_size % process_count:
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the "
                     f"{process_count} processes")
  init_from = config.get("init_from", "")
  if init_from and not checkpointing.has_checkpoint(init_from):
    raise ValueError(f"config.init_from={init_from!r} holds no checkpoint")
  for name in ("num_steps", "log_every", "checkpoint_every"):
    if int(config.get(name, 1)) < 1:
      raise ValueError(f"config.{name}={config.get(name)} must be >= 1")
  if not 0.0 <= float(config.get("ema_decay", 0.0)) < 1.0:
    raise ValueError(f"config.ema_decay={config.ema_decay} must be in [0, 1)")
  vae_ckpt = config.get("vae", {}).get("checkpoint", "") if config.get("vae", None) else ""
  if vae_ckpt and not os.path.isdir(vae_ckpt):
    raise ValueError(f"config.vae.checkpoint={vae_ckpt!r} is not a directory (a `vae` stage workdir "
                     "or a diffusers AutoencoderKLWan folder)")


# ================================================================================================
# Optimisers, gradient accumulation, EMA (helpers for stages)
# ================================================================================================

def learning_rate_schedule(opt, num_steps: int):
  """`opt.learning_rate` with linear warmup, then constant or cosine to `end_factor`."""
  lr, warmup = float(opt.learning_rate), int(opt.get("warmup_steps", 0))
  kind = opt.get("schedule", "constant")
  end = lr * float(opt.get("end_factor", 1.0 if kind == "constant" else 0.1))
  if kind == "constant":
    main = optax.constant_schedule(lr)
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(lr, max(num_steps - warmup, 1), alpha=end / lr if lr else 0.0)
  elif kind == "linear":
    main = optax.linear_schedule(lr, end, max(num_steps - warmup, 1))
  else:
    raise ValueError(f"optimizer.schedule={kind!r} is not one of constant, cosine, linear")
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])
  return main


def make_optimizer(opt, num_steps: int):
  """optax chain from a config block: clip by global norm, then adamw / adam / rmsprop / sgd.

  Fields: name, learning_rate, schedule, warmup_steps, end_factor, b1, b2, eps, weight_decay,
  grad_clip (0 = off). RMSProp with alpha = 0.9 (stage 3) is `name="adam", b1=0, b2=0.9`.
  """
  schedule = learning_rate_schedule(opt, num_steps)
  name = opt.get("name", "adamw")
  b1, b2, eps = float(opt.get("b1", 0.9)), float(opt.get("b2", 0.999)), float(opt.get("eps", 1e-8))
  wd = float(opt.get("weight_decay", 0.0))
  if name == "adamw":
    core = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd)
  elif name == "adam":
    core = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
  elif name == "rmsprop":
    core = optax.rmsprop(schedule, decay=b2, eps=eps)
  elif name == "sgd":
    core = optax.sgd(schedule, momentum=b1 or None)
  else:
    raise ValueError(f"optimizer.name={name!r} is not one of adamw, adam, rmsprop, sgd")
  clip = float(opt.get("grad_clip", 0.0))
  return optax.chain(optax.clip_by_global_norm(clip), core) if clip > 0 else core


def split_microbatches(batch, num_microbatches: int):
  """`[B, ...]` -> `[M, B / M, ...]` with microbatch i = samples i, i + M, i + 2M, ...

  Strided (not contiguous) so that each device's shard of the batch contributes to every
  microbatch: every microbatch stays spread over all data-parallel devices.
  """
  def one(x):
    b = x.shape[0]
    if b % num_microbatches:
      raise ValueError(f"batch {b} is not divisible by config.microbatches={num_microbatches}")
    return jnp.swapaxes(x.reshape((b // num_microbatches, num_microbatches) + x.shape[1:]), 0, 1)
  return jax.tree.map(one, batch)


def accumulate_gradients(loss_fn: Callable, params, batch, num_microbatches: int = 1):
  """Mean gradients and metrics of `loss_fn(params, microbatch) -> (loss, metrics)`.

  `batch` must already hold all randomness of the step (noise, times, dropout masks) so that M
  microbatches give the gradient of the whole batch. A `lax.scan` keeps one microbatch's
  activations alive at a time. Returns (grads, metrics) with `metrics['loss']`.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_microbatches == 1:
    (loss, metrics), grads = grad_fn(params, batch)
    return grads, dict(metrics, loss=loss)
  micro = split_microbatches(batch, num_microbatches)

  def body(acc, mb):
    (loss, metrics), grads = grad_fn(params, mb)
    metrics = dict(metrics, loss=loss)
    return jax.tree.map(jnp.add, acc, (grads, metrics)), None

  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
      lambda: (params, dict(grad_fn(params, jax.tree.map(lambda x: x[0], micro))[0][1], loss=0.0))))
  zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), zeros[1])
  (grads, metrics), _ = jax.lax.scan(body, zeros, micro)
  scale = 1.0 / num_microbatches
  grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, params)
  return grads, jax.tree.map(lambda m: m * scale, metrics)


def unalias(state):
  """Copies every leaf that is the same array as an earlier leaf (e.g. `ema_params = params` after
  loading a checkpoint): the step donates the state, and XLA refuses to donate one buffer twice."""
  seen = set()

  def fresh(x):
    if isinstance(x, jax.Array) and id(x) in seen:
      return jnp.copy(x)
    seen.add(id(x))
    return x

  return jax.tree.map(fresh, state)


def ema_update(ema, params, decay: float):
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)


def apply_gradients(tx, params, opt_state, grads):
  """One optimiser update: (new params, new opt_state, {'grad_norm'})."""
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, {"grad_norm": optax.global_norm(grads)}


def init_counters():
  return {"step": jnp.zeros((), jnp.int32), "nonfinite_in_a_row": jnp.zeros((), jnp.int32),
          "nonfinite_total": jnp.zeros((), jnp.int32)}


COUNTERS = tuple(init_counters())


# ================================================================================================
# Sharded state and the guarded, jitted step
# ================================================================================================

def state_shardings(stage: Stage, mesh, rules, rng):
  """(abstract unboxed state, NamedShardings) of `stage.init_state(rng)` from its logical boxes."""
  boxed = jax.eval_shape(stage.init_state, rng)
  return unbox(boxed), sharding.param_shardings(boxed, mesh, rules)


def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def guarded_step(stage: Stage, seed: int):
  """The stage's step with the per-step rng, the counters and the non-finite guard.

  A step whose metrics (the loss and the gradient norms every stage reports) are not all finite
  is skipped: the state stays as it was. Finite gradients give finite updates, so the metrics
  decide; checking every leaf of the new state as well made XLA's compile of the whole step
  about 5x slower (the adversarial step: 30 s -> 147 s on CPU) for no extra safety.
  """
  def step(state, frozen, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state["step"])
    new_state, metrics = stage.train_step(state, frozen, batch, rng)
    finite = _all_finite(metrics)
    out = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
    out["step"] = state["step"] + 1
    out["nonfinite_in_a_row"] = jnp.where(finite, 0, state["nonfinite_in_a_row"] + 1)
    out["nonfinite_total"] = state["nonfinite_total"] + (~finite).astype(jnp.int32)
    metrics = dict(metrics, nonfinite_in_a_row=out["nonfinite_in_a_row"],
                   nonfinite_total=out["nonfinite_total"])
    return out, jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics)
  return step


def pre_encode(stage: Stage, iterator, config):
  """`config.data.pre_encode`: encode the rendered pool once with the stage's frozen VAE."""
  inputs = getattr(stage, "inputs", None)
  if not hasattr(iterator, "encode_pool") or inputs is None or getattr(inputs, "vae", None) is None:
    raise ValueError(f"config.data.pre_encode needs config.data.source='worlds' (got {config.data.source!r}) "
                     "and a stage that encodes video with a frozen VAE")
  t0 = time.perf_counter()
  encode = jax.jit(inputs.encode)
  iterator.encode_pool(lambda video: encode(stage.frozen, video), int(config.batch_size))
  logging.info("pre-encoded the %s clip pool with the frozen VAE in %.1f s", config.data.world,
               time.perf_counter() - t0)


def batch_shardings(batch, mesh):
  return {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def global_batch(local_batch, shardings):
  """Per-host numpy arrays -> global jax.Arrays (this host's rows of the leading dim)."""
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
          for k, v in local_batch.items()}


# ================================================================================================
# Metrics: TensorBoard, JSONL, progress bar
# ================================================================================================

class MetricWriter:
  """TensorBoard event files and `{workdir}/metrics.jsonl` (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter
    os.makedirs(workdir, exist_ok=True)
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, metrics: dict, prefix: str = "train"):
    if not self.enabled:
      return
    flat = {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
    for k, v in flat.items():
      self.tb.add_scalar(k, v, step)
    self.jsonl.write(json.dumps({"step": int(step), **flat}) + "\n")
    self.jsonl.flush()

  def close(self):
    if self.enabled:
      self.tb.close()
      self.jsonl.close()


def read_metrics(workdir: str, prefix: str = "train/loss") -> dict[int, float]:
  """`{step: value}` of one metric from `metrics.jsonl` (later lines win, as after a resume)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if prefix in row:
        out[row["step"]] = row[prefix]
  return out


# ================================================================================================
# The loop
# ================================================================================================

def check_nonfinite(metrics, step: int, max_bad: int):
  """Raises FloatingPointError after `max_bad` skipped (non-finite) steps in a row."""
  if metrics["nonfinite_in_a_row"] >= max_bad:
    raise FloatingPointError(
        f"{int(metrics['nonfinite_in_a_row'])} non-finite steps in a row at step {step} (loss "
        f"{float(metrics['loss'])}); aborting (config.max_nonfinite_in_a_row={max_bad}). Lower "
        "the learning rate or check the data; the last finite state is in the latest checkpoint.")


def make_stage(config, mesh) -> Stage:
  if config.stage not in STAGE_MODULES:
    raise ValueError(f"config.stage={config.stage!r} has no trainer in train.STAGE_MODULES")
  return importlib.import_module(STAGE_MODULES[config.stage]).make_stage(config, mesh)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_step: int | None = None) -> dict:
  """Runs (or resumes) `config.stage` in `workdir`; returns the last train and eval metrics.

  `stop_after_step` ends the loop early as a kill would (no final save or eval): tests use it to
  check that a restarted run reproduces an uninterrupted one.
  """
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh, sharding.config_devices(config))
  rules = sharding.rules_from_config(config)
  primary = jax.process_index() == 0
  from apt2_jax.stages import data as stage_data

  with sharding.use_mesh(mesh, rules):
    # ---------------------------------------------------------------- stage, state, shardings
    stage = make_stage(config, mesh)
    init_rng = jax.random.key(config.seed)
    abstract, shardings = state_shardings(stage, mesh, rules, init_rng)
    train_iter = stage_data.make_iterator(config, "train")
    if config.data.get("pre_encode", False):
      pre_encode(stage, train_iter, config)
    manager = checkpointing.make_manager(
        workdir, save_every=config.checkpoint_every, keep=config.get("keep_checkpoints", 3),
        async_save=config.get("async_checkpointing", True))

    # ---------------------------------------------------------------- resume, init or init_from
    if manager.latest_step() is not None:
      state, start = checkpointing.restore(
          manager, checkpointing.abstract_with_shardings(abstract, shardings), data_iterator=train_iter)
      logging.info("resumed from %s at step %d", manager.directory, start)
    else:
      init = jax.jit(lambda r: unbox(stage.init_state(r)), out_shardings=shardings)
      state = init(init_rng)
      if config.get("init_from", ""):
        state = stage.load_pretrained(state)
        state = unalias(jax.device_put(state, shardings))
      start = 0
    start = int(jax.device_get(state["step"]))

    # ---------------------------------------------------------------- the jitted step
    example = train_iter.peek()
    b_shard = batch_shardings(example, mesh)
    step_fn = jax.jit(guarded_step(stage, config.seed),
                      in_shardings=(shardings, jax.tree.map(lambda x: x.sharding, stage.frozen), b_shard),
                      out_shardings=(shardings, sharding.replicated(mesh)),
                      donate_argnums=(0,))

    writer = MetricWriter(workdir, enabled=primary)
    if primary and start == 0:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(checkpointing.config_to_dict(config), f, indent=2)
    progress = None
    if primary and config.get("progress_bar", True):
      from tqdm import tqdm
      progress = tqdm(total=config.num_steps, initial=start, desc=config.stage, unit="step",
                      dynamic_ncols=True)

    # ---------------------------------------------------------------- train
    max_bad = int(config.get("max_nonfinite_in_a_row", 10))
    eval_every = int(config.get("eval_every", 0) or 0)
    last_train, last_eval, pending = {}, {}, None
    clock = {"time": None, "step": start}  # steps/s over each log window, compile excluded

    def flush(pending):
      step, metrics = pending
      metrics = jax.device_get(metrics)
      check_nonfinite(metrics, step, max_bad)
      if step % config.log_every == 0 or step == config.num_steps:
        now = time.perf_counter()
        if clock["time"] is not None and step > clock["step"]:
          metrics = dict(metrics, steps_per_second=(step - clock["step"]) / (now - clock["time"]))
        clock.update(time=now, step=step)
        writer.write(step, metrics)
      elif clock["time"] is None:  # the first step (compile) ends the untimed window
        clock.update(time=time.perf_counter(), step=step)
      return metrics

    step = last_saved = start
    for step in range(start + 1, config.num_steps + 1):
      batch = global_batch(next(train_iter), b_shard)
      state, metrics = step_fn(state, stage.frozen, batch)
      if pending is not None:  # one step behind: keep the device busy while we look at metrics
        last_train = flush(pending)
      pending = (step, metrics)
      if progress is not None:
        progress.update(1)
        if last_train:
          progress.set_postfix(loss=f"{float(last_train['loss']):.4f}", refresh=False)
      if stop_after_step is not None and step >= stop_after_step:
        last_train = flush(pending)
        manager.wait_until_finished()
        return {"train": last_train}
      if checkpointing.save(manager, step, state, data_iterator=train_iter, config=config):
        last_saved = step
      if eval_every and step % eval_every == 0 and step < config.num_steps:
        last_eval = stage.evaluate(state, stage.frozen, step)
        writer.write(step, last_eval, prefix="eval")
    if pending is not None:
      last_train = flush(pending)

    # ---------------------------------------------------------------- final save and eval
    if step > last_saved:
      checkpointing.save(manager, step, state, data_iterator=train_iter, config=config, force=True)
    manager.wait_until_finished()
    if config.get("eval_at_end", True):
      last_eval = stage.evaluate(state, stage.frozen, step)
      writer.write(step, last_eval, prefix="eval")
    if progress is not None:
      progress.close()
    writer.close()
    manager.close()
    return {"train": last_train, "eval": last_eval, "state": state}
