"""The shared training loop: sharded state, checkpoint/resume, metrics, progress, non-finite guard.

`train_and_evaluate(config, workdir)` runs one stage; the loop knows nothing about models. The
stage registry (`apt2_jax.train.registry`) gives `make_stage(config, mesh) -> Stage`:

  stage.init_state(rng) -> state
      The train state as a dict pytree. Leaves that should be sharded are boxed with logical axis
      names (`nn.Partitioned`, as `init_params(..., boxed=True)` and `optax` on boxed parameters
      give; unboxed leaves are replicated); the loop calls it under `jax.eval_shape`, derives the
      shardings from the boxes (`sharding.LOGICAL_RULES` via `config.logical_rules`) and runs it
      jitted with those `out_shardings`, so no host ever holds the whole state. Conventions (the
      checkpoint contract, `checkpointing.load_params`): the generator's parameters under
      `params`, their EMA under `ema_params` (when `config.ema_decay > 0`), its optimiser state
      under `opt_state`; other models under their own keys (stage 3: `d_params`, `d_opt_state`,
      ...; the VAE: `latent_stats`, `disc_params`, ...). The loop adds the counters `step`,
      `nonfinite_in_a_row`, `nonfinite_total` (`init_counters`).
  stage.frozen -> pytree of arrays already on the mesh (teacher, VAE; may be `{}`), passed to
      every step as an argument, never saved.
  stage.load_pretrained(state) -> state
      Called once on a fresh start (not on resume): loads what the config names (`init_from`, a
      teacher's frozen encoder, ...); the base class loads nothing.
  stage.train_step(state, frozen, batch, rng) -> (state, metrics)
      Pure and jittable. `batch` is a dict of global arrays, leading dim sharded over
      (data, fsdp). `metrics` is a dict of scalars and must hold `loss`. The loop jits it with
      explicit in/out shardings and donates the state, under the non-finite guard
      (`step.guarded_step`); it aborts after `config.max_nonfinite_in_a_row` skipped steps in a row.
  stage.evaluate(state, frozen, step) -> dict of floats (called on every process, every
      `config.eval_every` steps and at the end when `config.eval_at_end`).

Jobs survive the cluster (BUILD.md, "Preemption and a full disk"):
  - SIGTERM or SIGINT: the loop finishes the step in progress, checkpoints it (after any save in
    flight), logs one line and raises `Preempted`, a SystemExit with status `EXIT_PREEMPTED` (75).
    A relaunch resumes at that step. On several processes every one stops at the same step: jax's
    preemption service (SIGTERM on any host; `multihost_utils.reached_preemption_sync_point`,
    which orbax's `should_save` also consults, so the checkpoint is saved there), or, with that
    service off, a flag gathered from every process after each step. A second SIGINT acts as
    it did before (Ctrl-C twice interrupts at once); a second SIGTERM is ignored.
  - A full disk: `disk.DiskFullError`, one line naming the workdir and its free space (exit status
    74 from the command line); the checkpoints already saved stay intact (`checkpointing.save`).
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from apt2_jax import checkpointing, disk, runtime, sharding
from apt2_jax.models.dit import unbox
from apt2_jax.train import data as train_data
from apt2_jax.train import registry
from apt2_jax.train import samples
from apt2_jax.train.metrics import MetricWriter, last_metrics
from apt2_jax.train.optim import unalias
from apt2_jax.train.step import check_nonfinite, guarded_step
from apt2_jax.train.validate import ConfigError, validate_config

make_stage = registry.make_stage


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
# Sharded state and batches
# ================================================================================================

def state_shardings(stage: Stage, mesh, rules, rng):
  """(abstract unboxed state, NamedShardings) of `stage.init_state(rng)` from its logical boxes."""
  boxed = jax.eval_shape(stage.init_state, rng)
  return unbox(boxed), sharding.param_shardings(boxed, mesh, rules)


def batch_shardings(batch, mesh):
  return {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def global_batch(local_batch, shardings):
  """Per-host numpy arrays -> global jax.Arrays (this host's rows of the leading dim)."""
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
          for k, v in local_batch.items()}


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


# ================================================================================================
# Preemption: SIGTERM / SIGINT stop after the current step, with a checkpoint
# ================================================================================================

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: temporary failure, run it again (it resumes)


class Preempted(SystemExit):
  """Training stopped on a signal after checkpointing `step`; the process exits with status 75."""

  def __init__(self, step: int, reason: str, path: str):
    super().__init__(EXIT_PREEMPTED)
    self.step, self.reason, self.path = step, reason, path

  def __str__(self):
    return f"{self.reason}: stopped after step {self.step}, checkpoint {self.path}"


