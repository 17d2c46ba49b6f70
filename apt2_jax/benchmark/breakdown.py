"""Where a cached step's time goes: attention, linear layers, the cache update, from a profile.

`step_breakdown` traces a few steady-state calls of the compiled step with `jax.profiler`, reads
the Perfetto trace, and attributes each traced XLA op (fusion, dot, copy, ...) to one category by
the op names of the HLO it runs (the compiled module's `metadata={op_name=...}`, of the op itself
and of the computation a fusion calls):

  cache_update  the `kv_cache_write` scope (`kv_cache.write_frame`: the new frame's slot)
  attention     the `cached_attention` scope (the step's self-attention: temporal RoPE of q and
                the cache, logits, softmax, values) and `cross_attention` (the text attention core)
  linear        every other op that contains a matrix product: the projections (q, k, v, out, text
                q, out), the FFN, the patch embedding, the head
  layer_slices  the layer scan's per-layer slices of the stacked parameters and cache
                (`dynamic_index_in_dim`: copies on XLA:CPU, whose matrix products take no offsets)
  other         norms, modulation, the spatial RoPE of q and k, GELU, the noise, the scan's loop

Figures are ms per step, summed over the ops' trace events (XLA:CPU may run independent ops
concurrently: the sum can exceed the wall time, `profiled_step_ms`). Trace events whose names are
not ops of the module (the runtime's own) count as `unattributed`.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax

from .timing import block

CATEGORIES = ("attention", "linear", "cache_update", "layer_slices", "other")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?\s*->.*\{\s*$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"\bcalls=%?([\w.\-]+)")
_CONTAINER = re.compile(r"\s(while|call|conditional)\(")
_DOT = re.compile(r"\b(dot|convolution)\(|__ynn_fusion|__onednn|custom_call_target=\"__cublas|cudnn")


def _parse_hlo(text: str):
  """{instruction: (op_names, called computations, has a matmul, operands)},
  {computation: [instructions]}."""
  instrs, comps, current = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m and "=" not in line.split("(")[0]:
      current = m.group(1)
      continue
    m = _INSTR.match(line)
    if not m or current is None:
      continue
    name, rest = m.groups()
    if _CONTAINER.search(rest):  # loops and calls: their ops are traced one by one
      continue
    args = rest[rest.find("(") + 1:rest.find(")")] if "(" in rest else ""
    instrs[name] = (_OP_NAME.findall(rest), _CALLS.findall(rest), bool(_DOT.search(rest)),
                    re.findall(r"%([\w.\-]+)", args))
    comps[current].append(name)
  return instrs, comps


def categorise(hlo_text: str) -> dict[str, str]:
  """Every instruction of an optimised HLO module -> one of `CATEGORIES`."""
  instrs, comps = _parse_hlo(hlo_text)

  def facts(name, depth=0):
    names, calls, dot, _ = instrs.get(name, ((), (), False, ()))
    names = list(names)
    for c in calls if depth < 3 else ():  # a fusion's (or a nested fusion's) computation
      for inner in comps.get(c, ()):
        n, d = facts(inner, depth + 1)
        names += n
        dot = dot or d
    return names, dot

  out, unnamed = {}, []
  for name in instrs:
    names, dot = facts(name)
    joined = " ".join(names)
    if "kv_cache_write" in joined:
      out[name] = "cache_update"
    elif "cached_attention" in joined or "cross_attention" in joined:
      out[name] = "attention"
    elif dot:
      out[name] = "linear"
      if not joined:
        unnamed.append(name)
    elif "dynamic_index_in_dim" in joined and all("dynamic_index_in_dim" in n for n in names):
      out[name] = "layer_slices"
    else:
      out[name] = "other"
  # XLA drops the op names of some products (the attention's batched einsums): a product without
  # one belongs to the attention when an operand does.
  for _ in range(2):
    for name in unnamed:
      if any(out.get(o) == "attention" for o in instrs[name][3]):
        out[name] = "attention"
  return out


def _trace_events(log_dir: str):
  files = glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "perfetto_trace.json.gz"))
  if not files:
    raise FileNotFoundError(f"no perfetto trace under {log_dir}")
  with gzip.open(sorted(files)[-1]) as f:
    trace = json.load(f)
  return trace["traceEvents"] if isinstance(trace, dict) else trace


def step_breakdown(fn, carry, compiled_text: str, steps: int = 3, log_dir: str | None = None):
  """Profiles `steps` calls of `carry = fn(carry)` (compiled, warm); returns (figures, carry).

  figures: `{category}_ms` per step for each of `CATEGORIES`, `unattributed_ms`,
  `profiled_step_ms` (wall time per traced call) and `breakdown_source`."""
  import time
  categories = categorise(compiled_text)
  tmp = None
  if log_dir is None:
    tmp = tempfile.TemporaryDirectory(prefix="apt2_breakdown_")
    log_dir = tmp.name
  carry = block(fn(carry))
  jax.profiler.start_trace(log_dir, create_perfetto_trace=True)
  t0 = time.perf_counter()
  try:
    for _ in range(steps):
      carry = block(fn(carry))
  finally:
    wall = (time.perf_counter() - t0) * 1e3 / steps
    jax.profiler.stop_trace()
  totals = collections.Counter()
  for e in _trace_events(log_dir):
    if e.get("ph") != "X":
      continue
    name = e.get("name", "")
    name = (e.get("args") or {}).get("hlo_op", name) if name not in categories else name
    if name in categories:
      totals[categories[name]] += float(e.get("dur", 0.0)) / 1e3
  if tmp is not None:
    tmp.cleanup()
  out = {f"{c}_ms": totals[c] / steps for c in CATEGORIES}
  out["profiled_step_ms"] = wall
  out["unattributed_ms"] = max(0.0, wall - sum(out[f"{c}_ms"] for c in CATEGORIES))
  out["breakdown_source"] = ("jax.profiler trace of the compiled step, ops attributed by HLO op_name "
                             "scopes (apt2_jax/benchmark/breakdown.py); summed op time per step")
  return out, carry
