"""Readable tables of the benchmark's figures, and the one JSON file it writes."""
from __future__ import annotations

import json
import os

from .timing import H100_BF16_PEAK, PAPER_STEP_S

_TABLE_ROWS = [
    ("device", "{device_kind} x{device_count} ({platform}), jax {jax_version}"),
    ("model", "{size}: {params:,} params, {dtype}, N={window}, batch {batch}, {resolution} px "
              "({latent} latent, {tokens_per_frame} tokens/frame)"),
    ("step latency", "{step_latency_ms:.2f} ms  (frame 50: {step_latency_ms_at_frame_50:.2f}, "
                     "frame 1000: {step_latency_ms_at_frame_1000:.2f}; growth {latency_growth:.3f})"),
    ("step breakdown", "attention {step_attention_ms:.1f}, linear {step_linear_ms:.1f}, cache update "
                       "{step_cache_update_ms:.2f}, layer slices {step_layer_slices_ms:.1f}, other "
                       "{step_other_ms:.1f} ms  (profiled step {step_profiled_step_ms:.1f} ms)"),
    ("decode latency", "{decode_latency_ms:.2f} ms  (VAE {vae_size})"),
    ("fps", "{fps:.2f} video frames/s per stream  (DiT only {fps_dit_only:.2f})"),
    ("first frame", "{first_frame_latency_ms:.1f} ms"),
    ("MFU", "{mfu:.3f}  ({step_tflops_per_s:.3f} TFLOP/s of {peak_flops:.3g} FLOP/s: {peak_source})"),
    ("cache speedup", "{cache_speedup:.2f}x  (recompute {cache_window_frames} frames: {recompute_latency_ms:.2f} ms)"),
    ("NFE speedup", "{nfe_speedup:.2f}x  (peer block, k={peer_steps}: {peer_block_latency_ms:.2f} ms)"),
    ("stage-1 step", "{stage1_step_ms:.1f} ms, {stage1_tokens_per_s_per_device:,.0f} tokens/s/device, "
                     "MFU {stage1_mfu:.3f}, peak {stage1_peak_bytes_per_device:,} B/device"),
    ("stage-3 step", "{stage3_step_ms:.1f} ms, {stage3_tokens_per_s_per_device:,.0f} tokens/s/device, "
                     "MFU {stage3_mfu:.3f}, peak {stage3_peak_bytes_per_device:,} B/device"),
]


def table(result: dict) -> str:
  """The figures of `run` as aligned rows (rows whose figures are missing are left out)."""
  lines = []
  for name, fmt in _TABLE_ROWS:
    try:
      lines.append(f"{name:15s} {fmt.format(**result)}")
    except (KeyError, TypeError, ValueError):
      continue
  return "\n".join(lines)


def aot_table(rows: list[dict]) -> str:
  """The AOT rows of `aot.measure` as a table, with the projection's assumptions."""
  head = (f"{'case':26s} {'dev':>3s} {'mesh (d,f,t,s)':>14s} {'tokens':>8s} {'TFLOP/step':>11s} "
          f"{'GB/dev':>7s} {'state GB':>8s} {'fits 80GB':>9s} {'H100 s @MFU':>11s} {'compile s':>9s}")
  lines = [head, "-" * len(head)]
  rows = [r for r in rows if not r.get("error")]
  for r in rows:
    m = r["mesh"]
    gb = "n/a" if r["bytes_per_device"] is None else f"{r['bytes_per_device'] / 1e9:.1f}"
    state = r.get("memory_analysis", {}).get("argument")
    state = "n/a" if state is None else f"{state / 1e9:.1f}"
    toks = r["tokens_per_frame"] * r["batch"] * r.get("frames", 1)
    mesh = f"{m['data']},{m['fsdp']},{m['tensor']},{m['sequence']}"
    lines.append(f"{r['case']:26s} {r['devices']:3d} {mesh:>14s} "
                 f"{toks:8d} {r['flops_per_step'] / 1e12:11.1f} {gb:>7s} {state:>8s} {str(r['fits_80gb']):>9s} "
                 f"{r['projected_h100_s']:11.3f} {r['compile_s']:9.1f}")
  mfu = rows[0]["assumed_mfu"] if rows else 0
  lines.append(f"H100 s @MFU: FLOPs / ({H100_BF16_PEAK / 1e12:.0f} TFLOP/s x devices x MFU {mfu}). GB/dev: "
               "memory_analysis() peak (arguments + outputs + temporaries - aliased); state GB: "
               "arguments alone (parameters, optimiser state, KV cache).")
  for r in rows:
    if r.get("paper_implied_mfu"):
      lines.append(f"{r['case']}: the paper's {PAPER_STEP_S} s/step implies MFU "
                   f"{r['paper_implied_mfu']:.3f}; projected at MFU {mfu}: {r['projected_h100_s']:.3f} s.")
  for attention in dict.fromkeys(r["attention"] for r in rows if r.get("attention")):
    cases = ", ".join(r["case"] for r in rows if r.get("attention") == attention)
    lines.append(f"attention of {cases}: {attention}")
  return "\n".join(lines)