def _jax_preemption_service() -> bool:
  """Whether jax's preemption service runs here (several processes, `jax_enable_preemption_service`):
  it owns SIGTERM (its notifier) and makes every process agree on the step to stop at."""
  if jax.process_count() == 1:
    return False
  from jax._src import distributed
  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class StopSignals:
  """Catches SIGTERM and SIGINT while training (main thread only) and says when to stop.

  One process: stop after the step in progress. Several: `should_stop(step)` is true at the
  same step on every process (see the module docstring); SIGINT is passed on to jax's
  preemption service as a SIGTERM of this process.
  """

  def __init__(self):
    self.received: str | None = None
    self._previous: dict = {}
    self.service = _jax_preemption_service()

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self  # signal handlers can only be set from the main thread
    for sig in (signal.SIGTERM, signal.SIGINT):
      if sig == signal.SIGTERM and self.service:
        continue  # jax's notifier has it
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, signal.SIG_DFL if previous is None else previous)
    self._previous = {}

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.received == name and signum == signal.SIGINT:  # Ctrl-C twice: what it did before
      # (a second SIGTERM is ignored: SLURM sends one to the task and srun forwards its own)
      previous = self._previous.pop(signum, signal.SIG_DFL)
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
      if callable(previous):
        previous(signum, frame)
      elif previous != signal.SIG_IGN:
        os.kill(os.getpid(), signum)
      return
    self.received = self.received or name
    if self.service and signum != signal.SIGTERM:
      signal.raise_signal(signal.SIGTERM)  # jax's notifier: every process learns of it

  def reason(self) -> str:
    if self.received:
      return f"{self.received} received"
    return "preemption notice (SIGTERM to a process of this job)"

  def should_stop(self, step: int) -> bool:
    """Whether to checkpoint `step` and stop; every process calls it after every step."""
    if self.service:
      from jax.experimental import multihost_utils
      return bool(multihost_utils.reached_preemption_sync_point(step))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      flags = multihost_utils.process_allgather(np.asarray(self.received is not None, np.int32))
      return bool(np.any(flags))
    return self.received is not None


# ================================================================================================
# The loop
# ================================================================================================

def _start_state(stage, manager, abstract, shardings, train_iter, init_rng):
  """The run's weights, in order of precedence: this workdir's latest checkpoint (with the data
  iterator's state), else a fresh init plus whatever the stage loads (`load_pretrained`)."""
  if manager.latest_step() is not None:
    # the newest intact step; damaged newer ones are reported and set aside, never deleted
    state, _ = checkpointing.resume(
        manager, checkpointing.abstract_with_shardings(abstract, shardings), data_iterator=train_iter)
    logging.info("resumed from %s at step %d", manager.directory, int(jax.device_get(state["step"])))
    return state
  state = jax.jit(lambda r: unbox(stage.init_state(r)), out_shardings=shardings)(init_rng)
  try:
    state = stage.load_pretrained(state)
  except ValueError as e:  # what `init_from` / `teacher` name does not fit the model
    raise ConfigError(str(e)) from e
  return unalias(jax.device_put(state, shardings))


def finished_run(config, workdir: str) -> dict | None:
  """The last metrics of a run that already reached `config.num_steps` (and, with
  `eval_at_end`, logged its final evaluation), else None. Every process decides alike: with
  several processes only the checkpoints count (metrics.jsonl lives on the primary's disk)."""
  if not checkpointing.has_checkpoint(workdir):
    return None
  step = checkpointing.resolve(workdir)[1]
  if step < int(config.num_steps):
    return None
  last = last_metrics(workdir)
  if config.get("eval_at_end", True) and jax.process_count() == 1:
    if not any(int(row.get("step", -1)) >= step for row in _rows_with(workdir, "eval/")):
      return None  # the final evaluation is missing (killed during it): the loop runs it
  logging.info("%s already finished: checkpoint at step %d, config.num_steps=%d; nothing to do (raise "
               "--config.num_steps to train on)", workdir, step, int(config.num_steps))
  return dict(last, finished=True)


def _rows_with(workdir: str, prefix: str):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if any(k.startswith(prefix) for k in row):
        rows.append(row)
  return rows


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_step: int | None = None) -> dict:
  """Runs (or resumes) `config.stage` in `workdir`; returns the last train and eval metrics.

  `stop_after_step` ends the loop early as a kill would (no final save or eval): tests use it to
  check that a restarted run reproduces an uninterrupted one.
  """
  runtime.check_local_path(workdir, "workdir")
  config = validate_config(config)
  done = finished_run(config, workdir)
  if done is not None:  # rerunning a finished run: no repeated evaluation, no duplicate rows
    return done
  disk.quiet_disk_full_reports()
  with StopSignals() as signals:
    try:
      os.makedirs(workdir, exist_ok=True)
      return _train(config, workdir, signals, stop_after_step)
    except Exception as e:  # noqa: BLE001  a full disk anywhere (metrics, TensorBoard) is one line too
      if disk.is_disk_full(e) and not isinstance(e, disk.DiskFullError):
        raise disk.error(workdir, "training", "free some space (or move the workdir) and rerun the same "
                         "command to resume from the newest checkpoint") from None
      raise


