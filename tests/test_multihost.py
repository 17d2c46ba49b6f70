"""Multi-host for real: 2 processes on this machine (jax.distributed on 127.0.0.1, gloo CPU
collectives, 4 virtual devices each) train tiny stage 1 over their 8 devices with per-host data
slices, save, get killed, restore and finish; the losses match a single 8-device process, step by
step. Every run is a fresh subprocess (tests/multihost_worker.py) that sets its own device count
before JAX starts, so the pytest process's 8 devices play no part."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from apt2_jax import train, xla_flags

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env():
  """This environment minus JAX's and XLA's settings, plus the suite's cheap-compile flags (the
  same in every run, so that their losses compare)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env["XLA_FLAGS"] = xla_flags.cheap_cpu_compile_flags()
  return env


def _run(runs, timeout=1500):
  """Runs the workers ([process_id, num_processes, port, workdir] each) at once; their outputs."""
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), *map(str, args)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for args in runs]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path):
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  port = _free_port()
  _run([[0, 2, port, multi], [1, 2, port, multi], [0, 1, 0, single]])
  # Both hosts wrote their own data-iterator state into the shared checkpoint.
  data_dir = os.path.join(multi, "checkpoints", "4", "data")
  assert sorted(f for f in os.listdir(data_dir) if f.endswith(".json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
  a, b = train.read_metrics(multi), train.read_metrics(single)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-5)
