"""Orbax checkpoints of the train state, the data iterator and the config; `load_params`.

Layout of a workdir (one stage run):

  {workdir}/checkpoints/{step}/state/    the train state pytree (orbax PyTree, sharded arrays)
  {workdir}/checkpoints/{step}/data/     the grain iterator state, one JSON file per process
                                         (`process_{i}-of-{n}.json`, grain's orbax handler)
  {workdir}/checkpoints/{step}/config/   the run's ConfigDict as JSON (never pickle)
  {workdir}/checkpoints/{step}/fingerprints/   one uint32 per array of the state (JSON): readers
                                         check the arrays they restore against it, so garbled
                                         array data fails to restore instead of loading garbage
  {workdir}/metrics.jsonl, {workdir}/tensorboard/   (written by `apt2_jax.train.metrics`)

Every stage, the VAE's included, uses this layout. The state is a plain dict (see
`apt2_jax.train.loop`): every stage stores the generator's parameters (the VAE's: all of them)
under `params` and, when `config.ema_decay > 0`, their EMA under `ema_params`; other models and
statistics (stage 3's discriminator, the VAE's `latent_stats`) live under their own keys. So
`load_params(dir, key=...)` works for any stage without knowing it, and restores only the
requested subtree (`partial_restore`).

Damaged checkpoints: every reader (`restore` for resuming, `load_params`, `load_config`, and so
`generation.load`, `generation.vae.load_vae`, sample, export, serve) goes through `newest_intact`:
a step that fails to restore (unreadable or garbled arrays, metadata, data-iterator state or
config; a step without `state/`) is reported with its path and the reason, and the next older
step is used, with a warning that names both steps. When no step is intact, one
`CheckpointError` lists each step and its reason. Nothing is deleted; resuming training moves the
damaged steps newer than the one it resumes from to `{workdir}/damaged_checkpoints/` (the run
saves those steps again), see `set_aside`.
"""
from __future__ import annotations

import gc
import json
import logging as pylogging
import os
import re
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from apt2_jax import disk

try:  # grain registers its orbax handler (CheckpointSave / CheckpointRestore) on import
  import grain
  _GRAIN_SAVE, _GRAIN_RESTORE = grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore
except (ImportError, AttributeError):  # pragma: no cover
  _GRAIN_SAVE = _GRAIN_RESTORE = None

