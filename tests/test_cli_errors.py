"""Bad inputs to the command-line programs print one line and exit with status 1 (`apt2_jax.cli`).

Each program runs as `python -m <module>` would (`runpy`, `__main__`), many cases per subprocess
so that JAX is imported once per program: the driver records each case's exit status and stderr.
One case per program also runs as a real process, to check the exit status end to end.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs each case's module as __main__, as a fresh process would (the flags that earlier cases
# defined are removed first), with file descriptor 2 captured per case; prints
# [{"code", "stderr"}] as JSON on the last line of stdout.
DRIVER = r"""
import importlib.util, json, os, runpy, sys, tempfile, traceback
from absl import app, flags
cases = json.loads(sys.argv[1])
paths = set()
results = []
for module, argv in cases:
  paths.add(importlib.util.find_spec(module).origin)  # a __main__ run's flags register under it
  names = [f.name for p in paths for f in flags.FLAGS.flags_by_module_dict().get(p, [])]
  for name in names + [n for n in flags.FLAGS if "." in n]:  # and the config overrides ("config.x")
    if name in flags.FLAGS:
      delattr(flags.FLAGS, name)
  sys.argv = [module] + argv
  with tempfile.TemporaryFile(mode="w+") as err:
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(err.fileno(), 2)
    try:
      runpy.run_module(module, run_name="__main__", alter_sys=True)
      code = 0
    except SystemExit as e:
      code = e.code
    except BaseException:
      traceback.print_exc()
      code = "uncaught"
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
    err.seek(0)
    results.append({"code": code, "stderr": err.read()})
