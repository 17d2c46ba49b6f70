"""A full disk: one line naming the directory and its free space, and no half-written output.

Every program that writes results goes through here when the disk may fill:
  - `DiskFullError` (exit status `EXIT_DISK_FULL` = 74 from `apt2_jax.cli`): the one line;
  - `is_disk_full(e)`: whether an exception (or its cause, or a TensorStore message inside it)
    means "no space left" (ENOSPC, EDQUOT, TensorStore's RESOURCE_EXHAUSTED on a write);
  - `write_atomic(path, data)` and `atomic_path(path)`: a file appears under its name only when it
    is whole (written to a temporary name in the same directory, then renamed);
  - `quiet_disk_full_reports()`: orbax writes checkpoints from background threads and asyncio
    tasks; when the disk fills each of them reports it (hundreds of tracebacks, more at
    interpreter shutdown). The hooks installed here drop those reports: the main thread raises
    `DiskFullError` instead (`apt2_jax.checkpointing.save`).
"""
from __future__ import annotations

import contextlib
import errno
import logging as pylogging
import os
import shutil
import sys
import threading

EXIT_DISK_FULL = 74  # sysexits.h EX_IOERR
_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_TEXTS = ("No space left on device", "Disk quota exceeded")


class DiskFullError(RuntimeError):
  """No space left to write an output; its message is the one line users see."""
  exit_code = EXIT_DISK_FULL


def _chain(e: BaseException):
  """`e`, its causes and contexts, and the members of exception groups."""
  seen, todo = set(), [e]
  while todo:
    x = todo.pop()
    if x is None or id(x) in seen:
      continue
    seen.add(id(x))
    yield x
    todo += [x.__cause__, x.__context__] + list(getattr(x, "exceptions", ()) or ())


def _text_is_disk_full(text: str) -> bool:
  return any(t in text for t in _TEXTS) or ("RESOURCE_EXHAUSTED" in text and "writing" in text.lower())


def is_disk_full(e: BaseException | None) -> bool:
  """Whether `e` (or anything in its chain) says that the disk or the quota is full."""
  if e is None:
    return False
  for x in _chain(e):
    if isinstance(x, DiskFullError):
      return True
    if isinstance(x, OSError) and x.errno in _ERRNOS:
      return True
    if _text_is_disk_full(str(x)):
      return True
  return False


