"""The testbed evaluation: every model on two fixed evaluation sets, drift metrics, the claims.

    models = {"aapt": model_spec_from_workdir(STAGE4), "aapt_short": model_spec_from_workdir(STAGE3),
              "diffusion": model_spec_from_workdir(STAGE1, num_steps=32, shift=3.0), ...}
    config = TestbedConfig(roles={"aapt": "aapt", "aapt_short": "aapt_short", "diffusion": "diffusion"},
                           short_clip_s=33 / 24)
    report = evaluate_testbed(models, config, out_dir=DIR, learning=stage1_learning_check(STAGE1))

Evaluation sets (fixed seeds, never training's): `IN_DISTRIBUTION` holds the first `num_worlds`
worlds of the `validation` split (the training appearance and local motion distribution; the claims
are measured here) and `UNSEEN_APPEARANCE` those of the `test` split (the panorama world shows an
unseen palette family there; the motion is drawn as in training; reported separately). Each world's
trajectory is drawn as `World.sample` draws a training clip's (rng `[seed, 1]`, the world's start
pose, no hovering), at the rollout's length; in the panorama world the trajectory types are
stratified so that every set holds bursts: the first `ceil(num_worlds x pano_burst_fraction)`
(>= 1) worlds are 'bursty', the others 'wander', and both are the tethered variants
(`panorama.TETHERED_TRAJECTORIES`: the same random draws, so training's speed in every frame and
its bursts, but beyond 30 degrees from the start view the heading turns back toward it at up to 0.1
rad per frame), so that frame 0's content keeps coming back into
view over the whole rollout: the region `psnr_known` scores (`eval_worlds(..., tethered=False)`:
training's untethered walks). Measured on the first 4 worlds of each set, 30 s at 24 fps: frame
0's region covers 0.45 (in distribution) / 0.42 (unseen appearance) of the pixels on average and
5% or more in 97% / 93% of the frames; untethered 0.14 / 0.15 and 38% / 41%. The per-latent-step
commanded motion (|image shift| at the centre from frame 4j-4 to 4j, median / 95th percentile) of
the tethered types is training's: wander 5.8 / 10.0 px vs training clips 5.9 / 10.5, bursty 8.0 /
29.4 vs 7.8 / 27.7 (`tests/test_testbed_metrics.py`; `panorama`'s docstring has the turn rates).

Each model streams each world through `ModelStream` (`apt2_jax.generation.stream`, the one path from
weights to frames) from the oracle's frame 0, once per noise seed (`noise_seeds`, paired across
models); every frame is decoded by the model's codec and scored by `drift.frame_metrics` against
the oracle: `psnr_known` on frame 0's region (`known_mask`; the primary metric: good horizon, late
bin, claims), `psnr_recent` on the region seen within the model's window (`recent_mask`; reported,
secondary), the motion ratio from the block-robust `drift.motion_scales` (the scale of the commanded
motion that best explains frame t from frame t-4, on blurred 16x16 frames), warp error, blur and
colour drift (`drift`'s module docstring: the definitions, and why psnr_recent and the former
phase-correlation motion estimate were replaced). References on the same worlds, each passed
through the models' codec like the models' frames (`codec_roundtrip`): the oracle (the codec's
ceiling; the PSNR cap for the lossless codec), copy-last-frame (each frame the previous oracle
frame) and frozen first frame (`drift.REFERENCES`). Summaries: `drift.summarize` per (set, noise
seed, model), pooled over the set's worlds; the claims: `claims.evaluate_claims`.

Cost apart from the model rollouts, per world of a 30 s rollout at 24 fps (721 frames), measured on
one CPU core shared with a training run (a free core is ~2x faster): the oracle ~0.9 s, the recent
region ~1.7 s per distinct window, the known region ~0.1 s, and `drift.frame_metrics` ~1.5 s per
scored video (each of the 3 references, after a 0.15 s codec round trip, and each model x noise
seed), vectorised numpy: the warp error (bilinear, RGB, full resolution) ~0.65 s, the motion estimate
~0.55 s (the former per-frame loop with phase correlation took ~2.2 s per video in the same runs).

Outputs under `out_dir`: `report.json` (every figure, per-bin and per-latent-frame curves),
`claims.md` (the stage-1 learning check, the claims table with verdicts, the summary tables),
`drift_<set>.png` (psnr_known per 2 s bin per model with the references and the threshold;
psnr_recent thin) and `gifs/<set>_<model>.gif` (generated | oracle, world 0, the first noise seed,
the whole rollout subsampled to stay under 1 MB) and `gifs/<set>_all.gif` (oracle and every model).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from apt2_jax import media
from apt2_jax.data import captions
from apt2_jax.data import worlds as worlds_lib
from apt2_jax.evaluation import camera_motion
from apt2_jax.evaluation import claims as claims_lib
from apt2_jax.evaluation import drift
from apt2_jax.evaluation import figures
from apt2_jax.evaluation import gates
from apt2_jax.evaluation import horizon as horizon_lib
from apt2_jax.evaluation.oracle import TestWorld, long_controls, render_oracle
from apt2_jax.evaluation.report import _jsonable
from apt2_jax.evaluation.models import FRAMES_PER_LATENT, ModelSpec, ModelStream


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """One evaluation set: worlds `split_seed(split, first_index + k)`, k < num_worlds, with
  `WorldConfig` overrides `world_config` (e.g. `pano_appearance`)."""
  name: str
  split: str
  first_index: int = 0
  world_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)


IN_DISTRIBUTION = EvalSet("in_distribution", "validation")
UNSEEN_APPEARANCE = EvalSet("unseen_appearance", "test")


@dataclasses.dataclass
class TestbedConfig:
  """The testbed evaluation's settings (fixed before any model is trained).

  Attributes:
    roles: claim role (`claims.ROLES`) -> model name in `models`; a missing role makes its claims
      "not measurable".
    world, world_config: the world and `WorldConfig` overrides shared by every set.
    eval_sets: the evaluation sets (the first is where the claims are measured).
    num_worlds: worlds per set; noise_seeds: one rollout per model, world and seed (2 in the full run).
    seconds: rollout length; None: `claims.LONG_EVAL_FACTOR` x `short_clip_s`.
    short_clip_s: the short training clip (claim d: the rollout must be >= 20x it).
    height, width, fps: the frames (the models' resolution).
    window: N for `psnr_recent` of the references; None: the first model's `dit_config.window`
      (each model's own `psnr_recent` uses its own window; `psnr_known` has no window).
    chunk_frames: latent frames per compiled DiT call.
    gif_max_bytes: each GIF's size cap.
  """
  roles: Mapping[str, str] = dataclasses.field(default_factory=dict)
  world: str = "panorama"
  world_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  eval_sets: Sequence[EvalSet] = (IN_DISTRIBUTION, UNSEEN_APPEARANCE)
  num_worlds: int = 4
  noise_seeds: Sequence[int] = (0, 1)
  seconds: Optional[float] = None
  short_clip_s: Optional[float] = None
  height: int = 64
  width: int = 64
  fps: float = 24.0
  window: Optional[int] = None
  chunk_frames: int = 24
  gif_max_bytes: int = figures.GIF_MAX_BYTES
  progress: bool = True

  def duration(self) -> float:
    if self.seconds:
      return float(self.seconds)
    if not self.short_clip_s:
      raise ValueError("TestbedConfig needs seconds or short_clip_s")
    return claims_lib.LONG_EVAL_FACTOR * float(self.short_clip_s)

  def latent_steps(self) -> int:
    return max(1, math.ceil(self.duration() * self.fps / FRAMES_PER_LATENT))

  def describe(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(seconds=self.duration(), latent_steps=self.latent_steps(),
             video_frames=1 + FRAMES_PER_LATENT * self.latent_steps())
    return d


# ------------------------------------------------------------------------------------------------
# Worlds and their targets
# ------------------------------------------------------------------------------------------------


def world_fields(options: Optional[Mapping[str, Any]]) -> dict:
  """`WorldConfig` overrides with lists made tuples (as a JSON or ml_collections config gives them)."""
  return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(options or {}).items()}


def make_env(config: TestbedConfig, eval_set: EvalSet):
  """The world of an evaluation set, `WorldConfig` of the rollout's length."""
  wcfg = worlds_lib.WorldConfig(height=config.height, width=config.width,
                                num_frames=1 + FRAMES_PER_LATENT * config.latent_steps(),
                                **{**world_fields(config.world_config), **world_fields(eval_set.world_config)})
  return worlds_lib.make_world(config.world, wcfg)


def _trajectory(env, k: int, num_worlds: int, tethered: bool = True) -> str:
  """World k's trajectory type: panorama stratified (bursty first), tethered unless `tethered` is
  False; other worlds the train pool."""
  if env.name in ("panorama", "torus"):
    fraction = env.config.pano_burst_fraction
    bursty = max(1, math.ceil(num_worlds * fraction)) if fraction > 0 else 0
    base = "bursty" if k < bursty else "wander"
    return f"{base}_tethered" if tethered else base
  pool = env.trajectory_pools["train"]
  return str(pool[k % len(pool)])


def eval_worlds(env, eval_set: EvalSet, num_worlds: int, num_frames: int, fps: float = 24.0,
                tethered: bool = True) -> list[TestWorld]:
  """The set's worlds with their trajectories (`num_frames` video frames each). Panorama: the
  tethered variants of training's trajectory types (module docstring); `tethered=False`: training's
  own (the same random draws, not steered back)."""
  out = []
  for k in range(num_worlds):
    seed = worlds_lib.split_seed(eval_set.split, eval_set.first_index + k)
    rng = np.random.default_rng([seed, 1])
    trajectory = _trajectory(env, k, num_worlds, tethered)
    if env.name == "camera":  # its sampler checks limits over the whole length: drawn in segments
      controls, hover = long_controls(env, rng, num_frames, seed, trajectory, fps=fps)
    else:
      controls = env.random_controls(rng, num_frames, trajectory=trajectory, seed=seed)
      controls, hover = np.asarray(controls, np.float32), 0
    caption = env.caption(seed, trajectory)
    out.append(TestWorld(k, seed, trajectory, caption, captions.tokenize(caption), controls, hover))
  return out


@dataclasses.dataclass
class Target:
  """A world's oracle uint8 [T, H, W, 3], commanded homographies [T, 3, 3] and centre shifts
  [T, 2], the `psnr_recent` regions bool [T, H, W] per window (latent frames) and the `psnr_known`
  region bool [T, H, W] (frame 0's content, `known_mask`)."""
  oracle: np.ndarray
  homographies: np.ndarray
  commanded: np.ndarray
  recent: dict
  known: Optional[np.ndarray] = None
  warp: Optional[Callable] = None     # (frame, source, target) -> frame: the world's exact warp


def _oracle(env, tw: TestWorld) -> np.ndarray:
  if hasattr(env, "render_frames"):
    return env.render_frames(tw.controls, tw.seed)
  return render_oracle(env, tw.controls, tw.seed, 0, len(tw.controls))


def recent_mask(env, controls, seed: int, window: int) -> np.ndarray:
  """The `psnr_recent` region of every frame for a model of `window` latent frames: bool [T, H, W].
  The world's exact `visible_mask` when it has one (panorama), else a rotation-only camera from its
  `poses` (exact without translation), else the whole frame."""
  n, cfg = len(controls), env.config
  frames = FRAMES_PER_LATENT * int(window)
  if hasattr(env, "visible_mask"):
    return env.visible_mask(controls, seed, 0, n, window_frames=frames)
  if hasattr(env, "poses"):
    rotations, _, log_focals = env.poses(controls, seed)
    in_view = drift.rotation_in_view(rotations, log_focals, cfg.height, cfg.width, cfg.fov_deg)
    return drift.windowed_recent(in_view, cfg.height, cfg.width, frames, 0, n)
  return np.ones((n, cfg.height, cfg.width), bool)


def known_mask(env, controls, seed: int) -> np.ndarray:
  """The `psnr_known` region of every frame: the pixels whose ray lies inside frame 0's image (what
  a model given only frame 0 can know), bool [T, H, W]. The world's exact `known_mask` when it has
  one (panorama: `visible_mask` with window_frames = 0), else a rotation-only camera from its
  `poses` (exact without translation), else the whole frame (a still camera)."""
  n, cfg = len(controls), env.config
  if hasattr(env, "known_mask"):
    return env.known_mask(controls, seed, 0, n)
  if hasattr(env, "poses"):
    rotations, _, log_focals = env.poses(controls, seed)
    in_view = drift.rotation_in_view(rotations, log_focals, cfg.height, cfg.width, cfg.fov_deg)
    return drift.windowed_recent(in_view, cfg.height, cfg.width, 0, 0, n)
  return np.ones((n, cfg.height, cfg.width), bool)


def make_target(env, tw: TestWorld, windows: Sequence[int]) -> Target:
  """The oracle, the commanded motion (the world's own `image_shift` when it has one, panorama;
  else `drift.commanded_shift`), the recent regions and the known region of one world."""
  cfg = env.config
  homographies = drift.commanded_homographies(tw.controls, cfg.height, cfg.width, cfg.fov_deg)
  commanded = (env.image_shift(tw.controls) if hasattr(env, "image_shift")
               else drift.commanded_shift(homographies, cfg.height, cfg.width))
  warp = None
  if hasattr(env, "warp"):
    warp = functools.partial(_world_warp, env, np.asarray(tw.controls))
  return Target(_oracle(env, tw), homographies, np.asarray(commanded, np.float64),
                {w: recent_mask(env, tw.controls, tw.seed, w) for w in sorted(set(windows))},
                known_mask(env, tw.controls, tw.seed), warp)


def _world_warp(env, controls, frame, source: int, target: int):
  return env.warp(frame, controls, source, target)


# ------------------------------------------------------------------------------------------------
# Rollouts
# ------------------------------------------------------------------------------------------------


def codec_roundtrip(generator) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 video `[1 + 4k, H, W, 3]` -> the same video encoded and decoded by the generator's codec
  (whole clip, jitted), so that the references carry the models' representation ceiling."""
  import jax

  from apt2_jax.generation import stream
  from apt2_jax.models import vae as vae_lib
  vae = vae_lib.VAE(generator.vae_config)

  @jax.jit
  def fn(params, video):
    mean, _ = vae.apply(params, stream.from_uint8(video[None]), method=vae_lib.VAE.encode)
    return stream.to_uint8(vae.apply(params, mean, method=vae_lib.VAE.decode))[0]

  return lambda video: np.asarray(fn(generator.vae_params, np.asarray(video)))


def reference_curves(target: Target, window: int, roundtrip: Optional[Callable] = None) -> dict[str, dict]:
  """`drift.frame_metrics` of every reference (`drift.REFERENCES`) on one world; with `roundtrip`
  (`codec_roundtrip`) each reference's frames go through the models' codec first ("oracle" then
  is the codec's ceiling: the best frames the models' representation can hold)."""
  out = {}
  for kind in drift.REFERENCES:
    if kind in drift.WARP_REFERENCES and target.warp is None:
      continue
    frames = drift.reference_frames(target.oracle, kind, target.warp)
    if roundtrip is not None:
      frames = roundtrip(frames)
    out[kind] = drift.frame_metrics(frames, target.oracle, target.recent[window], target.homographies,
                                    known=target.known)
  return out


def stream_world(sampler: ModelStream, target: Target, tw: TestWorld, noise_seed: int, latent_steps: int,
                 keep_every: int = 0) -> tuple[dict, Optional[np.ndarray]]:
  """One model's rollout of one world from the oracle's frame 0: (its `frame_metrics` curves, the
  generated frames t with t % keep_every == 0, or None when keep_every is 0)."""
  window = sampler.spec.dit_config.window
  recent, h, oracle, known = target.recent[window], target.homographies, target.oracle, target.known
  acc, kept = drift.DriftCurves(), []

  def add(frames, a):
    b = a + len(frames)
    acc.add(frames, oracle[a:b], recent[a:b], h[a:b], None if known is None else known[a:b])
    if keep_every:
      kept.extend(f for i, f in enumerate(frames) if (a + i) % keep_every == 0)

  add(sampler.start(np.asarray(oracle[0]), tw.text_tokens, noise_seed), 0)
  for j, video in enumerate(sampler.stream(tw.controls, latent_steps)):
    add(video, 1 + FRAMES_PER_LATENT * j)
  return acc.result(), (np.stack(kept) if keep_every else None)


def noise_seed(seed: int, set_index: int, world_index: int) -> int:
  """The stream seed of (noise seed, set, world): the same for every model (paired noise)."""
  return int(np.random.SeedSequence([seed, set_index, world_index]).generate_state(1)[0] & 0x7FFFFFFF)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def _check(models: Mapping[str, ModelSpec], config: TestbedConfig):
  if not models:
    raise ValueError("evaluate_testbed needs at least one model")
  for role, name in config.roles.items():
    if role not in claims_lib.ROLES:
      raise ValueError(f"unknown role {role!r}; roles are {sorted(claims_lib.ROLES)}")
    if name not in models:
      raise ValueError(f"role {role!r} names model {name!r}, not among {sorted(models)}")
  codecs = {name: spec.vae_config for name, spec in models.items()}
  if len(set(codecs.values())) > 1:
    raise ValueError(f"every model must decode through the same codec; got {codecs}")
  for name, spec in models.items():
    if spec.dit_config.control_channels and spec.generator.control_type != "camera":
      raise ValueError(f"model {name!r} takes {spec.generator.control_type!r} controls; the testbed needs camera")
  if config.height % 16 or config.width % 16:
    raise ValueError(f"height={config.height}, width={config.width} must be multiples of 16")


def _bar(config, **kwargs):
  from tqdm import tqdm
  return tqdm(disable=not config.progress, file=sys.stderr, dynamic_ncols=True, **kwargs)


def _gif_stride(num_frames: int, max_frames: int = 240) -> int:
  return max(1, math.ceil(num_frames / max_frames))


def _run_set(set_index: int, eval_set: EvalSet, models, samplers, config: TestbedConfig, ref_window: int,
             roundtrip: Optional[Callable] = None) -> dict:
  """One evaluation set: per-world curves of the references and of every model per noise seed,
  and world 0's kept frames (first noise seed) for the GIFs."""
  env = make_env(config, eval_set)
  steps = config.latent_steps()
  num_frames = 1 + FRAMES_PER_LATENT * steps
  stride = _gif_stride(num_frames)
  windows = [ref_window] + [s.spec.dit_config.window for s in samplers.values()]
  out = {"worlds": [], "references": {k: [] for k in drift.REFERENCES}, "commanded": [],
         "models": {n: {s: [] for s in config.noise_seeds} for n in models}, "gif": {}, "gif_stride": stride}
  for tw in eval_worlds(env, eval_set, config.num_worlds, num_frames, config.fps):
    target = make_target(env, tw, windows)
    out["worlds"].append({"index": tw.index, "seed": tw.seed, "trajectory": tw.trajectory, "caption": tw.caption,
                          "hover_segments": tw.hover_segments,
                          "burst_pairs": int((np.linalg.norm(target.commanded, axis=-1) > drift.BURST_PX).sum())})
    out["commanded"].append(target.commanded)
    for kind, curves in reference_curves(target, ref_window, roundtrip).items():
      out["references"].setdefault(kind, []).append(curves)
    if tw.index == 0:
      out["gif"]["oracle"] = target.oracle[::stride]
    for seed in config.noise_seeds:
      for name, sampler in samplers.items():
        keep = stride if (tw.index == 0 and seed == config.noise_seeds[0]) else 0
        with _bar(config, total=steps, desc=f"{eval_set.name} world {tw.index} seed {seed} {name}", unit="latent") as b:
          curves, kept = stream_world(sampler, target, tw, noise_seed(seed, set_index, tw.index), steps, keep)
          b.update(steps)
        out["models"][name][seed].append(curves)
        if kept is not None:
          out["gif"][name] = kept
  return out


def _summaries(raw: dict, config: TestbedConfig) -> dict:
  """`drift.summarize` of every reference and of every model per noise seed (pooled over worlds)."""
  s = lambda curves: drift.summarize(curves, raw["commanded"], config.fps)
  return {"worlds": raw["worlds"], "gif_stride": raw["gif_stride"],
          "references": {k: s(v) for k, v in raw["references"].items() if v},
          "models": {n: {str(seed): s(c) for seed, c in per_seed.items()} for n, per_seed in raw["models"].items()}}


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


def claim_cells(sets: Mapping[str, dict], roles: Mapping[str, str]) -> dict:
  """{set: {seed: {role: summary}}} for `claims.evaluate_claims`."""
  cells = {}
  for set_name, s in sets.items():
    seeds = sorted({seed for per_seed in s["models"].values() for seed in per_seed})
    cells[set_name] = {seed: {role: s["models"][name][seed] for role, name in roles.items()
                              if seed in s["models"].get(name, {})} for seed in seeds}
  return cells


def evaluate_testbed(models: Mapping[str, ModelSpec], config: TestbedConfig, out_dir: str,
                     learning: Optional[Mapping] = None) -> dict:
  """Streams every model on every evaluation set and noise seed; writes and returns the report.

  `learning`: the stage-1 learning check (`learning.stage1_learning_check`), reported first.
  """
  _check(models, config)
  os.makedirs(out_dir, exist_ok=True)
  ref_window = int(config.window or next(iter(models.values())).dit_config.window)
  samplers = {n: ModelStream(spec, config.height, config.width, config.chunk_frames) for n, spec in models.items()}
  sets, gifs = {}, {}
  roundtrip = codec_roundtrip(next(iter(models.values())).generator)  # one codec (`_check`)
  for i, eval_set in enumerate(config.eval_sets):
    raw = _run_set(i, eval_set, models, samplers, config, ref_window, roundtrip)
    sets[eval_set.name] = _summaries(raw, config)
    late = (min(gates.A_LATE_S[0], 0.5 * config.duration()), min(gates.A_LATE_S[1], config.duration()))
    sets[eval_set.name]["statistics"] = horizon_lib.set_statistics(raw["references"], raw["models"], config.fps, late)
    gifs[eval_set.name] = write_gifs(out_dir, eval_set.name, raw["gif"], raw["gif_stride"], config)
  verdicts = gate_verdicts(sets[config.eval_sets[0].name], learning)
  role_of = {name: role for role, name in config.roles.items()}
  report = {"config": dict(config.describe(), reference_window=ref_window),
            "criteria": {"drift": drift.fixed_criteria(), "gates": gates.criteria(),
                         "horizon": {"window_s": horizon_lib.WINDOW_S, "floor_quantile": horizon_lib.FLOOR_QUANTILE,
                                     "ceiling_quantile": horizon_lib.CEILING_QUANTILE,
                                     "bootstrap_samples": horizon_lib.BOOTSTRAP_SAMPLES}},
            "definitions": drift.__doc__ + "\n\ncamera_motion: " + camera_motion.__doc__, "learning": learning,
            "models": {n: dict(spec.describe(), role=role_of.get(n), throughput=samplers[n].throughput())
                       for n, spec in models.items()},
            "sets": sets, "claims": verdicts, "gifs": gifs,
            "plots": {s: write_drift_plot(out_dir, s, sets[s], config) for s in sets}}
  return write_report(report, out_dir, config.progress)


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------


def _write_gif_under(path: str, frames: np.ndarray, fps: float, max_bytes: int) -> str:
  """A GIF of the whole of `frames` under `max_bytes`: every 2nd frame (and half the rate) until it fits."""
  while True:
    media.write_gif(path, frames, fps)
    if os.path.getsize(path) <= max_bytes or len(frames) <= 2:
      return path
    frames, fps = frames[::2], max(fps / 2, 1.0)


def write_gifs(out_dir: str, set_name: str, kept: Mapping[str, np.ndarray], stride: int, config: TestbedConfig) -> dict:
  """`gifs/<set>_<model>.gif` (generated | oracle) and `gifs/<set>_all.gif` of the frames kept
  every `stride` video frames; relative paths."""
  gif_dir = os.path.join(out_dir, "gifs")
  os.makedirs(gif_dir, exist_ok=True)
  oracle, rate = kept["oracle"], config.fps / stride
  out = {}
  for name, frames in kept.items():
    if name == "oracle":
      continue
    n = min(len(frames), len(oracle))
    path = os.path.join(gif_dir, f"{set_name}_{name}.gif")
    _write_gif_under(path, figures.side_by_side(frames[:n], oracle[:n]), rate, config.gif_max_bytes)
    out[name] = os.path.relpath(path, out_dir)
  panels = [figures._label(v, k) for k, v in kept.items()]  # pylint: disable=protected-access
  n = min(len(p) for p in panels)
  path = os.path.join(gif_dir, f"{set_name}_all.gif")
  _write_gif_under(path, figures.side_by_side(*[p[:n] for p in panels]), rate, config.gif_max_bytes)
  out["all"] = os.path.relpath(path, out_dir)
  return out


def write_drift_plot(out_dir: str, set_name: str, summaries: Mapping, config: TestbedConfig) -> str:
  """`drift_<set>.png`: psnr_known per bin, each model (one line per noise seed; its psnr_recent thin
  and faint), copy-last and frozen-first (dashed, dotted) and the good-horizon threshold (dotted red).
  Bins without a known region are gaps."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
  def centre(s):  # the middle of each bin's generated frames (the last bin may be partial)
    start = np.asarray(s["bins"]["start_s"], np.float64)
    return start + np.minimum(drift.BIN_S, s["duration_s"] - start) / 2
  for i, (name, per_seed) in enumerate(summaries["models"].items()):
    for j, (seed, s) in enumerate(per_seed.items()):
      ax.plot(centre(s), s["bins"]["psnr_known"], "-o", ms=3, color=f"C{i % 10}", alpha=1.0 if j == 0 else 0.5,
              label=f"{name} (seed {seed})")
      if j == 0:
        ax.plot(centre(s), s["bins"]["psnr_recent"], "-", lw=0.7, color=f"C{i % 10}", alpha=0.35)
  for style, kind in (("--", "warp_last"), ("-.", "one_step_back"), (":", "frozen_first"), ("--", "copy_last")):
    if kind not in summaries["references"]:
      continue
    s = summaries["references"][kind]
    ax.plot(centre(s), s["bins"]["psnr_known"], style, color="k", lw=1.2, label=f"{kind} (reference)")
  threshold = summaries.get("statistics", {}).get("threshold", {}).get("threshold_db", drift.GOOD_PSNR)
  ax.axhline(threshold, color="r", ls=":", lw=1, label=f"horizon threshold {threshold:.1f} dB")
  ax.set_xlabel("seconds")
  ax.set_ylabel("psnr_known (dB)")
  ax.set_title(f"{config.world}, {set_name}: psnr_known (frame 0's region) per {drift.BIN_S:g} s bin; "
               f"psnr_recent thin", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6, loc="best")
  fig.tight_layout()
  path = os.path.join(out_dir, f"drift_{set_name}.png")
  fig.savefig(path)
  plt.close(fig)
  return os.path.relpath(path, out_dir)


def _fmt(x, f="{:.2f}") -> str:
  return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f.format(x)


def summary_table(set_name: str, s: Mapping) -> str:
  """Markdown: one row per model and noise seed, then the references."""
  head = ("| model | seed | good horizon s | psnr_known mean | late psnr_known | known frames | "
          "psnr_recent mean | psnr_recent horizon s | motion_ratio | on bursts | warp error | late blur | "
          "late colour drift |")
  lines = [f"### {set_name}", "", head, "|" + "---|" * (head.count("|") - 1)]
  rows = [(n, seed, x) for n, per_seed in s["models"].items() for seed, x in per_seed.items()]
  rows += [(f"*{k}*", "-", x) for k, x in s["references"].items()]
  for name, seed, x in rows:
    o, late = x["overall"], x["late"]
    h = _fmt(x["horizon_s"], "{:.1f}") + ("+" if x["horizon_reached_end"] else "")
    hr = _fmt(x.get("horizon_recent_s"), "{:.1f}") + ("+" if x.get("horizon_recent_reached_end") else "")
    lines.append(f"| {name} | {seed} | {h} | {_fmt(o.get('psnr_known'))} | {_fmt(late.get('psnr_known'))} | "
                 f"{_fmt(o.get('known_frames'))} | {_fmt(o['psnr_recent'])} | {hr} | "
                 f"{_fmt(o['motion_ratio'])} | {_fmt(o['motion_ratio_burst'])} | {_fmt(o['warp_error'])} | "
                 f"{_fmt(late['blur'])} | {_fmt(late['colour_drift'])} |")
  return "\n".join(lines)


def markdown(report: Mapping) -> str:
  cfg = report["config"]
  lines = [f"# Testbed: {cfg['world']}, {cfg['num_worlds']} worlds per set, noise seeds {cfg['noise_seeds']}, "
           f"{cfg['seconds']:g} s rollouts", "",
           gates.gates_table(report), "", "## Drift summaries",
           f"(good horizon: trailing {drift.HORIZON_WINDOW_S:g} s mean of psnr_known (PSNR on the pixels of "
           f"frame 0's content; frames with under {100 * drift.KNOWN_MIN_FRACTION:g}% of it skipped) below "
           f"{drift.GOOD_PSNR:g} dB; '+': never, a lower bound; late: the last "
           f"{100 * drift.LATE_FRACTION:g}%; known frames: the share of frames with a psnr_known; psnr_recent "
           f"(pixels seen within the model's window, which scores generated content) is secondary; "
           f"motion_ratio: the block-robust estimate (`drift.motion_scales`); bursts: commanded motion > "
           f"{drift.BURST_PX:g} px per frame)", ""]
  for name, s in report["sets"].items():
    lines += [summary_table(name, s), ""]
  return "\n".join(lines)


def write_report(report: Mapping, out_dir: str, progress: bool = True) -> dict:
  """`report.json` and `claims.md`, each whole or not at all (`disk.write_atomic`; a full disk is
  one line); returns the JSON-able report."""
  from apt2_jax import disk
  report = _jsonable(report)
  disk.write_atomic(os.path.join(out_dir, "report.json"), json.dumps(report, indent=1), "testbed report")
  text = markdown(report)
  disk.write_atomic(os.path.join(out_dir, "claims.md"), text + "\n", "testbed report")
  if progress:
    print(text, flush=True)
  return report
