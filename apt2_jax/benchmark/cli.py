r"""The benchmark's command line.

    python -m apt2_jax.benchmark --config=experiments/benchmark.py:small --json_out=FILE
    python -m apt2_jax.benchmark --json_out=FILE         # apt2_jax.configs.benchmark, small
    python -m apt2_jax.benchmark --aot --json_out=FILE   # compile-only analysis of apt2_8b

Writes one JSON object to `--json_out` and a readable table to stdout. JAX is imported only in
`main`, after `--cpu_devices` has configured the backend.
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

flags.DEFINE_string("json_out", None, "Where to write the JSON result.")
flags.DEFINE_bool("aot", False, "Compile-only analysis of apt2_8b (streaming and training) on "
                  "virtual CPU devices instead of running the benchmark.")
flags.DEFINE_string("aot_cases", "", "Comma-separated AOT cases to run in this process (internal; "
                    "default: all, each device count in its own subprocess).")
flags.DEFINE_float("aot_mfu", 0.4, "MFU assumed for the projected H100 latency of AOT cases.")
flags.DEFINE_integer("cpu_devices", 0, "Virtual CPU devices (set before the backend starts; 0: "
                     "leave JAX's default).")
_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/benchmark.py:<size> "
                                          "(default: apt2_jax.configs.benchmark, small)",
                                          lock_config=True)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if FLAGS.cpu_devices:
    import jax
    jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
  from apt2_jax.benchmark import aot, report, suite
  if FLAGS.aot or FLAGS.aot_cases:
    names = [n for n in FLAGS.aot_cases.split(",") if n] or None
    unknown = sorted(set(names or ()) - set(aot.AOT_CASES))
    if unknown:
      raise app.UsageError(f"unknown --aot_cases {unknown}; known: {sorted(aot.AOT_CASES)}")
    result = aot.aot_result(names, FLAGS.aot_mfu, subprocesses=not FLAGS.aot_cases)
    if not FLAGS.aot_cases:
      print(report.aot_table(result["aot"]))
    report.write_json(result, FLAGS.json_out)
    return
  config = _CONFIG.value
  if config is None:  # no --config: the package's default, from any directory
    from apt2_jax.configs import benchmark as bench_cfg
    config = bench_cfg.get_config("small")
  result = suite.run(config)
  print(report.table(result))
  report.write_json(result, FLAGS.json_out)


def run_main():
  app.run(main)