def human(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if abs(n) < 1024 or unit == "TB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TB"


def usage(path: str) -> tuple[int, int]:
  """(free bytes for this user, total bytes) of the filesystem holding `path` (or its nearest
  existing parent)."""
  path = os.path.abspath(os.fspath(path))
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    u = shutil.disk_usage(path)
    return int(u.free), int(u.total)
  except OSError:
    return -1, -1


def space(path: str) -> str:
  """'1.2 MB free of 3.0 MB' for the filesystem holding `path`."""
  free, total = usage(path)
  return "free space unknown" if free < 0 else f"{human(free)} free of {human(total)}"


def error(path: str, what: str, advice: str = "") -> DiskFullError:
  """The one-line error: `{what}: no space left on the disk of {path} ({free} free of {total})`."""
  line = f"{what}: no space left on the disk of {os.path.abspath(os.fspath(path))} ({space(path)})"
  return DiskFullError(f"{line}; {advice}" if advice else line)


# ------------------------------------------------------------------------------------------------
# Whole files only
# ------------------------------------------------------------------------------------------------

def temporary_name(path: str) -> str:
  """A hidden sibling of `path` with the same suffix (tools pick formats by the suffix)."""
  head, tail = os.path.split(os.path.abspath(os.fspath(path)))
  stem, ext = os.path.splitext(tail)
  return os.path.join(head, f".{stem}.partial-{os.getpid()}{ext}")


def remove_quietly(path: str | None) -> None:
  if path is None:
    return
  try:
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      os.remove(path)
  except OSError:
    pass


@contextlib.contextmanager
def atomic_path(path: str, what: str | None = None):
  """Yields a temporary path to write `path`'s content to; renames it to `path` when the block
  succeeds, removes it when it fails (a full disk becomes `DiskFullError` naming `what`)."""
  tmp = temporary_name(path)
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException as e:
    remove_quietly(tmp)
    if is_disk_full(e) and not isinstance(e, DiskFullError):
      raise error(os.path.dirname(os.path.abspath(path)), what or f"writing {path}",
                  f"{path} was not written") from None
    raise


def write_atomic(path: str, data: str | bytes, what: str | None = None, mode: int | None = None) -> None:
  """Writes `data` to `path` whole or not at all (`atomic_path`)."""
  with atomic_path(path, what) as tmp:
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    if mode is not None:
      os.chmod(tmp, mode)


# ------------------------------------------------------------------------------------------------
# One line instead of hundreds: the background writers' reports of a full disk
# ------------------------------------------------------------------------------------------------

_seen = threading.Event()  # a full disk was reported somewhere in this process
# What orbax's abandoned writes print after the disk filled: their event loops are gone, and at
# interpreter shutdown their coroutines cannot even import.
_AFTERMATH = ("Event loop is closed", "sys.meta_path is None", "Python is likely shutting down")


def _report_is_noise(exc: BaseException | None, text: str = "") -> bool:
  if is_disk_full(exc) or _text_is_disk_full(text):
    _seen.set()
    return True
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    return True  # TensorStore completing a write for an orbax event loop already gone: never news
  if _seen.is_set():
    texts = [text] + [f"{type(x).__name__}: {x}" for x in _chain(exc)] if exc is not None else [text]
    return any(a in t for t in texts for a in _AFTERMATH)
  return False


class _DiskFullLogFilter(pylogging.Filter):
  """Drops log records about a full disk (and their aftermath once one was seen)."""
  _apt2_disk = True

  def filter(self, record) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    try:
      text = record.getMessage()
    except Exception:  # noqa: BLE001  a record that does not format is not ours to judge
      text = str(record.msg)
    return not _report_is_noise(exc, text)


def _install(name: str, make):
  previous = getattr(sys, name)
  if getattr(previous, "_apt2_disk", False):
    return
  hook = make(previous)
  hook._apt2_disk = True
  setattr(sys, name, hook)


def quiet_disk_full_reports() -> None:
  """Installs (once) filters that drop background reports of a full disk: on the root logger's
  and absl's handlers and loggers, `threading.excepthook`, `sys.excepthook` (TensorStore's
  callbacks into closed event loops) and `sys.unraisablehook` (coroutines dropped at shutdown).
  Nothing else is filtered; the main thread reports the full disk in one line."""
  log_filter = _DiskFullLogFilter()
  loggers = [pylogging.getLogger(), pylogging.getLogger("absl"), pylogging.getLogger("asyncio")]
  try:
    from absl import logging as absl_logging
    absl_handler = absl_logging.get_absl_handler()
    handlers = [absl_handler, absl_handler.python_handler]  # ABSLHandler.handle skips its own filters
  except ImportError:  # pragma: no cover
    handlers = []
  for target in loggers + handlers + [h for lg in loggers for h in lg.handlers]:
    if not any(getattr(f, "_apt2_disk", False) for f in target.filters):
      target.addFilter(log_filter)

  def excepthook(previous):
    def hook(exc_type, exc, tb):
      if not _report_is_noise(exc):
        previous(exc_type, exc, tb)
    return hook

  def threading_hook(previous):
    def hook(args):
      if not _report_is_noise(args.exc_value):
        previous(args)
    return hook

  def unraisable_hook(previous):
    def hook(unraisable):
      if not _report_is_noise(unraisable.exc_value, repr(getattr(unraisable, "object", ""))):
        previous(unraisable)
    return hook

  _install("excepthook", excepthook)
  _install("unraisablehook", unraisable_hook)
  previous = threading.excepthook
  if not getattr(previous, "_apt2_disk", False):
    hook = threading_hook(previous)
    hook._apt2_disk = True
    threading.excepthook = hook
