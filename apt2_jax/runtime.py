"""What every command sets up first: the persistent compilation cache and a readable console.

Each command line (`main`, `inference.sample`, `inference.serve`, `export`, `evaluation`,
`benchmark`, `demo`) calls `define_flags()` where it defines its flags and `setup()` at the top of
its `main`, before anything compiles:

  compilation cache  JAX's persistent compilation cache, on by default in a per-user directory
                     (`$XDG_CACHE_HOME/apt2_jax/jax_compilation_cache`, else
                     `~/.cache/apt2_jax/jax_compilation_cache`). `--compilation_cache=DIR` or
                     `APT2_COMPILATION_CACHE=DIR` moves it; `off` (or `0`, `none`, an empty
                     string) disables it. A `JAX_COMPILATION_CACHE_DIR` set by the user wins over
                     the default. A rerun of the same program then loads its compiled steps
                     instead of compiling them again (programs that compile in under a second are
                     not stored: `jax_persistent_cache_min_compile_time_secs`).
  compile notices    one line when an XLA compile has been running for `NOTICE_AFTER_S` seconds
                     (so a silent minute reads as compiling, not as hung) and one when it ends,
                     with its duration; a program loaded from the persistent cache says so.
  logging            absl everywhere. orbax's per-save records (some 50 lines per save) are
                     reduced to its one "Finished save" record, rewritten as `saved checkpoint
                     DIR (x s)`; other INFO noise (the TPU probe on CPU/GPU machines) is dropped.
  progress bars      `progress_bar(...)`: tqdm only when stderr is a terminal; while it is open,
                     log lines are printed above the bar instead of through it.

Helpers for the loop and the benchmark: `StepProfiler` (a `jax.profiler` trace of N steady-state
steps) and `check_local_path` (remote `gs://` paths are refused with a clear message).

This module imports JAX lazily: `define_flags` and the logging setup work before the backend
starts (`main` joins the other hosts first).
"""
from __future__ import annotations

import logging as py_logging
import os
import re
import sys
import threading
import time

from absl import flags, logging

CACHE_ENV = "APT2_COMPILATION_CACHE"
_OFF = ("", "0", "off", "none", "false", "no")
NOTICE_AFTER_S = 2.0  # a compile running this long gets a "compiling" line (and a "compiled" one)


# ================================================================================================
# Flags and setup
# ================================================================================================

def define_flags() -> None:
  """Defines `--compilation_cache` (once; every command line calls this)."""
  if "compilation_cache" not in flags.FLAGS:
    flags.DEFINE_string(
        "compilation_cache", None,
        f"JAX persistent compilation cache directory; 'off' disables it. Default: ${CACHE_ENV}, "
        "else ~/.cache/apt2_jax/jax_compilation_cache.")


def default_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "apt2_jax", "jax_compilation_cache")


def cache_dir_setting(value: str | None = None) -> str | None:
  """The cache directory from a flag value, else `$APT2_COMPILATION_CACHE`, else the default;
  None when switched off."""
  if value is None:
    value = os.environ.get(CACHE_ENV)
  if value is None:
    return default_cache_dir()
  if value.strip().lower() in _OFF:
    return None
  return os.path.abspath(os.path.expanduser(value))


def enable_compilation_cache(path: str | None) -> str | None:
  """Points JAX's persistent compilation cache at `path` (None: leave it off). A directory the
  user already gave JAX (`JAX_COMPILATION_CACHE_DIR`) is kept. Returns the directory in use."""
  import jax
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    logging.warning("compilation cache disabled: cannot create %s (%s)", path, e)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  return path


_SETUP_DONE = False


def setup(*, compilation_cache: str | None = None) -> str | None:
  """Console and compilation cache of a command; call at the top of `main`, before any compile.

  `compilation_cache` overrides the flag / environment (tests). Returns the cache directory in use.
  """
  global _SETUP_DONE
  configure_logging()
  value = compilation_cache
  if value is None and "compilation_cache" in flags.FLAGS and flags.FLAGS.is_parsed():
    value = flags.FLAGS.compilation_cache
    if value is not None:  # child processes (the benchmark's AOT cases) follow the flag
      os.environ[CACHE_ENV] = value
  path = enable_compilation_cache(cache_dir_setting(value))
  install_compile_notices()
  if not _SETUP_DONE:
    logging.info("persistent compilation cache: %s", path or "off")
  _SETUP_DONE = True
  return path


# ================================================================================================
# Logging: orbax's chatter to one line per save, noise dropped
# ================================================================================================

_FINISHED_SAVE = re.compile(r"Finished (?:save|synchronous save).*? in ([0-9.]+) seconds? @ (\S+)")
_STATE_METADATA = re.compile(r"Metadata file does not exist: .*/state/_CHECKPOINT_METADATA")
_NOISE = (
    re.compile(r"Unable to initialize backend '(tpu|cuda|rocm)'"),
)