STATE, DATA, CONFIG, FINGERPRINTS = "state", "data", "config", "fingerprints"
DAMAGED_DIR = "damaged_checkpoints"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored: a requested step, or every step of a directory."""


class MissingEntryError(KeyError):
  """The requested state entry does not exist (a caller's mistake, not damage: no fallback)."""

  def __str__(self):
    return str(self.args[0]) if self.args else ""


# ------------------------------------------------------------------------------------------------
# Locating checkpoints
# ------------------------------------------------------------------------------------------------

def checkpoint_dir(path: str) -> str:
  """`{workdir}/checkpoints` for a workdir; the directory itself if it already holds steps."""
  path = os.path.abspath(os.fspath(path))
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def _steps(directory: str, with_state: bool = True) -> list[int]:
  """Saved steps (directories named by an integer), those with a `state/` folder by default."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if re.fullmatch(r"\d+", n) and os.path.isdir(os.path.join(directory, n))
                and (not with_state or os.path.isdir(os.path.join(directory, n, STATE))))


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
# Falling back past damaged steps
# ------------------------------------------------------------------------------------------------

def _reason(e: BaseException) -> str:
  """One line saying why a restore failed (TensorStore errors carry pages of spec)."""
  text = str(e).split("See full TensorStore details")[0]
  if isinstance(e, KeyError) and not isinstance(e, MissingEntryError):
    text = f"missing entry {text}"
  text = " ".join(text.split())
  cause = e.__cause__ or e.__context__
  if type(e) is Exception and cause is not None:  # orbax's generic wrapper: the cause says why
    text = f"{text} ({_reason(cause)})"
  text = text if len(text) <= 300 else text[:297] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _check_json(step_dir: str, parts=(STATE, DATA, CONFIG, FINGERPRINTS)) -> None:
  """Raises ValueError naming the first JSON file of the step that does not parse (the state's
  metadata, the data iterators' states, the config, the fingerprints)."""
  for part in parts:
    folder = os.path.join(step_dir, part)
    if not os.path.isdir(folder):
      continue
    for name in sorted(os.listdir(folder)):
      path = os.path.join(folder, name)
      is_json = name == "_METADATA" if part == STATE else not name.startswith(("_", "commit"))
      if not is_json or not os.path.isfile(path):
        continue
      try:
        with open(path, "rb") as f:
          json.loads(f.read().decode("utf-8"))
      except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({' '.join(str(e).split())[:120]})") from None


def _is_restore_leftover(unraisable) -> bool:
  """orbax's pending reads of a step that failed to restore, failing again as they are collected
  (pages of TensorStore spec each) or after their event loop closed: not news, the warning says."""
  exc, obj = unraisable.exc_value, repr(getattr(unraisable, "object", ""))
  return ("_read_array_index_and_device_put" in obj or "orbax" in obj
          or (isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)))


class _RestoreLeftoverLogFilter(pylogging.Filter):
  """Drops asyncio's "Task exception was never retrieved" reports (a full traceback on stderr) of
  orbax/TensorStore reads from a step that failed to restore: the same damage, already reported
  in one line with the step's path by `newest_intact`."""
  _apt2_quiet = True

  def filter(self, record) -> bool:
    message = str(record.msg)
    if not message.startswith("Task exception was never retrieved"):
      return True
    exc = record.exc_info[1] if record.exc_info else None
    text = f"{message} {exc!r}"
    return not any(k in text for k in ("OCDBT", "tensorstore", "TensorStore", "orbax", "Error reading"))


def _quiet_restore_leftovers() -> None:
  """Installs (once) an unraisable-exception hook that drops `_is_restore_leftover` reports, and
  `_RestoreLeftoverLogFilter` on asyncio's logger."""
  asyncio_logger = pylogging.getLogger("asyncio")
  if not any(getattr(f, "_apt2_quiet", False) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_RestoreLeftoverLogFilter())
  previous = sys.unraisablehook
  if getattr(previous, "_apt2_quiet", False):
    return

  def hook(unraisable):
    if not _is_restore_leftover(unraisable):
      previous(unraisable)
  hook._apt2_quiet = True
  sys.unraisablehook = hook


def _agree(ok: bool) -> bool:
  """Whether every process succeeded (multi-process runs must pick the same step)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def newest_intact(path: str, load, *, step: int | None = None, what: str = "checkpoint"):
  """`(load(directory, s), s)` for the newest step `s` under `path` that loads.

  A step that fails (any exception but `MissingEntryError`) is reported with its path and the
  reason, and the next older step is tried; a warning then names the step used and the newest
  one. `step`, or a step directory as `path`, asks for that step alone: no fallback. Raises
  FileNotFoundError when `path` holds no checkpoint, CheckpointError when none loads.
  """
  directory, newest = resolve(path, step)
  pinned = step is not None or os.path.abspath(os.fspath(path)) == os.path.join(directory, str(newest))
  candidates = [newest] if pinned else sorted(_steps(directory, with_state=False), reverse=True)
  failures = []
  for s in candidates:
    step_dir = os.path.join(directory, str(s))
    error = None
    try:
      if not os.path.isdir(os.path.join(step_dir, STATE)):
        raise FileNotFoundError(f"no {STATE}/ folder")
      result = load(directory, s)
    except MissingEntryError:
      raise
    except Exception as e:  # noqa: BLE001  any failure to read a step is damage to report
      error = e
      _quiet_restore_leftovers()
      gc.collect()  # orbax's abandoned reads fail now, quietly, not in the middle of the next step
    if _agree(error is None):
      if len(failures) == 1:
        logging.warning("%s: using step %d instead of step %d, which could not be restored (%s)",
                        directory, s, failures[0][0], failures[0][2])
      elif failures:
        logging.warning("%s: using step %d instead of steps %s, which could not be restored (reasons above)",
                        directory, s, ", ".join(str(f[0]) for f in failures))
      return result, s
    reason = _reason(error) if error is not None else "failed on another process"
    failures.append((s, step_dir, reason))
    logging.warning("%s %s could not be restored: %s", what, step_dir, reason)
  if pinned:
    raise CheckpointError(f"{what} {failures[0][1]} could not be restored: {failures[0][2]}")
  listing = "; ".join(f"step {s} ({reason})" for s, _, reason in failures)
  raise CheckpointError(f"no intact {what} under {directory}: {listing}")


def set_aside(directory: str, steps) -> list[str]:
  """Moves damaged step folders out of `directory` (to a sibling `damaged_checkpoints/`), so
  that a resumed run can save those steps again; nothing is deleted. Returns the new paths."""
  moved = []
  target_root = os.path.join(os.path.dirname(os.path.abspath(directory)), DAMAGED_DIR)
  for s in steps:
    src = os.path.join(directory, str(s))
    if not os.path.isdir(src):
      continue
    os.makedirs(target_root, exist_ok=True)
    dst, n = os.path.join(target_root, str(s)), 1
    while os.path.exists(dst):
      dst, n = os.path.join(target_root, f"{s}.{n}"), n + 1
    os.rename(src, dst)
    moved.append(dst)
  return moved


# ------------------------------------------------------------------------------------------------
# Fingerprints: one uint32 per array, computed where the array lives (sharded arrays on device)
# ------------------------------------------------------------------------------------------------

_GOLDEN, _M1, _M2 = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35


def _fmix(h, xp):
  """murmur3's 32-bit finaliser on uint32 arrays (numpy or jax.numpy; wraps mod 2^32)."""
  h = h ^ (h >> xp.uint32(16))
  h = h * xp.uint32(_M1)
  h = h ^ (h >> xp.uint32(13))
  h = h * xp.uint32(_M2)
  return h ^ (h >> xp.uint32(16))


def _bits_np(x: np.ndarray) -> np.ndarray:
  x = np.ascontiguousarray(x)
  if x.dtype == np.bool_:
    x = x.astype(np.uint8)
  size = x.dtype.itemsize
  if size == 8:
    return x.reshape(-1).view(np.uint32)
  return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[size]).reshape(-1).astype(np.uint32)


