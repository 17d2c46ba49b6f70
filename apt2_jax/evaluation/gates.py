"""The testbed's gates and claims, fixed in code before training (do not edit after a run).

Gate 1 (stage 1 learns): on the in-distribution clips, the teacher-forced t = 1 next latent frame
  (pure noise in the target slot: only the context and the controls can help) is within
  `GATE1_MARGIN_DB` of warp-last (the true last frame moved by the commanded motion, through the
  same codec: the one-step ceiling). Stage 3 is not trained on a model that fails it.
Gate 2 (there is drift to fix): the distilled model's median horizon is under `GATE2_MAX_S` of a
  `GATE2_ROLLOUT_S` rollout.
(a) AAPT's median horizon >= `A_HORIZON_FACTOR` x the distilled and the teacher-forced models';
    its mean PSNR over `A_LATE_S` is >= `A_LATE_DB` higher, with the paired bootstrap 95% CI of
    the difference excluding 0; the same two against the compute-matched control (the distilled
    model continued with its own loss for AAPT's wall time); and its one-step teacher-forced PSNR
    within `A_ONE_STEP_DB` of the distilled model's (it does not win by blurring).
(b) The teacher-forced adversarial model's median horizon <= `B_FRACTION` x AAPT's.
(c) The no-recycling model (trained without recycling from stage 1 on) has a burst motion ratio
    <= `C_NO_RECYCLE_MAX`, while AAPT's is >= `C_AAPT_MIN`.
(d) Long-video AAPT's median horizon on `D_ROLLOUT_S` rollouts >= `D_FACTOR` x AAPT-short's.
A verdict is "holds", "fails" or "not measured" (a model or a figure is missing).

EMA rule: a stage's verdict may use its EMA weights only where the EMA's horizon 1 / (1 - decay)
is at most `EMA_MAX_FRACTION` of the stage's updates (`ema_allowed`); otherwise the EMA mostly
holds the previous stage and the raw weights are scored.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping, Optional

GATE1_MARGIN_DB = 1.5
GATE2_MAX_S = 10.0
GATE2_ROLLOUT_S = 20.0
A_HORIZON_FACTOR = 2.0
A_LATE_S = (10.0, 20.0)
A_LATE_DB = 2.0
A_ONE_STEP_DB = 1.0
B_FRACTION = 0.5
C_NO_RECYCLE_MAX = 0.5
C_AAPT_MIN = 0.8
D_ROLLOUT_S = 60.0
D_FACTOR = 2.0
EMA_MAX_FRACTION = 0.1

HOLDS, FAILS, NOT_MEASURED = "holds", "fails", "not measured"


def criteria() -> dict:
  return {k: v for k, v in globals().items() if k.isupper() and not k.startswith("_")
          and isinstance(v, (int, float, tuple))}


def ema_allowed(decay: float, updates: int) -> bool:
  """May a stage of `updates` optimiser updates be scored on its EMA of `decay`?"""
  if not decay:
    return False
  return 1.0 / (1.0 - float(decay)) <= EMA_MAX_FRACTION * int(updates) * (1 + 1e-9)


def weights_key(decay: float, updates: int) -> str:
  """The train-state entry a stage's verdict uses: "ema_params" where `ema_allowed`, else "params"."""
  return "ema_params" if ema_allowed(decay, updates) else "params"


def _verdict(ok: Optional[bool]) -> str:
  return NOT_MEASURED if ok is None else (HOLDS if ok else FAILS)


def _num(x) -> bool:
  return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def gate1(teacher_forced_pure_db: Optional[float], warp_last_db: Optional[float]) -> dict:
  ok = None
  if _num(teacher_forced_pure_db) and _num(warp_last_db):
    ok = teacher_forced_pure_db >= warp_last_db - GATE1_MARGIN_DB
  return {"verdict": _verdict(ok), "teacher_forced_t1_db": teacher_forced_pure_db, "warp_last_db": warp_last_db,
          "gap_db": (warp_last_db - teacher_forced_pure_db) if ok is not None else None,
          "criterion": f"teacher-forced t = 1 within {GATE1_MARGIN_DB} dB of warp-last"}


def gate2(distilled_median_horizon_s: Optional[float], rollout_s: float) -> dict:
  ok = None
  if _num(distilled_median_horizon_s):
    ok = distilled_median_horizon_s < GATE2_MAX_S
  return {"verdict": _verdict(ok), "distilled_median_horizon_s": distilled_median_horizon_s,
          "rollout_s": rollout_s, "criterion": f"distilled median horizon < {GATE2_MAX_S:g} s"}


def _horizon(models: Mapping[str, Any], name: str) -> Optional[float]:
  m = models.get(name)
  return None if m is None else m["horizon"]["median"]


def _paired(models: Mapping[str, Any], a: str, b: str) -> Optional[dict]:
  m = models.get(a)
  return None if m is None else m.get("late_diff", {}).get(b)


