"""The config files of `experiments/`, loaded by path as `--config=experiments/<name>.py` loads them.

    from tests.config_files import stage1_adapt   # the module experiments/stage1_adapt.py
    stage1_adapt.get_config("tiny")

`experiments/` is not a package: nothing imports it by module path (library code uses
`apt2_jax.configs`). Each file is loaded once, under the module name `config_files.<name>`.
"""
import importlib.util
import os
import types

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
NAMES = tuple(sorted(f[:-3] for f in os.listdir(EXPERIMENTS) if f.endswith(".py")))
_loaded = {}


def load(path: str) -> types.ModuleType:
  """The config file at `path` (or the `experiments/<path>.py` of a bare name) as a module."""
  if os.sep not in path and not path.endswith(".py"):
    path = os.path.join(EXPERIMENTS, path + ".py")
  path = os.path.abspath(path)
  if path not in _loaded:
    name = "config_files." + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _loaded[path] = module
  return _loaded[path]


def __getattr__(name: str) -> types.ModuleType:  # `from tests.config_files import stage1_adapt`
  if name in NAMES:
    return load(name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}; config files: {NAMES}")