def _fingerprint_np(x) -> int:
  """The fingerprint of a host array: sum_i fmix(bits_i + i * golden) mod 2^32 (row-major i)."""
  bits = _bits_np(np.asarray(x))
  with np.errstate(over="ignore"):
    idx = np.arange(bits.size, dtype=np.uint64).astype(np.uint32)
    h = _fmix(bits + idx * np.uint32(_GOLDEN), np)
    return int(np.sum(h, dtype=np.uint32))


def _fingerprint_jnp(x):
  """The same fingerprint as `_fingerprint_np`, traced (sharded arrays reduce where they live)."""
  import jax.numpy as jnp
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  if size == 8:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2], the words in memory order
  else:
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]).astype(jnp.uint32)
  idx = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(bits.ndim)):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2 ** 32)
    stride *= bits.shape[axis]
  return jnp.sum(_fmix(bits + idx * jnp.uint32(_GOLDEN), jnp), dtype=jnp.uint32)


def _is_array(x) -> bool:
  return hasattr(x, "dtype") and hasattr(x, "shape")


def _leaf_names(tree, prefix=()) -> dict:
  """{'a/b/c': leaf} for the array leaves of a (nested dict / sequence) pytree."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(prefix + tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in p)): x
          for p, x in flat if _is_array(x)}


def fingerprints(tree, prefix=()) -> dict:
  """{leaf name: uint32 fingerprint} of every array in `tree` (jax arrays on their devices, in one
  jitted program; numpy arrays on the host)."""
  leaves = _leaf_names(tree, prefix)
  dev = {k: v for k, v in leaves.items() if isinstance(v, jax.Array)}
  out = {k: _fingerprint_np(v) for k, v in leaves.items() if k not in dev}
  if dev:
    values = jax.device_get(_device_fingerprints(list(dev.values())))
    out.update({k: int(v) for k, v in zip(dev, values)})
  return out


@jax.jit
def _device_fingerprints(arrays):
  return [_fingerprint_jnp(x) for x in arrays]


def _read_fingerprints(step_dir: str) -> dict | None:
  folder = os.path.join(step_dir, FINGERPRINTS)
  files = [f for f in os.listdir(folder) if not f.startswith("_") and not f.startswith("commit")] \
      if os.path.isdir(folder) else []
  if not files:
    return None  # saved before fingerprints existed: nothing to check
  with open(os.path.join(folder, files[0])) as f:
    return json.load(f)["leaves"]


def _verify(step_dir: str, tree, prefix=()) -> None:
  """Raises ValueError naming the arrays of `tree` whose data differ from the saved fingerprints."""
  saved = _read_fingerprints(step_dir)
  if saved is None:
    return
  got = fingerprints(tree, prefix)
  bad = sorted(k for k, v in got.items() if k in saved and int(saved[k]) != v)
  if bad:
    raise ValueError(f"array data differ from the fingerprints saved with them (garbled files): "
                     f"{bad[:3]}{' and %d more' % (len(bad) - 3) if len(bad) > 3 else ''}")


# ------------------------------------------------------------------------------------------------
# The manager: async saves every K steps, keep N
# ------------------------------------------------------------------------------------------------

def make_manager(workdir: str, *, save_every: int, keep: int, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager over `{workdir}/checkpoints` (created on every process)."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  # cleanup_tmp_directories: a save cut short (a kill, a full disk) leaves `{step}.orbax-checkpoint-tmp*`,
  # never taken for a step (only integer names are); the next writable manager removes it.
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=max(int(save_every), 1), max_to_keep=keep or None, create=not read_only,
      enable_async_checkpointing=async_save, read_only=read_only, cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, step: int, state, *, data_iterator=None, config=None,
         force: bool = False) -> bool:
  """Saves (asynchronously) when `step` is due or `force`; returns whether a save started.

  Every process must call this with the same step: arrays are global, the iterator state is
  written per process, the config and the fingerprints by the primary process. A full disk
  raises `disk.DiskFullError` (one line; the steps already saved stay intact): before writing
  when the free space is short of the last checkpoint's size (`check_space`), or when a write
  fails (this save's, or the previous asynchronous one's).
  """
  if not force and not manager.should_save(step):
    return False
  disk.quiet_disk_full_reports()
  check_space(manager, step, state)
  items = {STATE: ocp.args.PyTreeSave(state),
           FINGERPRINTS: ocp.args.JsonSave({"version": 1, "leaves": fingerprints(state)})}
  if data_iterator is not None and _GRAIN_SAVE is not None:
    items[DATA] = _GRAIN_SAVE(data_iterator)
  if config is not None:
    items[CONFIG] = ocp.args.JsonSave(config_to_dict(config))
  try:
    return manager.save(step, args=ocp.args.Composite(**items), force=force)
  except Exception as e:  # noqa: BLE001  a full disk is one line; anything else propagates
    if disk.is_disk_full(e):
      raise disk_full(manager) from None
    raise


def wait(manager: ocp.CheckpointManager) -> None:
  """`manager.wait_until_finished()`; a full disk during the save in flight raises `DiskFullError`."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # noqa: BLE001
    if disk.is_disk_full(e):
      raise disk_full(manager) from None
    raise


