"""A damaged newest checkpoint: resume, `sample` and `export` use the previous intact step.

One tiny stage-1 run (1 device) saves steps 1, 2 and 4. Each kind of file in step 4 is garbled in a
copy: the array data (16 bytes in every 512 of each OCDBT data file: TensorStore often reads
such bytes without complaint, the fingerprints saved with the step catch them), the state's metadata JSON,
the data iterator's state and the config. Then:
  resume   reports step 4 with its path and reason, resumes from step 2 with a warning naming
           both, moves step 4 to damaged_checkpoints/ (intact, not deleted) and reproduces the
           uninterrupted run's step-4 parameters exactly;
  sample / export (the real CLIs) use step 2 and say so; the data iterator's state is not read
           by them, so with only that file garbled they use step 4. Nothing on disk changes.
With every step damaged: one error listing each step and its reason.
"""
import glob
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from apt2_jax import checkpointing, train
from apt2_jax.generation import bundle as bundle_lib
from tests.test_cli_errors import error_line, run_cases
from tests.test_train import tiny_config

KINDS = ("array", "metadata", "data", "config")


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """The resumed runs load the train step compiled by the first run."""
  from jax._src import compilation_cache as cc
  old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  cc.reset_cache()
  yield
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
  cc.reset_cache()


def run_config():
  return tiny_config(num_steps=6, checkpoint_every=2, num_devices=1,
                     **{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, "mesh.sequence": 1})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A run "killed" during step 5: checkpoints 1 (orbax saves the first), 2 and 4, each with state,
  data, config and fingerprints."""
  workdir = str(tmp_path_factory.mktemp("runs") / "base")
  train.train_and_evaluate(run_config(), workdir, stop_after_step=5)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2", "4"]
  return workdir


def garble(step_dir: str, kind: str) -> list[str]:
  """Damages the files of one kind in `step_dir`; returns their paths."""
  if kind == "array":  # every array data file: 16 bytes in every 512 overwritten
    paths = sorted(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")))
  else:  # JSON cut in half
    paths = [{"metadata": os.path.join(step_dir, "state", "_METADATA"),
              "data": os.path.join(step_dir, "data", "process_0-of-1.json"),
              "config": os.path.join(step_dir, "config", "metadata")}[kind]]
  for path in paths:
    data = bytearray(open(path, "rb").read())
    if kind == "array":
      for start in range(len(data) // 8, len(data), 512):
        data[start:start + 16] = b"\xff" * 16
    else:
      data = data[:len(data) // 2]
    with open(path, "wb") as f:
      f.write(bytes(data))
  return paths


def damaged_copy(base, tmp_path, kind, steps=(4,), name=None):
  work = str(tmp_path / (name or f"damaged_{kind}"))
  shutil.copytree(base, work)
  files = [p for s in steps for p in garble(os.path.join(work, "checkpoints", str(s)), kind)]
  return work, files


def listing(directory):
  return sorted((os.path.relpath(p, directory), open(p, "rb").read())
                for p in glob.glob(os.path.join(directory, "**"), recursive=True) if os.path.isfile(p))


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_resume_falls_back_to_the_previous_step(base, tmp_path, caplog, kind):
  work, bad_files = damaged_copy(base, tmp_path, kind)
  bad_bytes = [open(f, "rb").read() for f in bad_files]
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(run_config(), work, stop_after_step=5)
  step4 = os.path.join(work, "checkpoints", "4")
  text = caplog.text
  assert f"checkpoint {step4} could not be restored: " in text, text
  assert "using step 2 instead of step 4, which could not be restored (" in text, text
  moved = os.path.join(work, "damaged_checkpoints", "4")
  assert f"resuming from step 2; the damaged step(s) 4 were moved (not deleted) to {moved}" in text, text
  # The damaged step is kept as it was; the resumed run saved step 4 again, equal to the original.
  assert [open(f.replace(step4, moved), "rb").read() for f in bad_files] == bad_bytes
  a, _ = checkpointing.load_params(base, key="params", step=4)
  b, _ = checkpointing.load_params(work, key="params", step=4)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_resume_and_load_with_every_step_damaged(base, tmp_path):
  work, _ = damaged_copy(base, tmp_path, "array", steps=(1, 2, 4))
  before = listing(work)
  with pytest.raises(checkpointing.CheckpointError) as e:
    train.train_and_evaluate(run_config(), work)
  message = str(e.value)
  assert message.startswith(f"no intact checkpoint under {work}/checkpoints: step 4 ("), message
  assert "; step 2 (" in message and "; step 1 (" in message and "\n" not in message
  with pytest.raises(checkpointing.CheckpointError, match="no intact checkpoint under"):
    checkpointing.load_params(work)
  with pytest.raises(checkpointing.CheckpointError, match=r"checkpoint .*/checkpoints/4 could not be restored"):
    checkpointing.load_params(work, step=4)  # a step asked for: no fallback
  assert listing(work) == before  # nothing moved or deleted


def test_sample_and_export_fall_back(base, tmp_path):
  from PIL import Image
  works = {kind: damaged_copy(base, tmp_path, kind)[0] for kind in KINDS}
  works["all"] = damaged_copy(base, tmp_path, "array", steps=(1, 2, 4), name="all")[0]
  before = {k: listing(w) for k, w in works.items()}
  image = str(tmp_path / "first.png")
  Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(image)
  runs = run_cases(None, [
      ("apt2_jax.inference.sample", [f"--checkpoint={w}", f"--image={image}", "--num_frames=5",
                                     f"--out={tmp_path}/{k}.mp4"]) for k, w in works.items()] + [
      ("apt2_jax.export", [f"--checkpoint={w}", f"--out={tmp_path}/bundle_{k}", "--noserialize"])
      for k, w in works.items()])
  sampled, exported = runs[:len(works)], runs[len(works):]
  expect = {s: checkpointing.load_params(base, key="params", step=s)[0] for s in (2, 4)}
  for kind in KINDS:
    work = works[kind]
    for (code, stderr) in (sampled[KINDS.index(kind)], exported[KINDS.index(kind)]):
      assert code in (0, None), stderr[-3000:]
      if kind == "data":  # inference does not read the iterator's state: step 4 is intact for it
        assert "could not be restored" not in stderr, stderr[-3000:]
      else:
        assert f"checkpoint {work}/checkpoints/4 could not be restored: " in stderr, stderr[-3000:]
        assert f"{work}/checkpoints: using step 2 instead of step 4, which could not be restored (" in stderr
    assert os.path.getsize(f"{tmp_path}/{kind}.mp4") > 0
    meta = bundle_lib.read_meta(f"{tmp_path}/bundle_{kind}")
    params, _ = bundle_lib.read_arrays(f"{tmp_path}/bundle_{kind}", meta)
    jax.tree.map(np.testing.assert_array_equal, params, expect[4 if kind == "data" else 2])
  for (code, stderr) in (sampled[-1], exported[-1]):
    line = error_line(code, stderr)
    assert line.startswith(f"error: no intact checkpoint under {works['all']}/checkpoints: step 4 ("), line
    assert "; step 2 (" in line
  assert {k: listing(w) for k, w in works.items()} == before  # loading changes nothing on disk
  assert json.loads(open(os.path.join(works["config"], "config.json")).read())["stage"] == "adapt"


def test_fingerprints_agree_on_host_and_device(devices):
  """Saves fingerprint device arrays (sharded, in one program), host loads check numpy copies."""
  import jax.numpy as jnp
  mesh = jax.make_mesh((8,), ("data",), devices=devices)
  x = jnp.arange(64 * 3, dtype=jnp.float32).reshape(64, 3) / 7
  tree = {"f32": jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))),
          "bf16": x.astype(jnp.bfloat16), "i32": jnp.arange(5, dtype=jnp.int32) - 2,
          "u8": jnp.arange(7, dtype=jnp.uint8), "bool": jnp.array([True, False, True]),
          "scalar": jnp.float32(3.5), "host": np.linspace(0, 1, 9, dtype=np.float32)}
  device = checkpointing.fingerprints(tree)
  host = checkpointing.fingerprints(jax.device_get(tree))
  assert device == host and len(set(device.values())) == len(device)
  swapped = dict(tree, f32=tree["f32"][::-1])  # the same values in another order differ
  assert checkpointing.fingerprints(swapped)["f32"] != device["f32"]


def test_asyncio_reports_of_abandoned_restore_reads_are_dropped():
  """After a failed restore, orbax's abandoned reads may fail again inside asyncio tasks nobody
  awaits; asyncio then logs "Task exception was never retrieved" with a full traceback. The filter
  drops those (the step's damage is already reported in one line) and keeps every other record."""
  checkpointing._quiet_restore_leftovers()  # pylint: disable=protected-access
  checkpointing._quiet_restore_leftovers()  # pylint: disable=protected-access
  log = logging.getLogger("asyncio")
  filters = [f for f in log.filters if getattr(f, "_apt2_quiet", False)]
  assert len(filters) == 1

  def record(msg, exc=None):
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None,
                             (type(exc), exc, None) if exc else None)

  damage = ValueError('FAILED_PRECONDITION: Error reading "params.x/0.0" in OCDBT database at local file')
  assert not filters[0].filter(record("Task exception was never retrieved\nfuture: <Task finished>", damage))
  assert filters[0].filter(record("Task exception was never retrieved\nfuture: <Task>", KeyError("mine")))
  assert filters[0].filter(record("Executing <Task> took 0.2 seconds"))
