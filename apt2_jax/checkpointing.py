"""Orbax checkpoints of the train state, the data iterator and the config; `load_params`.

Layout of a workdir (one stage run):

  {workdir}/checkpoints/{step}/state/    the train state pytree (orbax PyTree, sharded arrays)
  {workdir}/checkpoints/{step}/data/     the grain iterator state, one JSON file per process
                                         (`process_{i}-of-{n}.json`, grain's orbax handler)
  {workdir}/checkpoints/{step}/config/   the run's ConfigDict as JSON (never pickle)
  {workdir}/metrics.jsonl, {workdir}/tensorboard/   (written by `apt2_jax.train.metrics`)

Every stage, the VAE's included, uses this layout. The state is a plain dict (see
`apt2_jax.train.loop`): every stage stores the generator's parameters (the VAE's: all of them)
under `params` and, when `config.ema_decay > 0`, their EMA under `ema_params`; other models and
statistics (stage 3's discriminator, the VAE's `latent_stats`) live under their own keys. So
`load_params(dir, key=...)` works for any stage without knowing it, and restores only the
requested subtree (`partial_restore`).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

try:  # grain registers its orbax handler (CheckpointSave / CheckpointRestore) on import
  import grain
  _GRAIN_SAVE, _GRAIN_RESTORE = grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore
except (ImportError, AttributeError):  # pragma: no cover
  _GRAIN_SAVE = _GRAIN_RESTORE = None

STATE, DATA, CONFIG = "state", "data", "config"


# ------------------------------------------------------------------------------------------------
# Locating checkpoints
# ------------------------------------------------------------------------------------------------

def checkpoint_dir(path: str) -> str:
  """`{workdir}/checkpoints` for a workdir; the directory itself if it already holds steps."""
  path = os.path.abspath(os.fspath(path))
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def _steps(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if re.fullmatch(r"\d+", n) and os.path.isdir(os.path.join(directory, n, STATE)))


def resolve(path: str, step: int | None = None) -> tuple[str, int]:
  """(checkpoints directory, step) for a workdir, a checkpoints directory or a step directory.

  Raises FileNotFoundError naming `path` when it holds no checkpoint (or not `step`).
  """
  path = os.path.abspath(os.fspath(path))
  base = os.path.basename(path)
  if re.fullmatch(r"\d+", base) and os.path.isdir(os.path.join(path, STATE)):
    if step is not None and int(base) != step:
      raise ValueError(f"{path} is the checkpoint of step {int(base)}, not step {step}")
    return os.path.dirname(path), int(base)
  directory = checkpoint_dir(path)
  steps = _steps(directory)
  if not steps:
    raise FileNotFoundError(f"no checkpoint found under {path!r} (looked for {directory}/<step>/{STATE})")
  if step is None:
    return directory, steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"step {step} not in {directory}; saved steps: {steps}")
  return directory, step


def has_checkpoint(path: str) -> bool:
  try:
    resolve(path)
    return True
  except (FileNotFoundError, ValueError):
    return False


# ------------------------------------------------------------------------------------------------
# The manager: async saves every K steps, keep N
# ------------------------------------------------------------------------------------------------

def make_manager(workdir: str, *, save_every: int, keep: int, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager over `{workdir}/checkpoints` (created on every process)."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=max(int(save_every), 1), max_to_keep=keep or None, create=not read_only,
      enable_async_checkpointing=async_save, read_only=read_only)
  return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, step: int, state, *, data_iterator=None, config=None,
         force: bool = False) -> bool:
  """Saves (asynchronously) when `step` is due or `force`; returns whether a save started.

  Every process must call this with the same step: arrays are global, the iterator state is
  written per process, the config by the primary process.
  """
  items = {STATE: ocp.args.PyTreeSave(state)}
  if data_iterator is not None and _GRAIN_SAVE is not None:
    items[DATA] = _GRAIN_SAVE(data_iterator)
  if config is not None:
    items[CONFIG] = ocp.args.JsonSave(config_to_dict(config))
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def abstract_with_shardings(shapes, shardings):
  """ShapeDtypeStructs carrying the target shardings (restoring onto any mesh reshards)."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def restore(manager: ocp.CheckpointManager, abstract_state, *, data_iterator=None, step=None):
  """Restores `(state, step)`; `abstract_state` holds ShapeDtypeStructs with target shardings.

  The data iterator, when given, is restored in place from this process's saved state.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}")
  items = {STATE: ocp.args.PyTreeRestore(
      item=abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
  if data_iterator is not None and _GRAIN_RESTORE is not None:
    items[DATA] = _GRAIN_RESTORE(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored[STATE], step


# ------------------------------------------------------------------------------------------------
# Configs as JSON
# ------------------------------------------------------------------------------------------------

def config_to_dict(config) -> dict:
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json())
  return json.loads(json.dumps(config))


def load_config(path: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The ConfigDict saved with a checkpoint (workdir, checkpoints dir or step dir)."""
  directory, step = resolve(path, step)
  config_dir = os.path.join(directory, str(step), CONFIG)
  files = [f for f in os.listdir(config_dir) if not f.startswith("_")] if os.path.isdir(config_dir) else []
  if not files:
    raise FileNotFoundError(f"no config saved in {config_dir}")
  with open(os.path.join(config_dir, files[0])) as f:
    return ml_collections.ConfigDict(json.load(f))


# ------------------------------------------------------------------------------------------------
# load_params: the contract other stages rely on
# ------------------------------------------------------------------------------------------------

def load_params(path: str, *, key: str = "ema_params", step: int | None = None, shardings=None):
  """Loads one parameter subtree of any stage's checkpoint: `(params, config)`.

  Args:
    path: a workdir, its `checkpoints/` directory, or one step directory.
    key: the state entry, "ema_params" (falls back to "params" with a warning when the run kept
      no EMA) or "params", or any other top-level key (e.g. a discriminator's).
    step: a saved step (default: the latest).
    shardings: where to put the arrays: None (numpy on the host), one `jax.sharding.Sharding`
      for every leaf, a pytree of them matching the subtree, or a callable
      `(path: tuple[str, ...], shape) -> Sharding` (e.g. the target layout where shapes agree).
  Returns:
    (params as a nested dict of arrays, the run's ConfigDict).
  """
  directory, step = resolve(path, step)
  state_dir = os.path.join(directory, str(step), STATE)
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(state_dir)
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  if key not in tree:
    if key == "ema_params" and "params" in tree:
      logging.warning("%s has no ema_params (config.ema_decay was 0); loading params", state_dir)
      key = "params"
    else:
      raise KeyError(f"checkpoint {state_dir} has no entry {key!r}; entries: {sorted(tree)}")
  sub = tree[key]
  if shardings is None:
    restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), sub)
    item = jax.tree.map(lambda m: np.zeros((), np.float32), sub)
  else:
    if isinstance(shardings, jax.sharding.Sharding):
      shardings = jax.tree.map(lambda m, s=shardings: s, sub)
    elif callable(shardings):
      shardings = jax.tree_util.tree_map_with_path(
          lambda p, m, f=shardings: f(tuple(str(getattr(k, "key", k)) for k in p), tuple(m.shape)), sub)
    item = jax.tree.map(lambda m, sh: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sh), sub, shardings)
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
  restored = checkpointer.restore(
      state_dir, args=ocp.args.PyTreeRestore(item={key: item}, restore_args={key: restore_args},
                                             partial_restore=True))
  return restored[key], load_config(directory, step)