print(json.dumps(results))
"""


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8", PYTHONPATH=ROOT,
             APT2_COMPILATION_CACHE="off")
  env.pop("XLA_FLAGS", None)
  return env


def run_cases(module, cases):
  """[(exit code, stderr)] of `python -m module *argv` for each argv (one subprocess); `module` may
  instead be None and each case a (module, argv) pair."""
  cases = [case if module is None else (module, case) for case in cases]
  out = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return [(r["code"], r["stderr"]) for r in json.loads(out.stdout.strip().splitlines()[-1])]


def error_line(code, stderr):
  """The one `error: ...` line of a failed run; asserts status 1 and no traceback."""
  assert code == 1, (code, stderr[-2000:])
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [l for l in stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, stderr[-2000:]
  return lines[0]


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("inputs")
  from PIL import Image
  import numpy as np
  png = d / "first.png"
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
  truncated = d / "truncated.png"
  Image.fromarray((np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)).save(truncated)
  truncated.write_bytes(truncated.read_bytes()[:200])
  (d / "notes.txt").write_text("not an image")
  (d / "binary.json").write_bytes(bytes(range(256)) * 4)
  (d / "controls.json").write_text(json.dumps({"steps": [{"keys": ["w"]}]}))
  (d / "empty").mkdir()
  # A bundle's metadata is all sample reads before validating the controls file.
  from apt2_jax.generation import bundle
  (d / "bundle").mkdir()
  (d / "bundle" / bundle.META).write_text(json.dumps({"format": bundle.FORMAT, "control_type": "camera"}))
  return d


def test_sample_bad_inputs(files):
  d = files
  ok = [f"--checkpoint={d}/bundle", f"--image={d}/first.png", f"--out={d}/out.mp4"]
  cases = {
      "image missing": ([f"--checkpoint={d}/bundle", f"--image={d}/missing.png"],
                        f"error: --image={d}/missing.png: no such file"),
      "image directory": ([f"--checkpoint={d}/bundle", f"--image={d}"], f"error: --image={d}: is a directory, not a file"),
      "image not an image": ([f"--checkpoint={d}/bundle", f"--image={d}/notes.txt"],
                             f"error: --image={d}/notes.txt: not an image (PNG or JPEG expected)"),
      "image truncated": ([f"--checkpoint={d}/bundle", f"--image={d}/truncated.png"],
                          f"error: --image={d}/truncated.png: cannot be read as an image ("),
      "controls missing": (ok + [f"--controls={d}/missing.json"], f"error: --controls={d}/missing.json: no such file"),
      "controls directory": (ok + [f"--controls={d}"], f"error: --controls={d}: is a directory, not a file"),
      "controls binary": (ok + [f"--controls={d}/binary.json"],
                          f"error: --controls={d}/binary.json: not a text (JSON) file"),
      "checkpoint missing": ([f"--checkpoint={d}/nowhere", f"--image={d}/first.png"],
                             f"error: --checkpoint={d}/nowhere: no such directory (a training workdir or an export bundle)"),
      "checkpoint empty": ([f"--checkpoint={d}/empty", f"--image={d}/first.png"],
                           f"error: --checkpoint={d}/empty: {d}/empty holds neither an export bundle (bundle.json) "
                           "nor a training checkpoint (checkpoints/<step>/state)"),
      "checkpoint flag empty": ([f"--image={d}/first.png"], "error: --checkpoint is required"),
      "height": (ok + ["--height=30"], "error: --height=30 must be a positive multiple of 16 (the VAE's 8x stride "
                                       "times the 2x patch), or 0 for the checkpoint's"),
      "out suffix": ([f"--checkpoint={d}/bundle", f"--image={d}/first.png", "--out=x.xyz"],
                     "error: --out=x.xyz: the video is written as MP4, name it *.mp4 (the GIF goes beside it)"),
  }
  if os.geteuid() != 0:  # root reads any file
    unreadable = d / "unreadable.png"
    unreadable.write_bytes((d / "first.png").read_bytes())
    unreadable.chmod(0)
    cases["image unreadable"] = ([f"--checkpoint={d}/bundle", f"--image={unreadable}"],
                                 f"error: --image={unreadable}: cannot be read (permission denied)")
  results = run_cases("apt2_jax.inference.sample", [argv for argv, _ in cases.values()])
  for (name, (_, want)), (code, stderr) in zip(cases.items(), results):
    assert error_line(code, stderr).startswith(want), (name, stderr[-2000:])


def test_main_bad_configs(tmp_path):
  work = f"--workdir={tmp_path}/run"
  tiny = "--config=experiments/stage1_adapt.py:tiny"
  cases = {
      "config file missing": (["--config=experiments/nonexistent.py:tiny", work],
                              "error: --config=experiments/nonexistent.py:tiny: no such config file "
                              "'experiments/nonexistent.py'"),
      "config is a directory": (["--config=experiments", work],
                                "error: --config=experiments: 'experiments' is a directory, not a config file"),
      "get_config fails": (["--config=experiments/stage1_adapt.py:huge", work],
                           "error: --config=experiments/stage1_adapt.py:huge: unknown size 'huge'"),
      "unknown key": ([tiny, work, "--config.nonexistent=1"],
                      "error: --config.nonexistent: the config has no field 'nonexistent'"),
      "unknown nested key": ([tiny, work, "--config.data.nonexistent=1"],
                             "error: --config.data.nonexistent: the config has no field 'nonexistent'"),
      "wrong type": ([tiny, work, "--config.batch_size=abc"],
                     "error: --config.batch_size=abc: invalid literal for int() with base 10: 'abc'"),
      "unknown stage": ([tiny, work, "--config.stage=adapted"], "error: config.stage='adapted' is not one of"),
      "mesh does not divide the devices": ([tiny, work, "--config.mesh.data=16"],
                                           "error: config.mesh {'data': 16, 'fsdp': 1, 'tensor': 1, 'sequence': 1} "
                                           "needs 16 devices, but 8 are available"),
      "batch not divisible": ([tiny, work, "--config.batch_size=12", "--config.mesh.data=8"],
                              "error: config.batch_size=12 must be divisible by the data axes (mesh data x fsdp = 8) "
                              "times config.microbatches=1"),
      "bad init_from": ([tiny, work, f"--config.init_from={tmp_path}/nowhere"],
                        f"error: config.init_from='{tmp_path}/nowhere' holds no checkpoint"),
      "bad logical rules": ([tiny, work, "--config.logical_rules=(('embeds','fsdp'),)"],
                            "error: config.logical_rules: unknown logical axis name(s) ['embeds']"),
      "stage rejects a field": ([tiny, work, "--config.model.control_channels=7", "--config.data.source=random_latents"],
                                "error: config.model.control_channels=7 must be 0 or 4 x config.data.control_dim"),
      "workdir missing": ([tiny], "error: flag --workdir=None: Flag --workdir must have a value other than None."),
  }
  results = run_cases("apt2_jax.main", [argv for argv, _ in cases.values()])
  for (name, (_, want)), (code, stderr) in zip(cases.items(), results):
    assert error_line(code, stderr).startswith(want), (name, stderr[-2000:])
  assert not os.path.exists(f"{tmp_path}/run/checkpoints")


def test_export_and_serve_bad_checkpoints(files):
  d = files
  *export, serve = run_cases(None, [
      ("apt2_jax.export", [f"--checkpoint={d}/nowhere", f"--out={d}/b1"]),
      ("apt2_jax.export", [f"--checkpoint={d}/empty", f"--out={d}/b2"]),
      ("apt2_jax.export", [f"--checkpoint={d}/empty", f"--out={d}/b3", "--height=30"]),
      ("apt2_jax.inference.serve", [f"--checkpoint={d}/empty"])])
  assert error_line(*export[0]) == (f"error: --checkpoint={d}/nowhere: no such directory (a training workdir or an "
                                    "export bundle)")
  assert error_line(*export[1]).startswith(f"error: --checkpoint={d}/empty: {d}/empty holds neither")
  assert error_line(*export[2]).startswith("error: --height=30 must be a positive multiple of 16")
  assert error_line(*serve).startswith(f"error: --checkpoint={d}/empty: {d}/empty holds neither")


def test_one_line_end_to_end(files):
  """A real process: status 1, one line on stderr, no traceback."""
  out = subprocess.run([sys.executable, "-m", "apt2_jax.inference.sample", f"--checkpoint={files}/bundle",
                        f"--image={files}/missing.png"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=120)
  assert error_line(out.returncode, out.stderr) == f"error: --image={files}/missing.png: no such file"
