"""One-line errors for the command-line programs.

    if __name__ == "__main__":
      cli.run(main)                       # or cli.run(main, config_flags=("config",))

`run` is `absl.app.run` with two differences that users meet first:
  - a bad input prints one line, `error: <flag or field>: <what is wrong>`, and exits with status
    1, instead of a traceback or the module's whole usage text: `app.UsageError` raised by
    `main`, a config that fails validation (`train.validate.ConfigError`), a checkpoint that
    cannot be restored (`checkpointing.CheckpointError`), and flag-parsing errors, the
    ml_collections config flags' included (a config file that does not exist or fails in
    `get_config`, an override of a field the config lacks or of the wrong type);
  - config files are loaded while flags are parsed (ml_collections defers their errors to the
    first `FLAGS.config`), so they fail before anything starts.
Other exceptions keep their tracebacks: they are bugs to report, not inputs to fix.
"""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags

EXIT_CODE = 1


def fail(message: str, code: int = EXIT_CODE) -> None:
  """Prints `error: <message>` as one line to stderr and exits with status `code` (1: a bad
  input; 74: a full disk, `disk.DiskFullError`)."""
  line = " ".join(str(message).split())
  sys.stderr.write(f"error: {line}\n")
  sys.stderr.flush()
  sys.exit(code)


def _root(e: BaseException) -> BaseException:
  """The innermost exception of a chain (config_flags wraps `get_config`'s error twice)."""
  seen = set()
  while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return e


def _message(e: BaseException) -> str:
  text = str(e)
  if isinstance(e, KeyError) and len(e.args) == 1:
    text = str(e.args[0])
  return text.strip().strip('"').strip() or type(e).__name__


def _override_arg(argv, name: str, field: str) -> str | None:
  """The `--<name>.<...field...>=...` argument that names `field`."""
  for arg in argv[1:]:
    m = re.match(rf"--{re.escape(name)}\.([\w.]+)(=.*)?$", arg)
    if m and field in m.group(1).split("."):
      return arg
  return None


def _config_flag_error(argv, name: str, e: BaseException) -> str:
  """One line for an error raised while parsing the config flag `name` or its overrides."""
  value = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith(f"--{name}=")), "")
  filename = value.split(":")[0]
  if filename and not os.path.exists(filename):
    return f"--{name}={value}: no such config file {filename!r}"
  if filename and os.path.isdir(filename):
    return f"--{name}={value}: {filename!r} is a directory, not a config file"
  root = _root(e)
  if isinstance(root, (AttributeError, KeyError)):
    field = _message(root).strip("'")
    arg = _override_arg(argv, name, field)
    if arg is not None:
      return f"{arg.split('=')[0]}: the config has no field {field!r}"
  if isinstance(e, flags.Error) and str(e).startswith("flag --") and "Error whilst parsing" not in str(e):
    return str(e).splitlines()[0][len("flag "):]  # "--config.x=v: what is wrong"
  return f"--{name}={value}: {_message(root).splitlines()[0]}"


def _parser(config_flags):
  def parse(argv):
    try:
      args = flags.FLAGS(argv)
      for name in config_flags:  # config_flags keeps a file's load error for the first access
        error = getattr(getattr(flags.FLAGS, name), "_error", None)
        if isinstance(error, BaseException):
          raise error
      return args
    except Exception as e:  # noqa: BLE001  every parse error becomes one line
      bad_config = next((n for n in config_flags
                         if any(a.startswith(f"--{n}=") or a.startswith(f"--{n}.") for a in argv[1:])
                         and (not isinstance(e, flags.Error) or n in str(e))), None)
      if bad_config is not None:
        fail(_config_flag_error(argv, bad_config, e))
      if isinstance(e, flags.Error):
        fail(str(e).splitlines()[0] + " (--helpshort lists the flags)")
      raise
  return parse


def user_errors() -> tuple:
  """The exception types `run` reports in one line."""
  from apt2_jax import checkpointing, disk
  from apt2_jax.train.validate import ConfigError
  return app.UsageError, ConfigError, checkpointing.CheckpointError, disk.DiskFullError


def run(main, *, config_flags: tuple = ()) -> None:
  """`absl.app.run(main)` with one-line errors (module docstring)."""
  def wrapped(argv):
    try:
      return main(argv)
    except Exception as e:  # noqa: BLE001
      if isinstance(e, user_errors()):
        fail(str(e), getattr(e, "exit_code", EXIT_CODE))
      raise
  app.run(wrapped, flags_parser=_parser(tuple(config_flags)))
