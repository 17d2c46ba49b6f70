"""Multi-host for real: 2 processes on this machine (jax.distributed on 127.0.0.1, gloo CPU
collectives, 4 virtual devices each) train tiny stage 1 over their 8 devices with per-host data
slices, save, get killed, restore and finish; the losses match the single-process 8-device run."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from apt2_jax import train

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path, devices):
  sys.path.insert(0, HERE)
  import multihost_worker
  multi = str(tmp_path / "multi")
  port = str(_free_port())
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i), "2", port, multi],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=1500)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  # Both hosts wrote their own data-iterator state into the shared checkpoint.
  data_dir = os.path.join(multi, "checkpoints", "4", "data")
  assert sorted(f for f in os.listdir(data_dir) if f.endswith(".json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]

  single = str(tmp_path / "single")
  train.train_and_evaluate(multihost_worker.config(), single)
  a, b = train.read_metrics(multi), train.read_metrics(single)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-5)
