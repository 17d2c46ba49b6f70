"""Runs one training stage: parses flags, joins the hosts, dispatches on `config.stage`.

  python -m apt2_jax.main --config=experiments/stage1_adapt.py:small --workdir=/tmp/s1 \\
      [--config.batch_size=16 ...]

Rerunning with the same workdir resumes from its latest checkpoint (a finished run says so and
does nothing). `--profile_steps=N` traces N steady-state steps with `jax.profiler` into
`--profile_dir` (default WORKDIR/profile; `tensorboard --logdir DIR`, Profile tab).
`--compilation_cache=DIR|off` moves or disables the persistent compilation cache
(`apt2_jax/runtime.py`). On several hosts, every host
runs the same command; `jax.distributed.initialize()` picks up the cluster (SLURM, TPU pods, or
the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables that
`launch/multihost_local.sh` sets). CPU processes exchange collectives through gloo.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiments/<stage>.py:<size>", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard files of this run.")
flags.DEFINE_integer("profile_steps", 0, "Trace this many steady-state train steps with jax.profiler.")
flags.DEFINE_string("profile_dir", None, "Where the trace goes (default: WORKDIR/profile).")
flags.mark_flags_as_required(["config", "workdir"])

from apt2_jax import runtime  # noqa: E402  compilation cache, console
from apt2_jax.train import registry  # noqa: E402  the one stage registry

runtime.define_flags()


def initialize_distributed():
  """Joins the other processes when this is a multi-process run (no-op on one host)."""
  import jax
  multi = int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1 or "SLURM_NTASKS" in os.environ and \
      int(os.environ["SLURM_NTASKS"]) > 1
  if not multi:
    return
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                               int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"]))
  else:
    jax.distributed.initialize()


def main(argv):
  del argv
  config, workdir = FLAGS.config, FLAGS.workdir
  try:  # before any device work: a misspelt stage fails at once
    registry.check(config.get("stage", None))
    runtime.check_local_path(workdir, "--workdir")
    runtime.check_local_path(FLAGS.profile_dir, "--profile_dir")
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  runtime.setup()
  if FLAGS.profile_steps:
    with config.unlocked():  # read by the loop (train/loop.py); not part of the stage configs
      config.profile_steps = int(FLAGS.profile_steps)
      config.profile_dir = FLAGS.profile_dir or os.path.join(os.path.abspath(workdir), "profile")
  import jax
  if os.environ.get("APT2_NUM_CPU_DEVICES"):  # rehearse multi-device runs on a CPU
    jax.config.update("jax_num_cpu_devices", int(os.environ["APT2_NUM_CPU_DEVICES"]))
  initialize_distributed()
  logging.info("process %d/%d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  registry.run(config, workdir)


if __name__ == "__main__":
  from apt2_jax import cli
  cli.run(main, config_flags=("config",))  # bad flags, configs and checkpoints: one line, exit 1
