"""The config files of `experiments/` work from any directory: they import `apt2_jax`, never each
other, and the library never imports `experiments`."""
import ast
import os
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

import apt2_jax
from tests.config_files import EXPERIMENTS, NAMES

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # absl's loader

ROOT = os.path.dirname(EXPERIMENTS)
PACKAGE = os.path.dirname(os.path.abspath(apt2_jax.__file__))
DIT_SIZES = ("tiny", "small", "wan_1_3b", "apt2_8b")
STAGES = ("pretrain", "adapt", "distill", "adversarial", "long_video")

# Every config file and every argument it accepts (a new file must be listed here).
ARGS = {
    "benchmark": DIT_SIZES + ("peer", "cpu_stream"),
    "camera_control": tuple(f"{stage},{size}" for stage in STAGES for size in DIT_SIZES),
    "pose_control": tuple(f"{stage},{size}" for stage in STAGES for size in DIT_SIZES),
    "stage0_pretrain": DIT_SIZES + ("small,world=puppet", "tiny,world=bouncing"),
    "stage1_adapt": DIT_SIZES + ("small,world=puppet",),
    "stage2_distill": DIT_SIZES + ("small,world=puppet",),
    "stage3_adversarial": DIT_SIZES + ("small,variant=teacher_forcing", "small,recycle=0",
                                       "small,detach_cache=1,loss=non_saturating"),
    "stage3_long_video": DIT_SIZES + ("tiny,segment_frames=3,overlap_frames=1,num_segments=2",),
    "toy_pipeline": ("tiny", "demo", "full"),
    "testbed": ("tiny", "short", "full"),
    "vae": ("tiny", "small", "wan", "slim_decoder", "light_decoder"),
}


def _experiments_modules():
  return sorted(m for m in sys.modules if m == "experiments" or m.startswith("experiments."))


def _imports(path):
  """Top-level module names that the Python file at `path` imports."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      names.append(node.module)
  return names


def test_every_config_file_is_listed():
  assert set(NAMES) == set(ARGS), "list each experiments/*.py file and its arguments in ARGS"
  assert not os.path.exists(os.path.join(EXPERIMENTS, "__init__.py")), "experiments/ is not a package"


@pytest.mark.parametrize("name", sorted(ARGS))
def test_config_file_loads_by_path_from_another_directory(name, tmp_path, monkeypatch):
  """As `--config=<path>:<arg>` from another directory, with the repository off sys.path."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, "path", [p for p in sys.path
                                    if os.path.abspath(p or os.curdir) != ROOT])
  path = os.path.relpath(os.path.join(EXPERIMENTS, name + ".py"), tmp_path)
  before = _experiments_modules()
  for arg in ARGS[name]:
    argv = ["prog", f"--config={path}:{arg}"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
    values(argv)
    config = values.config
    assert isinstance(config, ml_collections.ConfigDict), (name, arg)
    assert config.stage, (name, arg)
  assert _experiments_modules() == before == []


@pytest.mark.parametrize("name", sorted(ARGS))
def test_config_file_imports_only_the_package(name):
  """Config files import `apt2_jax` (and ml_collections), never each other."""
  imported = set(_imports(os.path.join(EXPERIMENTS, name + ".py")))
  allowed = {"__future__", "ml_collections"}
  assert {m for m in imported if m not in allowed and m.split(".")[0] != "apt2_jax"} == set()


def test_library_never_imports_experiments():
  offenders = []
  for dirpath, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        if any(m.split(".")[0] == "experiments" for m in _imports(path)):
          offenders.append(os.path.relpath(path, PACKAGE))
        with open(path) as fh:
          if "import_module(\"experiments" in fh.read():
            offenders.append(os.path.relpath(path, PACKAGE))
  assert offenders == []


def test_package_configs_import_from_anywhere_without_jax(tmp_path):
  code = ("import sys\n"
          "from apt2_jax.configs import adversarial, benchmark, control, diffusion, sizes, toy_pipeline, vae\n"
          "assert 'jax' not in sys.modules, 'apt2_jax.configs imports JAX'\n"
          "assert not [m for m in sys.modules if m.split('.')[0] == 'experiments']\n"
          "print(sorted(sizes.SIZES), len(toy_pipeline.ORDER))\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