class ConsoleFilter(py_logging.Filter):
  """Drops orbax's INFO records except its one "Finished save" record per save (rewritten as
  `saved checkpoint DIR (x s)`), and a few known INFO lines that say nothing to a user.
  Warnings and errors always pass."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      # load_params reads `<step>/state` as a checkpoint of its own: orbax then misses the step's
      # metadata file there, which is expected and harmless
      return not (record.levelno == py_logging.WARNING and _STATE_METADATA.search(_message(record)))
    if getattr(record, "apt2_kept", False):  # rewritten by this filter on the logger already
      return True
    path = record.pathname or ""
    if f"{os.sep}orbax{os.sep}" in path:
      m = _FINISHED_SAVE.search(_message(record))
      if not m:
        return False
      record.msg, record.args = "saved checkpoint %s (%.1f s)", (m.group(2), float(m.group(1)))
      record.apt2_kept = True
      return True
    if any(p.search(str(record.msg)) for p in _NOISE):
      return False
    return True


def _message(record: py_logging.LogRecord) -> str:
  try:
    return record.getMessage()
  except Exception:  # pragma: no cover - a malformed record
    return str(record.msg)


_FILTER = ConsoleFilter()


def configure_logging() -> None:
  """Installs `ConsoleFilter` on absl's handler (idempotent)."""
  handler = logging.get_absl_handler()
  if _FILTER not in handler.filters:
    handler.addFilter(_FILTER)
  # orbax also logs through the `absl` logger directly; filter there too when the absl handler is
  # not the one that ends up writing (e.g. under pytest's log capture).
  absl_logger = py_logging.getLogger("absl")
  if _FILTER not in absl_logger.filters:
    absl_logger.addFilter(_FILTER)


# ================================================================================================
# Compile notices
# ================================================================================================

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_notices_installed = False
_compiles: dict[int, dict] = {}  # thread id -> the compile running on it
_totals = {"seconds": 0.0, "count": 0, "cache_hits": 0}
_lock = threading.Lock()


def _on_scalar(event: str, value, **kwargs) -> None:
  if event != _BACKEND_COMPILE:
    return
  name = kwargs.get("fun_name", "a program")
  entry = {"name": name, "start": time.perf_counter(), "hit": False, "announced": False}

  def announce():
    entry["announced"] = True
    logging.info("compiling %s with XLA ...", name)
  entry["timer"] = timer = threading.Timer(NOTICE_AFTER_S, announce)
  timer.daemon = True
  with _lock:
    _compiles[threading.get_ident()] = entry
  timer.start()


def _on_event(event: str, **kwargs) -> None:
  if event == _CACHE_HIT:
    entry = _compiles.get(threading.get_ident())
    if entry is not None:
      entry["hit"] = True


def _on_duration(event: str, duration: float, **kwargs) -> None:
  if event != _BACKEND_COMPILE:
    return
  with _lock:
    entry = _compiles.pop(threading.get_ident(), None)
    _totals["seconds"] += duration
    _totals["count"] += 1
  if entry is None:
    return
  entry["timer"].cancel()
  _totals["cache_hits"] += int(entry["hit"])
  if entry["announced"] or duration >= NOTICE_AFTER_S:
    if entry["hit"]:
      logging.info("loaded %s from the persistent compilation cache in %.1f s", entry["name"], duration)
    else:
      logging.info("compiled %s in %.1f s", entry["name"], duration)


def install_compile_notices() -> None:
  """Registers the JAX monitoring listeners behind the compile notices (once per process)."""
  global _notices_installed
  if _notices_installed:
    return
  from jax import monitoring
  monitoring.register_scalar_listener(_on_scalar)
  monitoring.register_event_listener(_on_event)
  monitoring.register_event_duration_secs_listener(_on_duration)
  _notices_installed = True


def compile_totals() -> dict:
  """{seconds, count, cache_hits} of the XLA compiles seen since `setup` (notices installed)."""
  return dict(_totals)


# ================================================================================================
# Progress bars: on a terminal only, with log lines printed above them
# ================================================================================================