def _all(*parts: Optional[bool]) -> Optional[bool]:
  if any(p is False for p in parts):
    return False
  if any(p is None for p in parts):
    return None
  return True


def claim_a(models: Mapping[str, Any], one_step: Mapping[str, Optional[float]]) -> dict:
  """`models[name]`: {"horizon": median_ci, "late_diff": {other: mean_ci of the paired late-PSNR
  difference name - other}}; `one_step`: {name: teacher-forced one-step PSNR}."""
  aapt = _horizon(models, "aapt_short")
  parts = {}
  for other in ("distilled", "teacher_forcing", "control"):
    h, d = _horizon(models, other), _paired(models, "aapt_short", other)
    horizon_ok = None if not (_num(aapt) and _num(h)) else aapt >= A_HORIZON_FACTOR * h
    late_ok = None if d is None or not _num(d["mean"]) else (d["mean"] >= A_LATE_DB and d["lo"] > 0)
    parts[other] = {"horizon_ok": horizon_ok, "late_ok": late_ok}
  a1, d1 = one_step.get("aapt_short"), one_step.get("distilled")
  blur_ok = None if not (_num(a1) and _num(d1)) else a1 >= d1 - A_ONE_STEP_DB
  ok = _all(*(p["horizon_ok"] for p in parts.values()), *(p["late_ok"] for p in parts.values()), blur_ok)
  return {"verdict": _verdict(ok), "parts": parts, "one_step_ok": blur_ok}


def claim_b(models: Mapping[str, Any]) -> dict:
  a, t = _horizon(models, "aapt_short"), _horizon(models, "teacher_forcing")
  ok = None if not (_num(a) and _num(t)) else t <= B_FRACTION * a
  return {"verdict": _verdict(ok), "aapt_horizon_s": a, "teacher_forcing_horizon_s": t}


def claim_c(burst_ratio: Mapping[str, Optional[float]]) -> dict:
  a, n = burst_ratio.get("aapt_short"), burst_ratio.get("no_recycle")
  ok = None if not (_num(a) and _num(n)) else (n <= C_NO_RECYCLE_MAX and a >= C_AAPT_MIN)
  return {"verdict": _verdict(ok), "aapt_burst_motion_ratio": a, "no_recycle_burst_motion_ratio": n}


def claim_d(long_models: Mapping[str, Any]) -> dict:
  a, s = _horizon(long_models, "aapt"), _horizon(long_models, "aapt_short")
  ok = None if not (_num(a) and _num(s)) else a >= D_FACTOR * s
  return {"verdict": _verdict(ok), "long_video_horizon_s": a, "aapt_short_horizon_s": s}


def _pct(x) -> str:
  return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.0f}%"


def _fmt(x, f="{:.2f}") -> str:
  return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f.format(x)


def gates_table(report: Mapping) -> str:
  """Markdown: the gates and claims with their verdicts, then per set the threshold and each model's
  median horizon and late PSNR with 95% bootstrap CIs over worlds."""
  lines = ["## Gates and claims (criteria fixed in `apt2_jax.evaluation.gates`)", "",
           "| | verdict | figures |", "|---|---|---|"]
  for name, v in report["claims"].items():
    figures_ = {k: x for k, x in v.items() if k not in ("verdict", "criterion")}
    lines.append(f"| {name} | **{v['verdict']}** | {json.dumps(figures_, default=str)[:400]} |")
  for set_name, s in report["sets"].items():
    st = s.get("statistics")
    if not st:
      continue
    th, chk = st["threshold"], st["threshold_check"]
    lines += ["", f"### {set_name}: horizons on {st['metric']}", "",
              f"Threshold {_fmt(th['threshold_db'])} dB: midway between the floors (flat colour, frozen frame 0 "
              f"after one latent step; {th['floor_quantile']:g} quantile {_fmt(th['floor_db'])} dB) and warp-frame-0 "
              f"({th['ceiling_quantile']:g} quantile {_fmt(th['ceiling_db'])} dB); check: floors below within one "
              f"latent step in {_pct(chk['floors_fall_within_one_step'])} of worlds, warp-frame-0 above "
              f"throughout in {_pct(chk['ceilings_stay_above'])}.", "",
              f"| model | median horizon s (first crossing) [95% CI] | last crossing s | censored | "
              f"PSNR {st['late_s'][0]:g}-{st['late_s'][1]:g} s [95% CI] |", "|---|---|---|---|---|"]
    ci = lambda c, f="{:.2f}": f"{_fmt(c['median'], f)} [{_fmt(c['lo'], f)}, {_fmt(c['hi'], f)}]"
    for name, m in st["models"].items():
      lines.append(f"| {name} | {ci(m['horizon'], '{:.1f}')} | {ci(m['horizon_last'], '{:.1f}')} | "
                   f"{_pct(m['reached_end'])} | {ci(m['late_psnr'])} |")
    for name, m in st["references"].items():
      lines.append(f"| *{name}* | {ci(m['horizon'], '{:.1f}')} | | | {ci(m['late_psnr'])} |")
  return "\n".join(lines)