def _train(config, workdir: str, signals: StopSignals, stop_after_step: int | None) -> dict:
  """`train_and_evaluate` past its checks, under `signals`."""
  mesh = sharding.make_mesh(config.mesh, sharding.config_devices(config))
  rules = sharding.rules_from_config(config)
  primary = jax.process_index() == 0

  with sharding.use_mesh(mesh, rules):
    # ---------------------------------------------------------------- stage, state, shardings
    try:
      stage = make_stage(config, mesh)
    except ValueError as e:  # the stages check their config fields (and load frozen weights) here
      raise ConfigError(str(e)) from e
    init_rng = jax.random.key(config.seed)
    abstract, shardings = state_shardings(stage, mesh, rules, init_rng)
    train_iter = train_data.make_iterator(config, "train")
    if config.data.get("pre_encode", False):
      pre_encode(stage, train_iter, config)
    manager = checkpointing.make_manager(
        workdir, save_every=config.checkpoint_every, keep=config.get("keep_checkpoints", 3),
        async_save=config.get("async_checkpointing", True))
    state = _start_state(stage, manager, abstract, shardings, train_iter, init_rng)
    start = int(jax.device_get(state["step"]))

    # ---------------------------------------------------------------- the jitted step
    example = train_iter.peek()
    b_shard = batch_shardings(example, mesh)
    step_fn = jax.jit(guarded_step(stage, config.seed),
                      in_shardings=(shardings, jax.tree.map(lambda x: x.sharding, stage.frozen), b_shard),
                      out_shardings=(shardings, sharding.replicated(mesh)),
                      donate_argnums=(0,))

    writer = MetricWriter(workdir, enabled=primary, config=config, total_steps=config.num_steps)
    videos = samples.RolloutVideos(config, samples.num_videos(config))  # eval rollouts, TensorBoard
    profiler = runtime.StepProfiler(config.get("profile_dir", "") or os.path.join(workdir, "profile"),
                                    int(config.get("profile_steps", 0) or 0), start)
    if primary and start == 0:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(checkpointing.config_to_dict(config), f, indent=2)
    progress = runtime.progress_bar(primary and config.get("progress_bar", True), total=config.num_steps,
                                    initial=start, desc=config.stage, unit="step")  # on a terminal only

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
    stopped = False
    if start < config.num_steps and jax.process_count() == 1 and signals.received:
      # signalled while starting (restore, compile): nothing new to save
      path = os.path.join(os.fspath(manager.directory), str(start)) if start else "none"
      logging.warning("%s before the first step: nothing new to checkpoint (newest checkpoint: %s); exiting "
                      "with status %d", signals.reason(), path, EXIT_PREEMPTED)
      if progress is not None:
        progress.close()
      writer.close()
      manager.close()
      raise Preempted(start, signals.reason(), path)
    for step in range(start + 1, config.num_steps + 1):
      batch = global_batch(next(train_iter), b_shard)
      profiler.before(step)
      state, metrics = step_fn(state, stage.frozen, batch)
      profiler.after(step, state)
      if pending is not None:  # one step behind: keep the device busy while we look at metrics
        last_train = flush(pending)
      pending = (step, metrics)
      if progress is not None:
        progress.update(1)
        if last_train:
          progress.set_postfix(loss=f"{float(last_train['loss']):.4f}", refresh=False)
      if stop_after_step is not None and step >= stop_after_step:
        last_train = flush(pending)
        profiler.close(state)
        if progress is not None:
          progress.close()
        checkpointing.wait(manager)
        return {"train": last_train}
      if checkpointing.save(manager, step, state, data_iterator=train_iter, config=config):
        last_saved = step
      if signals.should_stop(step):
        stopped = True
        break
      if eval_every and step % eval_every == 0 and step < config.num_steps:
        last_eval = stage.evaluate(state, stage.frozen, step)
        writer.write(step, last_eval, prefix="eval")
        writer.write_videos(step, videos(stage, state))
    if pending is not None:
      last_train = flush(pending)
    profiler.close(state)

    # ---------------------------------------------------------------- final save and eval
    if step > last_saved:
      checkpointing.save(manager, step, state, data_iterator=train_iter, config=config, force=True)
    checkpointing.wait(manager)
    if stopped:  # SIGTERM / SIGINT: the step is saved; no evaluation, exit 75
      if jax.process_count() > 1:  # nobody exits (and makes a launcher kill the rest) before all saved
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("apt2_jax.train.loop.preempted")
      path = os.path.join(os.fspath(manager.directory), str(step))
      logging.warning("%s: stopped after step %d and saved checkpoint %s; exiting with status %d (rerun the "
                      "same command to resume from step %d)", signals.reason(), step, path, EXIT_PREEMPTED, step)
      if progress is not None:
        progress.close()
      writer.close()
      manager.close()
      raise Preempted(step, signals.reason(), path)
    if config.get("eval_at_end", True):
      last_eval = stage.evaluate(state, stage.frozen, step)
      writer.write(step, last_eval, prefix="eval")
      writer.write_videos(step, videos(stage, state))
    if progress is not None:
      progress.close()
    writer.close()
    manager.close()
    return {"train": last_train, "eval": last_eval, "state": state}
