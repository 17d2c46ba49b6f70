r"""The benchmark's command line.

    python -m apt2_jax.benchmark --config=experiments/benchmark.py:small --json_out=FILE
    python -m apt2_jax.benchmark --json_out=FILE         # apt2_jax.configs.benchmark, small
    python -m apt2_jax.benchmark --aot --json_out=FILE   # compile-only analysis of apt2_8b
    python -m apt2_jax.benchmark --aot_cases=targets --json_out=FILE   # named AOT cases or groups
    python -m apt2_jax.benchmark --config=experiments/benchmark.py:tiny \
        --profile_dir=/tmp/bench_profile --dump_dir=/tmp/bench_cost   # profiles, cost analyses

Writes one JSON object to `--json_out` and a readable table to stdout. `--profile_dir` traces
`--profile_steps` steady-state calls of each program (the cached stream step, the VAE decode, the
stage-1 and stage-3 train steps) with `jax.profiler`, one subdirectory per program: open them with
`tensorboard --logdir DIR` (Profile tab; `pip install -e '.[tensorboard]'`) or load a
`perfetto_trace.json.gz` into the Perfetto UI. `--dump_dir` writes each compiled program's XLA cost
analysis (`*.cost.json`) and optimised HLO (`*.hlo.txt`). JAX is imported only in `main`, after
`--cpu_devices` has configured the backend.
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from apt2_jax import runtime

flags.DEFINE_string("json_out", None, "Where to write the JSON result.")
flags.DEFINE_bool("aot", False, "Compile-only analysis of apt2_8b (streaming and training) on "
                  "virtual CPU devices instead of running the benchmark.")
flags.DEFINE_string("aot_cases", "", "Comma-separated AOT cases or groups (benchmark.aot.AOT_CASES, "
                    "AOT_GROUPS) to compile; --aot alone: the apt2_8b group.")
flags.DEFINE_string("aot_size", "", "Model size for every AOT case instead of its own.")
flags.DEFINE_float("aot_mfu", 0.4, "MFU assumed for the projected H100 latency of AOT cases.")
flags.DEFINE_integer("cpu_devices", 0, "Virtual CPU devices (set before the backend starts; 0: "
                     "leave JAX's default).")
flags.DEFINE_string("profile_dir", None, "Write jax.profiler traces of --profile_steps steady-state calls "
                    "of each program here (TensorBoard's Profile tab, or Perfetto).")
flags.DEFINE_integer("profile_steps", 5, "Calls traced per program with --profile_dir.")
flags.DEFINE_string("dump_dir", None, "Write each compiled program's XLA cost analysis (*.cost.json) and "
                    "optimised HLO (*.hlo.txt) here.")
runtime.define_flags()
_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/benchmark.py:<size> "
                                          "(default: apt2_jax.configs.benchmark, small)",
                                          lock_config=True)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if FLAGS.profile_steps < 1:
    raise app.UsageError(f"--profile_steps={FLAGS.profile_steps} must be >= 1")
  for name in ("json_out", "profile_dir", "dump_dir"):
    try:
      runtime.check_local_path(getattr(FLAGS, name), f"--{name}")
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  from apt2_jax.benchmark.timing import drop_cheap_compile_flags
  drop_cheap_compile_flags()
  if FLAGS.aot or FLAGS.aot_cases:
    from apt2_jax.benchmark.aot import add_aot_xla_flags
    add_aot_xla_flags()  # before the backend starts: see aot.AOT_XLA_FLAGS
  runtime.setup()
  if FLAGS.cpu_devices:
    import jax
    jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
  from apt2_jax.benchmark import aot, programs, report, suite
  if FLAGS.aot or FLAGS.aot_cases:
    names = [n for n in FLAGS.aot_cases.split(",") if n] or [aot.DEFAULT_GROUP]
    try:
      names = aot.case_names(names)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    rows = aot.measure(names, json_out=FLAGS.json_out, mfu=FLAGS.aot_mfu, size=FLAGS.aot_size or None)
    print(report.aot_table(rows))
    return
  config = _CONFIG.value
  if config is None:  # no --config: the package's default, from any directory
    from apt2_jax.configs import benchmark as bench_cfg
    config = bench_cfg.get_config("small")
  inspect = programs.Inspect(FLAGS.profile_dir, FLAGS.profile_steps, FLAGS.dump_dir)
  result = suite.run(config, inspect)
  print(report.table(result))
  report.write_json(result, FLAGS.json_out)


def run_main():
  app.run(main)