def disk_full(manager, step: int | None = None, needed: int | None = None) -> disk.DiskFullError:
  """The one line of a full disk under a run's checkpoints: the workdir, its free space, and the
  step a relaunch resumes from (the newest saved one; `resume` checks it and falls back)."""
  directory = os.fspath(manager.directory)
  workdir = os.path.dirname(os.path.abspath(directory))
  saved = _steps(directory)
  what = f"checkpoint step {step}" if step is not None else "saving a checkpoint"
  if needed is not None:
    what += f" (a checkpoint takes {disk.human(needed)})"
  resume_from = f"step {saved[-1]}" if saved else "the start (no step was saved)"
  return disk.error(workdir, what, f"nothing half-written is taken for a checkpoint; free some space (or "
                    f"move the workdir) and rerun the same command to resume from {resume_from}")


_sizes: dict = {}  # step directory -> bytes on disk (measured once)


def _dir_bytes(path: str) -> int:
  if path not in _sizes:
    total = 0
    for root, _, files in os.walk(path):
      for name in files:
        try:
          total += os.lstat(os.path.join(root, name)).st_size
        except OSError:
          pass
    _sizes[path] = total
  return _sizes[path]


def _state_bytes(state) -> int:
  """Bytes of `state` this process writes (its shards with replica id 0)."""
  total = 0
  for x in jax.tree.leaves(state):
    if isinstance(x, jax.Array):
      total += sum(s.data.nbytes for s in x.addressable_shards if s.replica_id == 0)
    elif _is_array(x):
      total += int(np.asarray(x).nbytes) if jax.process_index() == 0 else 0
  return total


