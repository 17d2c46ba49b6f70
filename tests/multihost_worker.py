"""One process of the 2-process CPU rehearsal in tests/test_multihost.py (not a test itself).

  python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR

Joins the others on 127.0.0.1:PORT (gloo collectives, 4 virtual CPU devices per process), runs the
tiny stage-1 config over all devices with this host's slice of every batch, is "killed" after
step 3 (checkpoint at step 2), restarts and finishes step 4. Losses go to WORKDIR/metrics.jsonl.
"""
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_threefry_partitionable", True)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config():
  from tests.test_train import tiny_config
  return tiny_config(num_steps=4, checkpoint_every=2, **{"mesh.data": 4, "mesh.fsdp": 2})


def main():
  process_id, num_processes, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
  assert jax.process_count() == num_processes and jax.device_count() == 4 * num_processes
  from apt2_jax import train
  c = config()
  train.train_and_evaluate(c, workdir, stop_after_step=3)
  train.train_and_evaluate(c, workdir)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
