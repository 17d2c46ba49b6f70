"""Timing, memory and peak FLOP/s: how every benchmark figure is measured.

  time_ms, time_carry_ms   median wall time of a call (carry: donated state such as a KV cache
                           or a train state, threaded through the calls)
  carry_times_ms           every timed call of a carried loop (for a median and a min)
  memory_bytes             peak bytes per device of a compiled executable (`memory_analysis()`)
  PEAK_FLOPS               dense spec-sheet peaks by device kind and dtype (`spec_peak_flops`)
  measure_matmul_peak      achieved FLOP/s of a square matmul (the peak on CPUs)
  peak_flops               the mesh's peak: the spec sheet on GPUs, a measured matmul elsewhere
"""
from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

# Dense peak FLOP/s per device by `device_kind` substring and compute dtype (vendor spec sheets;
# bfloat16 is the tensor-core figure without sparsity, float32 the non-tensor-core figure). The
# first matching key wins, so the PCIe and NVL boards come before their SXM namesakes: an H100 SXM
# reports e.g. "NVIDIA H100 80GB HBM3", a PCIe board "NVIDIA H100 PCIe" (756 TFLOP/s, not 989).
PEAK_FLOPS = {
    "H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 51e12},
    "H100 NVL": {"bfloat16": 835e12, "float16": 835e12, "float32": 60e12},
    "H200 NVL": {"bfloat16": 835e12, "float16": 835e12, "float32": 60e12},
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},       # SXM
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},       # SXM
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},     # SXM and PCIe alike
    "L40S": {"bfloat16": 362e12, "float16": 362e12, "float32": 91.6e12},
}
H100_BF16_PEAK = PEAK_FLOPS["H100"]["bfloat16"]  # SXM: the projections assume it
H100_MEMORY_BYTES = 80e9
PAPER_STEP_S = 0.16  # AAPT: one 8B step (4 video frames) at 736x416 on one H100
VIDEO_FRAMES_PER_LATENT = 4


def spec_peak_flops(device_kind: str, dtype: str) -> float | None:
  """The spec-sheet peak of one device, or None when the kind is not in `PEAK_FLOPS`."""
  kind = " ".join(device_kind.lower().split())
  for name, table in PEAK_FLOPS.items():
    if name.lower() in kind:
      return table.get(dtype)
  return None


def measure_matmul_peak(mesh, dtype: str, n: int = 2048, reps: int = 5) -> float:
  """Achieved FLOP/s of one `[n, n] @ [n, n]` matmul per device, all mesh devices at once."""
  devices = mesh.devices.size
  sh = NamedSharding(mesh, P(mesh.axis_names))
  a = jax.device_put(jnp.ones((devices, n, n), dtype) * 0.01, sh)
  f = jax.jit(lambda a: jnp.einsum("dij,djk->dik", a, a), in_shardings=sh, out_shardings=sh)
  ms = time_ms(f, (a,), reps=reps, warmup=1)
  return 2.0 * n ** 3 * devices / (ms / 1e3)


def peak_flops(mesh, dtype: str, n: int) -> tuple[float, str]:
  """(peak FLOP/s of all mesh devices, where it comes from)."""
  kind = mesh.devices.flat[0].device_kind
  platform = mesh.devices.flat[0].platform
  spec = spec_peak_flops(kind, dtype) if platform == "gpu" else None
  if spec is not None:
    return spec * mesh.devices.size, f"spec sheet ({kind}, {dtype})"
  measured = measure_matmul_peak(mesh, dtype, n)
  return measured, f"measured {n}x{n} {dtype} matmul per device on {mesh.devices.size} {platform} device(s)"


def block(x):
  """Waits for every array in `x`; returns `x`."""
  return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def time_ms(fn: Callable, args: tuple, *, reps: int, warmup: int = 1) -> float:
  """Median wall time of `fn(*args)` in ms, after `warmup` untimed calls (compilation included)."""
  for _ in range(max(warmup, 1)):
    block(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    block(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return median(times)


def time_carry_ms(fn: Callable, carry, *, reps: int, warmup: int = 1):
  """Median ms of `carry = fn(carry)` (for donated state: caches, train states). Returns (ms, carry)."""
  times, carry = carry_times_ms(fn, carry, reps=reps, warmup=max(warmup, 1))
  return median(times), carry


def carry_times_ms(fn: Callable, carry, *, reps: int, warmup: int = 0):
  """Each of `reps` timed `carry = fn(carry)` in ms, after `warmup` untimed ones: (times, carry)."""
  for _ in range(warmup):
    carry = block(fn(carry))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    carry = block(fn(carry))
    times.append((time.perf_counter() - t0) * 1e3)
  return times, carry


def median(times) -> float:
  """The upper median (the middle element of the sorted list)."""
  times = sorted(times)
  return float(times[len(times) // 2])


def memory_bytes(compiled) -> int | None:
  """Peak bytes per device of a compiled executable: arguments + outputs + temporaries - aliased."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # some backends do not implement it
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def drop_cheap_compile_flags():
  """Removes `apt2_jax.xla_flags`' cheap-compile flags from XLA_FLAGS (before the backend starts):
  the benchmark measures the optimised backend (backend optimisation level 0 made the cached step
  2.2x slower). Other flags are kept."""
  import os

  from absl import logging

  from apt2_jax import xla_flags
  given = os.environ.get("XLA_FLAGS", "").split()
  kept = [f for f in given if f.split("=")[0] not in {c.split("=")[0] for c in xla_flags.CHEAP_CPU_COMPILE}]
  if len(kept) != len(given):
    logging.warning("benchmark: dropping the cheap-compile XLA flags %s (it measures the optimised "
                    "backend)", sorted(set(given) - set(kept)))
    os.environ["XLA_FLAGS"] = " ".join(kept)