def checkpoint_bytes(manager, state) -> int:
  """What the next checkpoint will take: the newest saved step's size on disk, else the state's
  bytes that this process writes."""
  directory = os.fspath(manager.directory)
  steps = _steps(directory)
  if steps:
    return _dir_bytes(os.path.join(directory, str(steps[-1])))
  return _state_bytes(state)


def check_space(manager, step: int, state) -> None:
  """Raises `DiskFullError` before anything is written when the checkpoint directory's disk has
  less free space than the next checkpoint takes (on any process: every process agrees)."""
  wait(manager)  # the save in flight first (orbax's `save` waits for it anyway): its size counts
  needed = checkpoint_bytes(manager, state)
  free, _ = disk.usage(os.fspath(manager.directory))
  if not _agree(free < 0 or free >= needed):
    raise disk_full(manager, step, needed)


def abstract_with_shardings(shapes, shardings):
  """ShapeDtypeStructs carrying the target shardings (restoring onto any mesh reshards)."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def restore(manager: ocp.CheckpointManager, abstract_state, *, data_iterator=None, step=None):
  """Restores `(state, step)` from `step`, else the newest intact step (`newest_intact`).

  `abstract_state` holds ShapeDtypeStructs with the target shardings. A step is intact when its
  state (checked against its fingerprints), its data-iterator state and its config all load.
  The data iterator, when given, is restored in place from this process's saved state.
  """
  directory = os.fspath(manager.directory)
  if step is None and not _steps(directory, with_state=False):
    raise FileNotFoundError(f"no checkpoint in {directory}")

  def load(directory, s):
    step_dir = os.path.join(directory, str(s))
    _check_json(step_dir)
    items = {STATE: ocp.args.PyTreeRestore(
        item=abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
    if data_iterator is not None and _GRAIN_RESTORE is not None and os.path.isdir(os.path.join(step_dir, DATA)):
      items[DATA] = _GRAIN_RESTORE(data_iterator)
    if os.path.isdir(os.path.join(step_dir, CONFIG)):
      items[CONFIG] = ocp.args.JsonRestore()
    state = manager.restore(s, args=ocp.args.Composite(**items))[STATE]
    _verify(step_dir, state)
    return state

  return newest_intact(directory, load, step=step)


def resume(manager: ocp.CheckpointManager, abstract_state, *, data_iterator=None):
  """`restore` for a run that goes on training: the damaged steps newer than the one restored
  are moved to `{workdir}/damaged_checkpoints/` (`set_aside`, never deleted), so that the run can
  save those steps again. Returns `(state, step)`."""
  state, step = restore(manager, abstract_state, data_iterator=data_iterator)
  directory = os.fspath(manager.directory)
  newer = [s for s in _steps(directory, with_state=False) if s > step]
  if newer:
    moved = set_aside(directory, newer) if jax.process_index() == 0 else []
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("apt2_jax.checkpointing.resume")
    manager.reload()
    logging.warning("resuming from step %d; the damaged step(s) %s were moved (not deleted) to %s",
                    step, ", ".join(map(str, newer)), ", ".join(moved) or "damaged_checkpoints/")
  return state, step


# ------------------------------------------------------------------------------------------------
# Configs as JSON
# ------------------------------------------------------------------------------------------------

def config_to_dict(config) -> dict:
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json())
  return json.loads(json.dumps(config))


def _read_config(directory: str, step: int) -> ml_collections.ConfigDict:
  config_dir = os.path.join(directory, str(step), CONFIG)
  files = [f for f in os.listdir(config_dir) if not f.startswith("_") and not f.startswith("commit")] \
      if os.path.isdir(config_dir) else []
  if not files:
    raise FileNotFoundError(f"no config saved in {config_dir}")
  _check_json(os.path.join(directory, str(step)), (CONFIG,))
  with open(os.path.join(config_dir, files[0])) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_config(path: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The ConfigDict saved with a checkpoint (workdir, checkpoints dir or step dir): the newest
  step whose config reads (`newest_intact`; the arrays are not read)."""
  return newest_intact(path, _read_config, step=step, what="checkpoint config")[0]


