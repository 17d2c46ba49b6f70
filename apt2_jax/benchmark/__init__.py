"""Streaming and training benchmark, and compile-only (AOT) analysis of paper-scale configs.

    python -m apt2_jax.benchmark --config=experiments/benchmark.py:small --json_out=FILE
    python -m apt2_jax.benchmark --aot --json_out=FILE

  timing     time_ms, time_carry_ms, memory_bytes; PEAK_FLOPS, spec_peak_flops, measured peaks
  setup      Setup: the model, mesh and shardings of a benchmark config
  streaming  the streaming figures, on `apt2_jax.generation.stream`'s own functions (step,
             text, start, decode); only the recompute-the-window pass and the peer's k-step
             sampler are the benchmark's own comparisons
  training   the training figures: the stages' own guarded train steps (stage 1 through
             `stages.diffusion.make_stage`, stage 3 through `stages.adversarial.make_stage`)
  aot        AOT_CASES, AOT_GROUPS, aot_case, measure: compile-only cases on virtual CPU devices
  suite      run(config): every figure of one config as a dict
  report     table, aot_table, memory_table, write_json
  programs   Inspect: jax.profiler traces of steady-state calls, XLA cost analyses (--profile_dir,
             --dump_dir)
  cli        the absl flags and `main` (`python -m apt2_jax.benchmark`)

Names are loaded on first use, so that importing this package neither starts a JAX backend nor
defines the command line's flags.
"""
import importlib

_EXPORTS = {
    "run": "suite",
    "table": "report", "aot_table": "report", "memory_table": "report", "write_json": "report",
    "AOT_CASES": "aot", "AOT_GROUPS": "aot", "aot_case": "aot", "aot_config": "aot", "measure": "aot",
    "PEAK_FLOPS": "timing", "spec_peak_flops": "timing", "measure_matmul_peak": "timing",
    "peak_flops": "timing", "time_ms": "timing", "time_carry_ms": "timing", "memory_bytes": "timing",
    "Setup": "setup", "make_setup": "setup", "init_sharded_params": "setup",
    "streaming_figures": "streaming", "stream_fns": "streaming",
    "training_figures": "training", "stage_step": "training",
    "Inspect": "programs",
}
_MODULES = ("aot", "cli", "programs", "report", "setup", "streaming", "suite", "timing", "training")
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  if name in _MODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
