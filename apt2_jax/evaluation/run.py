"""`evaluate`: every model streamed on the same worlds of each evaluation set, scored against the
oracle beside references, with the gates and claims; one evaluation for every world.

    models = {"aapt_short": model_spec_from_workdir(STAGE3), "distilled": model_spec_from_workdir(STAGE2),
              "diffusion": model_spec_from_workdir(STAGE1, num_steps=32, shift=3.0), ...}
    config = EvalConfig(world="torus", roles={name: name for name in models}, seconds=20.0)
    report = evaluate(models, config, out_dir=DIR, learning=stage1_learning_check(STAGE1))

The command line is `python -m apt2_jax.evaluation` (`__main__.py`); the pipeline calls `evaluate`.

Per evaluation set (`oracle.EvalSet`, fixed seeds; `oracle.default_eval_sets`) and world
(`oracle.eval_worlds`): the target (`oracle.make_target`: the oracle, the known and recent regions,
the commanded motion, the world's exact warp where it has one), the references through the models'
codec (`references.reference_curves`), then each model, once per noise seed (`noise_seeds`, paired
across models: the same stream seed for every model of a world), streams the world from the oracle's
frame 0 through its `StreamingGenerator` (`models.ModelStream`) and every frame is scored by
`drift.frame_metrics` (`drift`'s module docstring has the definitions).

Summaries: `drift.summarize` per (set, noise seed, model) and per reference, pooled over the set's
worlds; `horizon.set_statistics`: the threshold from the references, per-world horizons (first and
last crossing), medians with bootstrap CIs and paired late-PSNR differences (also on the prefixes of
the shorter `summary_seconds`); the gates and claims (`gates`, by model name = role) on the first
set. Checks per set: the codec's ceiling against the flat colour (`references.vae_vs_flat`) and,
in the camera world, the oracle's motion against training's (`oracle.training_motion`).

Cost apart from the model rollouts, per world of a 30 s panorama rollout at 24 fps (721 frames),
measured on one CPU core shared with a training run (a free core is ~2x faster): the oracle ~0.9 s,
the recent region ~1.7 s per distinct window, the known region ~0.1 s, and `drift.frame_metrics`
~1.5 s per scored video (each reference, after a 0.15 s codec round trip, and each model x noise
seed), vectorised numpy: the warp error (bilinear, RGB, full resolution) ~0.65 s, the motion
estimate ~0.55 s. Every world's videos are held in memory (30 s of 64x64 frames: ~9 MB each).

Outputs under `out_dir`: `report.json`, `claims.md` (`report`), `drift_<set>.png`, `gifs/` and, with
`videos`, `videos/` (`figures`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from apt2_jax.controls import WORLD_CONTROL_TYPES
from apt2_jax.evaluation import camera_motion
from apt2_jax.evaluation import claims as claims_lib
from apt2_jax.evaluation import drift
from apt2_jax.evaluation import figures
from apt2_jax.evaluation import gates
from apt2_jax.evaluation import horizon as horizon_lib
from apt2_jax.evaluation import oracle as oracle_lib
from apt2_jax.evaluation import references as refs_lib
from apt2_jax.evaluation import report as report_lib
from apt2_jax.evaluation.models import FRAMES_PER_LATENT, ModelSpec, ModelStream
from apt2_jax.evaluation.oracle import EvalSet, Target, TestWorld


@dataclasses.dataclass
class EvalConfig:
  """The evaluation's settings (fixed before any model is trained).

  Attributes:
    roles: claim role (`claims.ROLES`) -> model name in `models`; the gates and claims read the
      models by these names, a missing one makes its verdict "not measured".
    world, world_config: the world and `WorldConfig` overrides shared by every set.
    eval_sets: the evaluation sets (the first is where the gates and claims are measured); None:
      `oracle.default_eval_sets(world)`.
    num_worlds: worlds per set; noise_seeds: one rollout per model, world and seed (2 in the full run).
    seconds: rollout length; None: `claims.LONG_EVAL_FACTOR` x `short_clip_s`.
    summary_seconds: shorter durations also scored on each rollout's prefix (horizons, late PSNR).
    short_clip_s: the short training clip.
    height, width, fps: the frames (the models' resolution).
    window: N for `psnr_recent` of the references; None: the first model's `dit_config.window`
      (each model's own `psnr_recent` uses its own window; `psnr_known` has no window).
    chunk_frames: latent frames per compiled DiT call.
    gif_max_bytes: each GIF's size cap.
    videos: also write every world's whole rollout as MP4 (first noise seed).
    ssim: also score every frame's SSIM.
    training_clip_frames: the training clips of the camera world's motion check.
  """
  roles: Mapping[str, str] = dataclasses.field(default_factory=dict)
  world: str = "panorama"
  world_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  eval_sets: Optional[Sequence[EvalSet]] = None
  num_worlds: int = 4
  noise_seeds: Sequence[int] = (0, 1)
  seconds: Optional[float] = None
  summary_seconds: Sequence[float] = ()
  short_clip_s: Optional[float] = None
  height: int = 64
  width: int = 64
  fps: float = 24.0
  window: Optional[int] = None
  chunk_frames: int = 24
  gif_max_bytes: int = figures.GIF_MAX_BYTES
  videos: bool = False
  ssim: bool = False
  training_clip_frames: int = 17
  progress: bool = True

  def __post_init__(self):
    if self.eval_sets is None:
      self.eval_sets = oracle_lib.default_eval_sets(self.world)
    self.eval_sets = tuple(self.eval_sets)

  def duration(self) -> float:
    if self.seconds:
      return float(self.seconds)
    if not self.short_clip_s:
      raise ValueError("EvalConfig needs seconds or short_clip_s")
    return claims_lib.LONG_EVAL_FACTOR * float(self.short_clip_s)

  def latent_steps(self, seconds: Optional[float] = None) -> int:
    return max(1, math.ceil((seconds or self.duration()) * self.fps / FRAMES_PER_LATENT))

  def video_frames(self, seconds: Optional[float] = None) -> int:
    return 1 + FRAMES_PER_LATENT * self.latent_steps(seconds)

  def env(self, eval_set: EvalSet):
    """The world of an evaluation set, `WorldConfig` of the rollout's length."""
    return oracle_lib.make_env(self.world, eval_set, self.height, self.width, self.video_frames(),
                               self.world_config)

  def describe(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(seconds=self.duration(), latent_steps=self.latent_steps(), video_frames=self.video_frames())
    return d


# ------------------------------------------------------------------------------------------------
# One model on one world
# ------------------------------------------------------------------------------------------------


def stream_world(stream: ModelStream, target: Target, tw: TestWorld, noise_seed: int, latent_steps: int,
                 keep_every: int = 0, keep_all: bool = False, ssim: bool = False):
  """One model's rollout of one world from the oracle's frame 0: (its `drift.frame_metrics` curves,
  the generated frames t with t % keep_every == 0 (None when keep_every is 0), every generated
  frame (None unless keep_all))."""
  window = stream.spec.dit_config.window
  recent, h, oracle, known = target.recent[window], target.homographies, target.oracle, target.known
  acc, kept, frames_all = drift.DriftCurves(target.background, ssim), [], []

  def add(frames, a):
    b = a + len(frames)
    acc.add(frames, oracle[a:b], recent[a:b], h[a:b], None if known is None else known[a:b])
    if keep_every:
      kept.extend(f for i, f in enumerate(frames) if (a + i) % keep_every == 0)
    if keep_all:
      frames_all.append(frames)

  add(stream.start(np.asarray(oracle[0]), tw.text_tokens, noise_seed), 0)
  for j, video in enumerate(stream.stream(tw.controls, latent_steps)):
    add(video, 1 + FRAMES_PER_LATENT * j)
  return (acc.result(), np.stack(kept) if keep_every else None,
          np.concatenate(frames_all) if keep_all else None)


def noise_seed(seed: int, set_index: int, world_index: int) -> int:
  """The stream seed of (noise seed, set, world): the same for every model (paired noise)."""
  return int(np.random.SeedSequence([seed, set_index, world_index]).generate_state(1)[0] & 0x7FFFFFFF)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def _check(models: Mapping[str, ModelSpec], config: EvalConfig):
  if not models:
    raise ValueError("evaluate needs at least one model")
  for role, name in config.roles.items():
    if role not in claims_lib.ROLES:
      raise ValueError(f"unknown role {role!r}; roles are {sorted(claims_lib.ROLES)}")
    if name not in models:
      raise ValueError(f"role {role!r} names model {name!r}, not among {sorted(models)}")
  codecs = {name: spec.vae_config for name, spec in models.items()}
  if len(set(codecs.values())) > 1:
    raise ValueError(f"every model must decode through the same codec; got {codecs}")
  kind = WORLD_CONTROL_TYPES[config.world]
  for name, spec in models.items():
    if spec.control_type not in ("none", kind):
      raise ValueError(f"model {name!r} takes {spec.control_type!r} controls, the {config.world!r} world gives "
                       f"{kind!r}")
  if config.height % 16 or config.width % 16:
    raise ValueError(f"height={config.height}, width={config.width} must be multiples of 16")
  if not config.eval_sets:
    raise ValueError("EvalConfig.eval_sets is empty")


def _bar(config, **kwargs):
  from tqdm import tqdm
  return tqdm(disable=not config.progress, file=sys.stderr, dynamic_ncols=True, **kwargs)


def _run_set(set_index: int, eval_set: EvalSet, streams, config: EvalConfig, ref_window: int, roundtrip,
             out_dir: str) -> dict:
  """One evaluation set: per-world curves of the references and of every model per noise seed,
  world 0's kept frames (first noise seed) for the GIFs, and the MP4s when asked for."""
  env = config.env(eval_set)
  steps, num_frames = config.latent_steps(), config.video_frames()
  stride = figures.gif_stride(num_frames)
  windows = [ref_window] + [s.spec.dit_config.window for s in streams.values()]
  out = {"worlds": [], "references": {k: [] for k in refs_lib.REFERENCES}, "commanded": [], "oracle_motion": [],
         "models": {n: {s: [] for s in config.noise_seeds} for n in streams}, "gif": {}, "gif_stride": stride,
         "videos": {}}
  for tw in oracle_lib.eval_worlds(env, eval_set, config.num_worlds, num_frames, config.fps):
    target = oracle_lib.make_target(env, tw, windows)
    out["worlds"].append({"index": tw.index, "seed": tw.seed, "trajectory": tw.trajectory, "caption": tw.caption,
                          "hover_segments": tw.hover_segments,
                          "burst_pairs": int((np.linalg.norm(target.commanded, axis=-1) > drift.BURST_PX).sum())})
    out["commanded"].append(target.commanded)
    if config.world == "camera":
      out["oracle_motion"].append(oracle_lib.latent_step_motion(target.oracle))
    for kind, curves in refs_lib.reference_curves(target, ref_window, roundtrip, config.ssim).items():
      out["references"].setdefault(kind, []).append(curves)
    if tw.index == 0:
      out["gif"]["oracle"] = target.oracle[::stride]
    for seed in config.noise_seeds:
      for name, stream in streams.items():
        first = seed == config.noise_seeds[0]
        keep = stride if (tw.index == 0 and first) else 0
        with _bar(config, total=steps, desc=f"{eval_set.name} world {tw.index} seed {seed} {name}", unit="latent") as b:
          curves, kept, frames = stream_world(stream, target, tw, noise_seed(seed, set_index, tw.index), steps, keep,
                                              keep_all=config.videos and first, ssim=config.ssim)
          b.update(steps)
        out["models"][name][seed].append(curves)
        if kept is not None:
          out["gif"][name] = kept
        if frames is not None:
          stem = f"{eval_set.name}_{name}_world{tw.index}"
          out["videos"].setdefault(name, []).append(figures.write_video(out_dir, stem, frames, target.oracle,
                                                                        config.fps))
  return out


def _prefix(curves: Mapping[str, np.ndarray], n: int) -> dict:
  return {k: np.asarray(v)[:n] for k, v in curves.items()}


def _set_summary(eval_set: EvalSet, raw: dict, config: EvalConfig) -> dict:
  """`drift.summarize` of every reference and of every model per noise seed (pooled over worlds),
  `horizon.set_statistics` (whole rollout and each shorter duration), the set's checks."""
  fps, duration = config.fps, config.duration()
  s = lambda curves: drift.summarize(curves, raw["commanded"], fps)
  worlds = raw["worlds"]
  out = {"set": {"split": eval_set.split, "role": oracle_lib.SET_ROLES.get(eval_set.name, eval_set.split),
                 "num_worlds": len(worlds), "world_seeds": [w["seed"] for w in worlds],
                 "trajectories": [w["trajectory"] for w in worlds],
                 "hover_segments": [w["hover_segments"] for w in worlds]},
         "worlds": worlds, "gif_stride": raw["gif_stride"],
         "references": {k: s(v) for k, v in raw["references"].items() if v},
         "models": {n: {str(seed): s(c) for seed, c in per_seed.items()} for n, per_seed in raw["models"].items()}}
  late = lambda d: (min(gates.A_LATE_S[0], 0.5 * d), min(gates.A_LATE_S[1], d))
  # The references this world has (no warp ones without an exact warp: the threshold's ceiling is
  # then the oracle through the codec, `horizon.set_statistics`).
  present = {k: v for k, v in raw["references"].items() if v}
  out["statistics"] = horizon_lib.set_statistics(present, raw["models"], fps, late(duration))
  out["by_duration"] = {}
  for d in sorted({float(x) for x in config.summary_seconds if 0 < float(x) < duration}):
    n = config.video_frames(d)
    refs = {k: [_prefix(c, n) for c in v] for k, v in present.items()}
    models = {m: {seed: [_prefix(c, n) for c in v] for seed, v in per_seed.items()}
              for m, per_seed in raw["models"].items()}
    out["by_duration"][f"{d:g}s"] = horizon_lib.set_statistics(refs, models, fps, late(d))
  if raw["references"].get("oracle") and raw["references"].get("flat_colour"):
    out["vae_vs_flat"] = refs_lib.vae_vs_flat(raw["references"]["oracle"], raw["references"]["flat_colour"])
  if raw["oracle_motion"]:
    env = config.env(eval_set)
    train = float(np.median(oracle_lib.training_motion(env, 16, config.training_clip_frames)))
    median = float(np.median(np.concatenate(raw["oracle_motion"])))
    out["motion"] = {"median_px": median, "training_median_px": train, "training_clips": 16,
                     "training_clip_frames": config.training_clip_frames,
                     "ratio_to_training": median / train if train > 0 else None}
  if raw["videos"]:
    out["videos"] = raw["videos"]
  return out


def gate_verdicts(s: Mapping[str, Any], learning: Optional[Mapping] = None) -> dict:
  """Gate 2 and claims (a)-(c) on one set's summaries (`gates`); Gate 1 from the learning check.
  Claim (d) needs the 60-s rollouts of its own evaluation (`gates.claim_d`)."""
  st = s["statistics"]["models"]
  burst = {n: float(np.nanmean([x["overall"]["motion_ratio_burst"] for x in per_seed.values()]))
           for n, per_seed in s["models"].items()}
  one_step = {n: (learning or {}).get("one_step", {}).get(n) for n in st}
  g1 = (learning or {}).get("gate1") or gates.gate1(None, None)
  return {"gate1": g1,
          "gate2": gates.gate2(st.get("distilled", {}).get("horizon", {}).get("median"),
                               s["references"]["oracle"]["duration_s"]),
          "a": gates.claim_a(st, one_step), "b": gates.claim_b(st), "c": gates.claim_c(burst)}


def criteria() -> dict:
  """The fixed numbers behind the report, for report.json."""
  return {"drift": drift.fixed_criteria(), "gates": gates.criteria(),
          "horizon": {"window_s": horizon_lib.WINDOW_S, "floor_quantile": horizon_lib.FLOOR_QUANTILE,
                      "ceiling_quantile": horizon_lib.CEILING_QUANTILE,
                      "bootstrap_samples": horizon_lib.BOOTSTRAP_SAMPLES}}


def evaluate(models: Mapping[str, ModelSpec], config: EvalConfig, out_dir: str,
             learning: Optional[Mapping] = None) -> dict:
  """Streams every model on every evaluation set and noise seed; writes and returns the report.

  `learning`: the stage-1 learning check (`learning.stage1_learning_check`), reported first.
  """
  _check(models, config)
  os.makedirs(out_dir, exist_ok=True)
  first = next(iter(models.values()))
  ref_window = int(config.window or first.dit_config.window)
  streams = {n: ModelStream(spec, config.height, config.width, config.chunk_frames) for n, spec in models.items()}
  roundtrip = refs_lib.codec_roundtrip(first, config.chunk_frames)  # one codec (`_check`)
  sets, gifs = {}, {}
  for i, eval_set in enumerate(config.eval_sets):
    raw = _run_set(i, eval_set, streams, config, ref_window, roundtrip, out_dir)
    sets[eval_set.name] = _set_summary(eval_set, raw, config)
    gifs[eval_set.name] = figures.write_gifs(out_dir, eval_set.name, raw["gif"], raw["gif_stride"], config.fps,
                                             config.gif_max_bytes)
  role_of = {name: role for role, name in config.roles.items()}
  report = {"config": dict(config.describe(), reference_window=ref_window), "criteria": criteria(),
            "definitions": drift.__doc__ + "\n\ncamera_motion: " + camera_motion.__doc__, "learning": learning,
            "models": {n: dict(spec.describe(), role=role_of.get(n), throughput=streams[n].throughput())
                       for n, spec in models.items()},
            "sets": sets, "claims": gate_verdicts(sets[config.eval_sets[0].name], learning), "gifs": gifs,
            "plots": {s: figures.write_drift_plot(out_dir, s, sets[s], config.world, drift.BIN_S, drift.GOOD_PSNR)
                      for s in sets}}
  return report_lib.write_report(report, out_dir, config.progress)