# ------------------------------------------------------------------------------------------------
# load_params: the contract other stages rely on
# ------------------------------------------------------------------------------------------------

def load_params(path: str, *, key: str = "ema_params", step: int | None = None, shardings=None):
  """Loads one parameter subtree of any stage's checkpoint: `(params, config)`.

  Args:
    path: a workdir, its `checkpoints/` directory, or one step directory.
    key: the state entry, "ema_params" (falls back to "params" with a warning when the run kept
      no EMA) or "params", or any other top-level key (e.g. a discriminator's).
    step: a saved step (default: the newest intact one, see `newest_intact`).
    shardings: where to put the arrays: None (numpy on the host), one `jax.sharding.Sharding`
      for every leaf, a pytree of them matching the subtree, or a callable
      `(path: tuple[str, ...], shape) -> Sharding` (e.g. the target layout where shapes agree).
  Returns:
    (params as a nested dict of arrays, the run's ConfigDict).
  Raises:
    MissingEntryError (a KeyError) when the state has no `key`; CheckpointError when no step
    restores.
  """
  return load_entries(path, (key,), step=step, shardings=shardings)[:2]


def load_entries(path: str, keys, *, step: int | None = None, shardings=None):
  """`load_params` for several entries of one step: `(params or {key: subtree}, config, step)`.

  With one key the first result is that subtree, with several a dict of them; all come from the
  same (newest intact) step as the config.
  """
  keys = tuple(keys)

  def load(directory, s):
    state_dir = os.path.join(directory, str(s), STATE)
    _check_json(os.path.dirname(state_dir), (STATE, CONFIG, FINGERPRINTS))
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(state_dir)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict):
      raise ValueError(f"unreadable state metadata in {state_dir}")
    items, args = {}, {}
    for key in keys:
      if key not in tree:
        if key == "ema_params" and "params" in tree:
          logging.warning("%s has no ema_params (config.ema_decay was 0); loading params", state_dir)
          key = "params"
        else:
          raise MissingEntryError(f"checkpoint {state_dir} has no entry {key!r}; entries: {sorted(tree)}")
      items[key], args[key] = _restore_item(tree[key], shardings)
    restored = checkpointer.restore(
        state_dir, args=ocp.args.PyTreeRestore(item=items, restore_args=args, partial_restore=True))
    _verify(os.path.dirname(state_dir), restored)
    config = _read_config(directory, s)
    subtrees = [restored["params" if k == "ema_params" and k not in restored else k] for k in keys]
    return (subtrees[0] if len(keys) == 1 else dict(zip(keys, subtrees))), config

  (params, config), s = newest_intact(path, load, step=step)
  return params, config, s


def _restore_item(sub, shardings):
  """(item, restore_args) restoring the metadata subtree `sub` as numpy or onto `shardings`."""
  if shardings is None:
    return (jax.tree.map(lambda m: np.zeros((), np.float32), sub),
            jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), sub))
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda m, s=shardings: s, sub)
  elif callable(shardings):
    shardings = jax.tree_util.tree_map_with_path(
        lambda p, m, f=shardings: f(tuple(str(getattr(k, "key", k)) for k in p), tuple(m.shape)), sub)
  item = jax.tree.map(lambda m, sh: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sh), sub, shardings)
  return item, ocp.checkpoint_utils.construct_restore_args(item)
