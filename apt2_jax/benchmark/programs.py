"""Looking inside the benchmark's programs: profiles of steady-state calls and cost analyses.

  Inspect(profile_dir, profile_steps, dump_dir)   what `--profile_dir/--profile_steps/--dump_dir`
                                                  ask of one benchmark run
  Inspect.profile(name, fn, carry)                a `jax.profiler` trace of `profile_steps` calls
                                                  of `carry = fn(carry)` (compiled and warm) into
                                                  `profile_dir/name` (TensorBoard's profile plugin:
                                                  `tensorboard --logdir profile_dir`; or
                                                  `perfetto_trace.json.gz` in the Perfetto UI)
  Inspect.dump(name, compiled)                    `dump_dir/name.cost.json` (XLA's cost analysis:
                                                  flops, bytes accessed, ...; memory analysis) and
                                                  `dump_dir/name.hlo.txt` (the optimised HLO)
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

from absl import logging

from .timing import block


def cost_analysis(compiled) -> dict:
  """XLA's cost analysis of a compiled executable (flops, bytes accessed, ...) as plain floats."""
  try:
    cost = compiled.cost_analysis()
  except Exception as e:  # some backends do not implement it
    return {"error": str(e)}
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  return {str(k): float(v) for k, v in (cost or {}).items()}


def memory_analysis(compiled) -> dict:
  try:
    m = compiled.memory_analysis()
  except Exception:
    return {}
  if m is None:
    return {}
  names = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
           "generated_code_size_in_bytes")
  return {n: int(getattr(m, n)) for n in names if hasattr(m, n)}


@dataclasses.dataclass
class Inspect:
  profile_dir: str | None = None
  profile_steps: int = 5
  dump_dir: str | None = None

  @property
  def profiling(self) -> bool:
    return bool(self.profile_dir) and self.profile_steps > 0

  def profile(self, name: str, fn: Callable[[Any], Any], carry, warmup: int = 1):
    """Traces `profile_steps` calls of `carry = fn(carry)` after `warmup` untimed ones; returns carry."""
    if not self.profiling:
      return carry
    import jax
    for _ in range(warmup):
      carry = block(fn(carry))
    log_dir = os.path.join(self.profile_dir, name)
    os.makedirs(log_dir, exist_ok=True)
    jax.profiler.start_trace(log_dir, create_perfetto_trace=True)
    try:
      for i in range(self.profile_steps):
        with jax.profiler.StepTraceAnnotation(name, step_num=i):
          carry = block(fn(carry))
    finally:
      jax.profiler.stop_trace()
    logging.info("profiled %d calls of %s into %s", self.profile_steps, name, log_dir)
    return carry

  def dump(self, name: str, compiled) -> dict | None:
    """Writes the cost analysis (and optimised HLO) of `compiled`; returns the cost analysis."""
    if not self.dump_dir:
      return None
    os.makedirs(self.dump_dir, exist_ok=True)
    row = {"name": name, "cost_analysis": cost_analysis(compiled), "memory_analysis": memory_analysis(compiled)}
    with open(os.path.join(self.dump_dir, f"{name}.cost.json"), "w") as f:
      json.dump(row, f, indent=2, sort_keys=True)
    try:
      text = compiled.as_text()
    except Exception:  # pragma: no cover
      text = None
    if text:
      with open(os.path.join(self.dump_dir, f"{name}.hlo.txt"), "w") as f:
        f.write(text)
    logging.info("wrote the cost analysis of %s to %s", name, self.dump_dir)
    return row["cost_analysis"]

  def log_where(self) -> None:
    if self.profiling:
      logging.info("profiles: view with `tensorboard --logdir %s` (Profile tab; pip install -e "
                   "'.[tensorboard]'), or open %s/<program>/plugins/profile/*/perfetto_trace.json.gz "
                   "in the Perfetto UI", self.profile_dir, self.profile_dir)
    if self.dump_dir:
      logging.info("cost analyses: %s/*.cost.json (and *.hlo.txt)", self.dump_dir)
