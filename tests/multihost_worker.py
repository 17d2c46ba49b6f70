"""One process of the CPU multi-host rehearsal in tests/test_multihost.py (not a test itself).

  python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR

8 virtual CPU devices in all, split evenly over the processes. With NUM_PROCESSES > 1 the process
joins the others on 127.0.0.1:PORT (gloo collectives), trains tiny stage 1 over all devices with
this host's slice of every batch, is "killed" after step 3 (checkpoint at step 2), restarts and
finishes step 4. With 1 it is the single-process reference, run straight through. Losses go to
WORKDIR/metrics.jsonl.

JAX is configured in main() only, before its backend starts: importing this module touches no
backend.
"""
import os
import sys

TOTAL_DEVICES = 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config():
  from tests.test_train import tiny_config
  return tiny_config(num_steps=4, checkpoint_every=2, **{"mesh.data": 4, "mesh.fsdp": 2})


def main():
  process_id, num_processes, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, ROOT)
  import jax
  jax.config.update("jax_num_cpu_devices", TOTAL_DEVICES // num_processes)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_threefry_partitionable", True)
  from apt2_jax import runtime, train
  runtime.enable_compilation_cache(runtime.cache_dir_setting())
  c = config()
  if num_processes == 1:
    assert jax.device_count() == TOTAL_DEVICES, jax.devices()
    train.train_and_evaluate(c, workdir)
    return
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
  assert jax.process_count() == num_processes and jax.device_count() == TOTAL_DEVICES, jax.devices()
  train.train_and_evaluate(c, workdir, stop_after_step=3)
  train.train_and_evaluate(c, workdir)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
