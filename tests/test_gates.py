"""The testbed's fixed rules: the horizon on synthetic curves, the threshold from references, the
references themselves on the torus (exact), the EMA rule, the claims' logic, and the no-recycling
ablation's teacher-forced inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt2_jax.data import worlds
from apt2_jax.evaluation import drift, gates
from apt2_jax.evaluation import horizon as hz
from apt2_jax.evaluation.metrics import PSNR_CAP, psnr
from apt2_jax.objectives import flow

FPS = 24.0


def _curve(values, n=481):
  c = np.full(n, np.nan)
  c[1:] = values if np.ndim(values) else np.full(n - 1, values)
  return c


def test_horizon_rule_on_synthetic_curves():
  n = 481                                         # 20 s at 24 fps
  # Never below: censored at the end.
  h = hz.horizon(_curve(30.0, n), FPS, 25.0)
  assert h == {"first_s": n / FPS, "last_s": n / FPS, "reached_end": True}
  # A flat colour: below from the first generated frame; the full first window is below.
  h = hz.horizon(_curve(15.0, n), FPS, 25.0)
  assert h["first_s"] == pytest.approx(1 / FPS) and h["last_s"] == pytest.approx(1 / FPS)
  assert not h["reached_end"]
  # Good for 5 s, then bad: the first window reaching 12 frames into the bad part crosses.
  x = np.where(np.arange(1, n) <= 120, 30.0, 20.0)
  h = hz.horizon(_curve(x, n), FPS, 25.0)
  assert h["first_s"] == pytest.approx((120 - 12 + 1 + 1) / FPS)
  assert h["last_s"] == pytest.approx(h["first_s"])
  # One bad frame does not end the horizon (a 1-s window); a bad second in the middle that
  # recovers gives a first crossing before the last.
  x = np.full(n - 1, 30.0)
  x[100] = 0.0
  assert hz.horizon(_curve(x, n), FPS, 25.0)["reached_end"]
  x = np.full(n - 1, 30.0)
  x[100:148] = 10.0
  x[300:] = 10.0
  h = hz.horizon(_curve(x, n), FPS, 25.0)
  assert h["first_s"] < 148 / FPS < h["last_s"] <= 301 / FPS
  # Shorter than one window: censored.
  assert hz.horizon(_curve(10.0, 10), FPS, 25.0)["reached_end"]


def test_threshold_from_references_separates_floors_and_warp():
  rng = np.random.default_rng(0)
  floors = [_curve(14 + rng.normal(0, 1, 480)) for _ in range(6)]
  ceilings = [_curve(31 + rng.normal(0, 0.5, 480)) for _ in range(3)]
  th = hz.threshold_from_references(floors, ceilings, FPS)
  assert th["separable"] and th["floor_db"] < th["threshold_db"] < th["ceiling_db"]
  check = hz.check_threshold(th["threshold_db"], floors, ceilings, FPS)
  assert check["holds"] and check["floors_fall_within_one_step"] == 1.0
  # A threshold below the floors fails its check.
  assert not hz.check_threshold(10.0, floors, ceilings, FPS)["holds"]


def test_bootstrap_ci():
  ci = hz.median_ci(np.arange(16.0))
  assert ci["lo"] <= ci["median"] == 7.5 <= ci["hi"] and ci["n"] == 16
  diff = hz.mean_ci(np.full(16, 2.5) + np.linspace(-0.1, 0.1, 16))
  assert diff["lo"] > 2.3 and diff["hi"] < 2.7
  assert hz.mean_ci(np.linspace(-1, 1, 16))["lo"] < 0 < hz.mean_ci(np.linspace(-1, 1, 16))["hi"]


def test_references_on_the_torus_are_exact():
  env = worlds.make_world("torus", worlds.WorldConfig(height=64, width=64, num_frames=49))
  sample = env.sample(seed=worlds.split_seed("validation", 1))
  video, controls = sample["video"], sample["controls"]
  warp = lambda frame, s, t: env.warp(frame, controls, s, t)
  for kind in ("warp_last", "warp_frame0", "oracle"):
    np.testing.assert_array_equal(drift.reference_frames(video, kind, warp), video)
  back = drift.reference_frames(video, "one_step_back")
  np.testing.assert_array_equal(back[5], video[1])
  np.testing.assert_array_equal(back[3], video[0])
  flat = drift.reference_frames(video, "flat_colour")
  assert (flat == flat[0, 0, 0]).all()
  scores = {k: psnr(drift.reference_frames(video, k, warp)[5:], video[5:], cap=PSNR_CAP).mean()
            for k in ("flat_colour", "frozen_first", "one_step_back", "warp_last")}
  assert scores["flat_colour"] < scores["one_step_back"] < scores["warp_last"] == PSNR_CAP
  with pytest.raises(ValueError, match="warp"):
    drift.reference_frames(video, "warp_last")


def test_ema_rule():
  assert gates.ema_allowed(0.99, 1000) and not gates.ema_allowed(0.99, 999)
  assert not gates.ema_allowed(0.99, 50) and not gates.ema_allowed(0.0, 10_000)
  assert gates.weights_key(0.9, 300) == "ema_params" and gates.weights_key(0.99, 300) == "params"


def _model(h, late=None):
  return {"horizon": {"median": h}, "late_diff": late or {}}


def test_claims_logic():
  good = {"mean": 3.0, "lo": 1.0, "hi": 5.0}
  models = {"aapt_short": _model(12.0, {"distilled": good, "teacher_forcing": good, "control": good}),
            "distilled": _model(4.0), "teacher_forcing": _model(5.0), "control": _model(6.0)}
  a = gates.claim_a(models, {"aapt_short": 28.0, "distilled": 28.5})
  assert a["verdict"] == gates.HOLDS
  assert gates.claim_a(models, {"aapt_short": 26.0, "distilled": 28.5})["verdict"] == gates.FAILS  # blurs
  weak = dict(models, aapt_short=_model(12.0, {"distilled": {"mean": 3.0, "lo": -0.5, "hi": 5.0},
                                               "teacher_forcing": good, "control": good}))
  assert gates.claim_a(weak, {"aapt_short": 28.0, "distilled": 28.5})["verdict"] == gates.FAILS
  assert gates.claim_a({"aapt_short": models["aapt_short"]}, {})["verdict"] == gates.NOT_MEASURED
  assert gates.claim_b(models)["verdict"] == gates.HOLDS
  assert gates.claim_c({"aapt_short": 0.9, "no_recycle": 0.3})["verdict"] == gates.HOLDS
  assert gates.claim_c({"aapt_short": 0.7, "no_recycle": 0.3})["verdict"] == gates.FAILS
  assert gates.gate1(29.0, 30.0)["verdict"] == gates.HOLDS
  assert gates.gate1(28.0, 30.0)["verdict"] == gates.FAILS
  assert gates.gate2(9.0, 20.0)["verdict"] == gates.HOLDS and gates.gate2(12.0, 20.0)["verdict"] == gates.FAILS


def test_set_statistics_pairs_worlds():
  n = 481
  refs = {"flat_colour": [{"psnr_known": _curve(12.0, n)}] * 4,
          "frozen_first": [{"psnr_known": _curve(15.0, n)}] * 4,
          "warp_frame0": [{"psnr_known": _curve(31.0, n)}] * 4}
  drop = lambda s: {"psnr_known": _curve(np.where(np.arange(1, n) <= s * FPS, 30.0, 14.0), n)}
  models = {"aapt_short": {0: [drop(15)] * 4, 1: [drop(15)] * 4}, "distilled": {0: [drop(3)] * 4, 1: [drop(3)] * 4}}
  st = hz.set_statistics(refs, models, FPS, (10.0, 20.0))
  assert st["threshold_check"]["holds"]
  assert st["models"]["aapt_short"]["horizon"]["median"] > 14 > 3 > st["models"]["distilled"]["horizon"]["median"]
  assert st["models"]["aapt_short"]["late_diff"]["distilled"]["mean"] > 5


def test_no_recycling_inputs():
  latents = jax.random.normal(jax.random.key(0), (2, 5, 2, 2, 3))
  recycled, x0, _ = flow.teacher_forcing_inputs(latents, recycle=False)
  np.testing.assert_array_equal(recycled[:, 0], latents[:, 0])
  assert float(jnp.abs(recycled[:, 1:]).max()) == 0.0
  np.testing.assert_array_equal(x0, latents[:, 1:])
  recycled, _, _ = flow.teacher_forcing_inputs(latents)
  np.testing.assert_array_equal(recycled, latents[:, :-1])
