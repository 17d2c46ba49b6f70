"""XLA flags that make CPU compiles cheap, filtered to those the installed jaxlib knows.

On a CPU, the toy pipeline and the tests are dominated by XLA compile time, not by running the
programs. Three flags cut it (measured on the tiny stage-3 train step, 1 CPU device: 22.8 s with the
defaults, 14.7 s with the first two, 8.1 s with all three; the test suite passes with them):

  --xla_backend_optimization_level=0        no LLVM optimisation pipeline
  --xla_llvm_disable_expensive_passes=true  and none of its expensive passes
  --xla_cpu_use_fusion_emitters=false       the older elemental emitters: about half the time to
                                            emit the ~1,400 fused kernels of a training step

XLA aborts the process on a flag it does not know, and flags come and go between jaxlib releases,
so each flag is probed once in a subprocess before it is used. `make demo` and `tests/conftest.py`
use this; print the flags with

    python -m apt2_jax.xla_flags

This module must not import jax: XLA_FLAGS is read when the backend starts.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys

CHEAP_CPU_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
                     "--xla_cpu_use_fusion_emitters=false")


def _accepted(flags: tuple[str, ...]) -> bool:
  env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
  try:
    proc = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True,
                          timeout=120)
  except (OSError, subprocess.TimeoutExpired):
    return False
  return proc.returncode == 0


@functools.lru_cache(maxsize=None)
def supported(flags: tuple[str, ...] = CHEAP_CPU_COMPILE) -> tuple[str, ...]:
  """The subset of `flags` this jaxlib accepts (one probe when all are known, else one per flag)."""
  if _accepted(flags):
    return tuple(flags)
  return tuple(f for f in flags if _accepted((f,)))


def cheap_cpu_compile_flags() -> str:
  """The XLA_FLAGS value for cheap CPU compiles."""
  return " ".join(supported(CHEAP_CPU_COMPILE))


def with_cheap_cpu_compile(existing: str | None) -> str:
  """`existing` XLA_FLAGS when set (the user's choice wins), else the cheap-compile flags."""
  return existing if existing else cheap_cpu_compile_flags()


if __name__ == "__main__":
  print(cheap_cpu_compile_flags())