class _AboveBar:
  """A stream for absl's handler while a bar is open: each record goes through `tqdm.write`."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, text: str) -> None:
    from tqdm import tqdm
    text = text.rstrip("\n")
    if text:
      tqdm.write(text, file=self.stream)

  def flush(self) -> None:
    self.stream.flush()


def is_terminal(stream=None) -> bool:
  stream = sys.stderr if stream is None else stream
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):
    return False


class ProgressBar:
  """A tqdm bar on stderr; while it is open, absl log lines are printed above it (`tqdm.write`)
  instead of through it. `close()` (or leaving a `with` block) restores the log stream."""

  def __init__(self, **tqdm_kwargs):
    from tqdm import tqdm
    self._handler = logging.get_absl_handler().python_handler
    self._previous = self._handler.stream
    # smoothing=0: the rate is the plain average since the clock was (re)started (see update)
    self.bar = tqdm(file=sys.stderr, dynamic_ncols=True, smoothing=0, **tqdm_kwargs)
    self._handler.setStream(_AboveBar(self._previous))
    self._timed = False

  def update(self, n: int = 1) -> None:
    self.bar.update(n)
    if not self._timed:  # the first update ends the compile: rate and ETA count from here on
      self._timed = True
      self.bar.start_t = self.bar.last_print_t = self.bar._time()  # pylint: disable=protected-access
      self.bar.initial = self.bar.n

  def set_postfix(self, **kwargs) -> None:
    self.bar.set_postfix(**kwargs)

  def close(self) -> None:
    if self.bar is not None:
      self._handler.setStream(self._previous)
      self.bar.close()
      self.bar = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def progress_bar(enabled: bool = True, **tqdm_kwargs) -> ProgressBar | None:
  """A `ProgressBar` when `enabled` and stderr is a terminal, else None: on a cluster (stderr to a
  file) the log lines carry the progress, and a bar would only fill the file with redraws."""
  if not (enabled and is_terminal()):
    return None
  return ProgressBar(**tqdm_kwargs)


def format_duration(seconds: float) -> str:
  """`1:02:03`, `2:03` or `12 s`."""
  seconds = max(0.0, float(seconds))
  if seconds < 60:
    return f"{seconds:.0f} s"
  m, s = divmod(int(round(seconds)), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# ================================================================================================
# Profiles
# ================================================================================================

class StepProfiler:
  """A `jax.profiler` trace of `steps` steady-state steps into `log_dir`.

  The trace starts before step `first_step + skip` (the first steps after a start compile and
  warm up) and stops after `steps` steps, once their results are ready. It holds the XPlane
  (`plugins/profile/<run>/*.xplane.pb`, TensorBoard's profile plugin: `tensorboard --logdir
  LOG_DIR`) and a Perfetto trace (`perfetto_trace.json.gz`, open it at the Perfetto UI).

      profiler = StepProfiler(dir, steps=5, first_step=start)
      for step in ...:
        profiler.before(step)
        state = train_step(state)
        profiler.after(step, state)
      profiler.close()        # stops a trace the loop ended early
  """

  def __init__(self, log_dir: str | None, steps: int, first_step: int = 0, skip: int = 2):
    self.log_dir, self.steps = log_dir, int(steps or 0)
    self.start = int(first_step) + 1 + int(skip)
    self.stop = self.start + self.steps - 1
    self.active = False

  @property
  def enabled(self) -> bool:
    return bool(self.log_dir) and self.steps > 0

  def before(self, step: int) -> None:
    if self.enabled and step == self.start and not self.active:
      import jax
      os.makedirs(self.log_dir, exist_ok=True)
      logging.info("profiling steps %d-%d into %s", self.start, self.stop, self.log_dir)
      jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True)
      self.active = True

  def after(self, step: int, outputs=None) -> None:
    if self.active and step >= self.stop:
      self._finish(outputs)

  def close(self, outputs=None) -> None:
    if self.active:
      self._finish(outputs)

  def _finish(self, outputs) -> None:
    import jax
    if outputs is not None:
      jax.block_until_ready(outputs)
    jax.profiler.stop_trace()
    self.active = False
    logging.info("wrote the profile to %s: view with `tensorboard --logdir %s` (Profile tab; pip install "
                 "-e '.[tensorboard]'), or open %s/plugins/profile/*/perfetto_trace.json.gz in the "
                 "Perfetto UI", self.log_dir, self.log_dir, self.log_dir)


# ================================================================================================
# Paths
# ================================================================================================

_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def check_local_path(path: str | None, what: str) -> str | None:
  """`path` itself when it is a local path; ValueError for `gs://`-style URLs, which this code
  (os.path throughout, orbax's layout under a local directory) does not support."""
  if path and _REMOTE.match(str(path)):
    raise ValueError(f"{what}={path!r}: remote paths ({str(path).split('://')[0]}://) are not supported; "
                     "use a local or mounted directory (e.g. the bucket mounted with gcsfuse)")
  return path


def require_local_paths(*names: str) -> None:
  """`app.UsageError` naming the first of the flags `names` that holds a remote (`gs://`) path."""
  from absl import app
  for name in names:
    try:
      check_local_path(getattr(flags.FLAGS, name, None), f"--{name}")
    except ValueError as e:
      raise app.UsageError(str(e)) from None
