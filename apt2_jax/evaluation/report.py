"""The evaluation's report: `report.json` (every figure) and `claims.md` (what a reader looks at).

`claims.md`, in order: the gates and claims with their verdicts and each set's horizons with 95%
bootstrap CIs (`gates.gates_table`), the models (sampler, measured and benchmarked throughput), each
set's worlds and checks (the codec against the flat colour, the motion against training's), and
the drift summaries (one row per model and noise seed, then the references). Both files are
written whole or not at all (`disk.write_atomic`).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np

from apt2_jax.evaluation import drift
from apt2_jax.evaluation import gates


def jsonable(x):
  """`x` with numpy values made JSON's (non-finite floats: None; floats to 6 significant digits)."""
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return jsonable(x.tolist())
  if isinstance(x, (np.floating, float)):
    x = float(x)
    return float(f"{x:.6g}") if math.isfinite(x) else None
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, np.bool_):
    return bool(x)
  return x


def _fmt(x, f="{:.2f}") -> str:
  return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f.format(x)


def summary_table(set_name: str, s: Mapping) -> str:
  """Markdown: one row per model and noise seed, then the references."""
  head = ("| model | seed | good horizon s | psnr_known mean | late psnr_known | known frames | "
          "psnr_recent mean | psnr_recent horizon s | PSNR whole frame | motion_ratio | on bursts | warp error | "
          "late blur | late colour drift |")
  lines = [f"### {set_name}", "", head, "|" + "---|" * (head.count("|") - 1)]
  rows = [(n, seed, x) for n, per_seed in s["models"].items() for seed, x in per_seed.items()]
  rows += [(f"*{k}*", "-", x) for k, x in s["references"].items()]
  for name, seed, x in rows:
    o, late = x["overall"], x["late"]
    h = _fmt(x["horizon_s"], "{:.1f}") + ("+" if x["horizon_reached_end"] else "")
    hr = _fmt(x.get("horizon_recent_s"), "{:.1f}") + ("+" if x.get("horizon_recent_reached_end") else "")
    lines.append(f"| {name} | {seed} | {h} | {_fmt(o.get('psnr_known'))} | {_fmt(late.get('psnr_known'))} | "
                 f"{_fmt(o.get('known_frames'))} | {_fmt(o['psnr_recent'])} | {hr} | {_fmt(o.get('psnr'))} | "
                 f"{_fmt(o['motion_ratio'])} | {_fmt(o['motion_ratio_burst'])} | {_fmt(o['warp_error'])} | "
                 f"{_fmt(late['blur'])} | {_fmt(late['colour_drift'])} |")
  return "\n".join(lines)


def models_table(report: Mapping) -> str:
  """Markdown: each model's role, sampler and throughput (measured here, and `apt2_jax.benchmark`'s
  when given)."""
  lines = ["## Models", "", "| model | role | steps | shift | guidance | recycle | forward passes per frame | "
           "fps (measured) | fps (benchmark) |", "|---|---|---|---|---|---|---|---|---|"]
  for name, m in report["models"].items():
    bench = (m.get("benchmark") or {}).get("frames_per_s")
    lines.append(f"| {name} | {m.get('role') or '-'} | {m['num_steps']} | {_fmt(m['shift'], '{:g}')} | "
                 f"{_fmt(m['guidance'], '{:g}')} | {m['recycle']} | {m['forward_passes_per_frame']} | "
                 f"{_fmt(m['throughput'].get('frames_per_s'), '{:.1f}')} | {_fmt(bench, '{:.1f}')} |")
  return "\n".join(lines)


def set_lines(set_name: str, s: Mapping) -> list[str]:
  """A set's worlds and checks: the split and worlds, the codec against the flat colour, the
  commanded motion against training's, and the horizons of shorter durations."""
  info = s["set"]
  lines = [f"- **{set_name}** ({info['split']} split, {info['role']}): worlds {info['world_seeds']}, "
           f"trajectories {', '.join(info['trajectories'])}"
           + (f"; hovering segments: {sum(info['hover_segments'])}" if any(info["hover_segments"]) else "") + "."]
  v = s.get("vae_vs_flat")
  if v:
    verdict = "a clear margin" if v["clear_margin"] else f"NOT a clear margin (< {v['threshold_db']:g} dB)"
    lines.append(f"  The codec's ceiling (the oracle through it) {_fmt(v['vae_psnr'])} dB whole-frame PSNR, frame "
                 f"0's flat colour {_fmt(v['flat_psnr'])} dB: {v['margin_db']:+.2f} dB, {verdict}.")
  m = s.get("motion")
  if m:
    lines.append(f"  Motion: the oracle's median image motion per latent step {_fmt(m['median_px'])} px, the "
                 f"training clips' {_fmt(m['training_median_px'])} px (ratio {_fmt(m['ratio_to_training'])}).")
  for duration, st in (s.get("by_duration") or {}).items():
    horizons = "; ".join(f"{n} {_fmt(x['horizon']['median'], '{:.1f}')} s" for n, x in st["models"].items())
    lines.append(f"  First {duration}: median horizons (threshold {_fmt(st['threshold']['threshold_db'])} dB) "
                 f"{horizons}.")
  return lines


def markdown(report: Mapping) -> str:
  cfg = report["config"]
  lines = [f"# Evaluation: {cfg['world']}, {cfg['num_worlds']} worlds per set, noise seeds {cfg['noise_seeds']}, "
           f"{cfg['seconds']:g} s rollouts", "", gates.gates_table(report), "", models_table(report), "",
           "## Sets", ""]
  for name, s in report["sets"].items():
    lines += set_lines(name, s)
  lines += ["", "## Drift summaries",
            f"(good horizon: the horizon rule (`horizon.horizon`: the first full {drift.HORIZON_WINDOW_S:g}-s "
            f"window of generated frames) on psnr_known (PSNR on the pixels of frame 0's content; frames with "
            f"under {100 * drift.KNOWN_MIN_FRACTION:g}% of it have none) at the fixed {drift.GOOD_PSNR:g} dB (the "
            f"verdicts use the threshold from the references, above); '+': never, a lower bound; late: the last "
            f"{100 * drift.LATE_FRACTION:g}%; known frames: the share of frames with a psnr_known; psnr_recent "
            f"(pixels seen within the model's window, which scores generated content) is secondary; "
            f"motion_ratio: the block-robust estimate (`drift.motion_scales`); bursts: commanded motion > "
            f"{drift.BURST_PX:g} px per frame)", ""]
  for name, s in report["sets"].items():
    lines += [summary_table(name, s), ""]
  return "\n".join(lines)


def write_report(report: Mapping[str, Any], out_dir: str, progress: bool = True) -> dict:
  """`report.json` and `claims.md`, each whole or not at all (`disk.write_atomic`; a full disk is
  one line); prints the Markdown when `progress`; returns the JSON-able report."""
  from apt2_jax import disk
  report = jsonable(report)
  disk.write_atomic(os.path.join(out_dir, "report.json"), json.dumps(report, indent=1), "evaluation report")
  text = markdown(report)
  disk.write_atomic(os.path.join(out_dir, "claims.md"), text + "\n", "evaluation report")
  if progress:
    print(text, flush=True)
  return report