def memory_table(rows: list[dict], header: bool = True) -> str:
  """Per-device memory of AOT rows: arguments (parameters, optimiser state, cache), outputs,
  temporaries and the peak (arguments + outputs + temporaries - aliased), in GB, with the sharding
  and attention each assumes; a row that failed to compile shows its error."""
  gb = lambda b: "n/a" if b is None else f"{b / 1e9:.1f}"
  head = (f"{'case':34s} {'size':9s} {'dev':>3s} {'mesh (d,f,t,s)':>14s} {'argument':>8s} {'output':>7s} "
          f"{'temp':>7s} {'peak':>7s} {'fits 80GB':>9s} {'compile s':>9s}  sharding")
  lines = [head, "-" * len(head)] if header else []
  for r in rows:
    m = r["mesh"]
    mesh = f"{m['data']},{m['fsdp']},{m['tensor']},{m['sequence']}"
    if r.get("error"):
      lines.append(f"{r['case']:34s} {r['size']:9s} {r['devices']:3d} {mesh:>14s} failed: {r['error'][:200]}")
      continue
    a = r.get("memory_analysis", {})
    lines.append(f"{r['case']:34s} {r['size']:9s} {r['devices']:3d} {mesh:>14s} {gb(a.get('argument')):>8s} "
                 f"{gb(a.get('output')):>7s} {gb(a.get('temp')):>7s} {gb(r['bytes_per_device']):>7s} "
                 f"{str(r['fits_80gb']):>9s} {r['compile_s']:9.1f}  {r.get('sharding', '-')}")
    lines.append(f"{'':34s} attention: {r['attention']}")
  return "\n".join(lines)


_KIND_WORDS = {"stream": "streaming step", "stage1": "stage 1", "stage3": "stage 3", "long_video": "long-video step"}


def aot_markdown(rows: list[dict]) -> str:
  """AOT rows as a markdown table: per-device GB (XLA:CPU `memory_analysis`), sharding, clip."""
  gb = lambda b: "n/a" if b is None else f"{b / 1e9:.1f}"
  lines = ["| case | size | step | devices (d,f,t,s) | sharding | frames | argument | output | temp | **peak** GB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    m = r["mesh"]
    mesh = f"{r['devices']} ({m['data']},{m['fsdp']},{m['tensor']},{m['sequence']})"
    step = _KIND_WORDS.get(r["kind"], r["kind"])
    if r.get("error"):
      lines.append(f"| {r['case']} | {r['size']} | {step} | {mesh} | - | - | failed: {r['error'][:120]} | | | |")
      continue
    a = r.get("memory_analysis", {})
    lines.append(f"| {r['case']} | {r['size']} | {step} | {mesh} | {r.get('sharding', '-')} | {r.get('frames', 1)} | "
                 f"{gb(a.get('argument'))} | {gb(a.get('output'))} | {gb(a.get('temp'))} | **{gb(r['bytes_per_device'])}** |")
  return "\n".join(lines)


def write_json(result: dict, path: str | None):
  """Writes `result` as one JSON object to `path` (nothing when `path` is empty)."""
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(result, f, indent=2, sort_keys=True, default=str)
      f.write("\n")
