"""`evaluate_models`: every model streamed on the same worlds of each evaluation set, compared with
the oracle and with references that pass through the same VAE.

Evaluation sets (`oracle.EVAL_SPLITS`), reported separately: `in_distribution` (validation-split
worlds, drawn like training's: the training textures and trajectory types, so the trained caption
words; the summary's metrics are measured here: `report["models"]`, `report["references"]`) and
`held_out` (test-split worlds: unseen textures, the held-out trajectory and caption words;
generalisation: `report["held_out"]`). Each world's trajectory continues training's control
sampler (`oracle.long_controls`: training's speeds, no hovering); `report["sets"][set]["motion"]`
compares the oracle's median motion per latent step with the training clips'.

Per world: the oracle is rendered once into memory-mapped scratch files (bounded memory); the
references are computed (`references.world_references`: the VAE ceiling, copy-last and frozen
frame 0 through the first model's VAE, and a flat colour); then each model starts from the oracle's
frame 0 with the world's caption and streams the world's controls with the same per-step noise
seed (paired across models), frame by frame into the metrics, the MP4 and the GIF.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from apt2_jax import media
from apt2_jax.controls import WORLD_CONTROL_TYPES
from apt2_jax.data import worlds as worlds_lib
from apt2_jax.evaluation import figures
from apt2_jax.evaluation import references as refs_lib
from apt2_jax.evaluation import report as report_lib
from apt2_jax.evaluation.metrics import (PSNR_CAP, figure_metrics, masked_mean_ssim, phase_correlation,
                                         psnr, ssim_map)
from apt2_jax.evaluation.oracle import (EVAL_SPLITS, TestWorld, eval_worlds, render_oracle, training_motion,
                                        visible_mask, world_background)
from apt2_jax.evaluation.models import FRAMES_PER_LATENT, ModelSpec, ModelStream

CURVES = ("psnr", "ssim", "psnr_visible", "ssim_visible", "visible_fraction")
FIGURE_CURVES = ("figure_psnr", "figure_iou", "figure_centroid_error_px")


@dataclasses.dataclass
class _Run:
  """One evaluation's settings and derived sizes."""
  world: str
  env: Any
  fps: float
  height: int
  width: int
  durations: list
  latent_steps: int       # generated latent frames
  num_frames: int         # video frames, frame 0 included
  out_dir: str
  video_dir: Optional[str]  # None: no videos
  gif_frames: int
  progress: bool
  seed: int
  world_config: Any       # the worlds' `WorldConfig`
  chunk_frames: int = 24  # latent frames per compiled call (models and the references' VAE)

  def bar(self, **kwargs):
    from tqdm import tqdm
    return tqdm(disable=not self.progress, file=sys.stderr, dynamic_ncols=True, **kwargs)


@dataclasses.dataclass
class _Target:
  """A world's oracle (memory-mapped uint8 [T, H, W, 3]), visible region, background, and the
  oracle's motion per latent step (camera)."""
  oracle: np.ndarray
  visible: np.ndarray
  background: Optional[np.ndarray]
  motion: Optional[np.ndarray]


class _Curves:
  """Accumulates one model's per-frame metrics on one world, its video and its first GIF frames."""

  def __init__(self, target: _Target, writer, gif_frames: int):
    self.target, self.writer, self.gif_frames = target, writer, gif_frames
    self.curves = {k: [] for k in CURVES}
    self.extra = {k: [] for k in FIGURE_CURVES}
    self.motion, self.kept, self.previous = [], [], None

  def add(self, frames: np.ndarray, a: int):
    """Frames `[n, H, W, 3]` that start at video frame `a`."""
    t = self.target
    ref, vis = np.asarray(t.oracle[a:a + len(frames)]), np.asarray(t.visible[a:a + len(frames)])
    smap = ssim_map(frames, ref)
    for key, value in (("psnr", psnr(frames, ref, cap=PSNR_CAP)), ("ssim", masked_mean_ssim(smap)),
                       ("psnr_visible", psnr(frames, ref, vis, cap=PSNR_CAP)),
                       ("ssim_visible", masked_mean_ssim(smap, vis)),
                       ("visible_fraction", vis.mean(axis=(-2, -1)))):
      self.curves[key].append(value)
    if t.background is not None:
      for k, v in figure_metrics(frames, ref, t.background).items():
        self.extra[k].append(v)
    if t.motion is not None and self.previous is not None:
      self.motion.append(phase_correlation(self.previous, frames[-1]))
    self.previous = frames[-1]
    if self.writer is not None:
      self.writer.write(figures.side_by_side(frames, ref))
    if sum(len(k) for k in self.kept) < self.gif_frames:
      self.kept.append(frames)

  def result(self) -> dict[str, np.ndarray]:
    out = {k: np.concatenate(v) for k, v in self.curves.items()}
    if self.target.background is not None:
      out.update({k: np.concatenate(v) for k, v in self.extra.items()})
    if self.target.motion is not None:
      out["control_error_px"] = np.linalg.norm(np.array(self.motion) - self.target.motion, axis=-1)
      out["oracle_motion_px"] = np.linalg.norm(self.target.motion, axis=-1)
    return out


def _render_target(run: _Run, tw: TestWorld, scratch: str) -> _Target:
  """Renders a world's oracle and visible region into memory-mapped files under `scratch`."""
  n, h, w = run.num_frames, run.height, run.width
  oracle = np.lib.format.open_memmap(os.path.join(scratch, f"oracle{tw.index}.npy"), "w+", np.uint8, (n, h, w, 3))
  visible = np.lib.format.open_memmap(os.path.join(scratch, f"visible{tw.index}.npy"), "w+", bool, (n, h, w))
  with run.bar(total=n, desc=f"oracle world {tw.index}", unit="frame") as b:
    # Camera and puppet frames render independently; other worlds simulate from frame 0.
    step = 96 if run.world in ("camera", "puppet") else n
    for a in range(0, n, step):
      z = min(n, a + step)
      oracle[a:z] = render_oracle(run.env, tw.controls, tw.seed, a, z)
      visible[a:z] = visible_mask(run.env, tw.controls, tw.seed, a, z)
      b.update(z - a)
  motion = None
  if run.world == "camera":
    motion = np.array([phase_correlation(oracle[4 * j - 4], oracle[4 * j]) for j in range(1, run.latent_steps + 1)])
  return _Target(oracle, visible, world_background(run.env, tw.seed), motion)


def _noise_seed(seed: int, world_seed: int) -> int:
  """The stream seed of a world: the same for every model (paired noise)."""
  return int(np.random.SeedSequence([seed, world_seed]).generate_state(1)[0] & 0x7FFFFFFF)


def _evaluate_model(run: _Run, name: str, sampler: ModelStream, tw: TestWorld, target: _Target,
                    noise_seed: int) -> tuple[dict, Optional[np.ndarray]]:
  """Streams one model on one world: (the world's report entry, its first GIF frames or None)."""
  stem = os.path.join(run.video_dir, f"{name}_world{tw.index}") if run.video_dir else None
  writer = media.VideoWriter(stem + ".mp4", run.fps) if stem else None
  acc = _Curves(target, writer, run.gif_frames)
  try:
    acc.add(sampler.start(np.array(target.oracle[0]), tw.text_tokens, noise_seed), 0)
    with run.bar(total=run.latent_steps, desc=f"{name} world {tw.index}", unit="latent frame") as b:
      for j, video in enumerate(sampler.stream(tw.controls, run.latent_steps)):
        acc.add(video, 1 + FRAMES_PER_LATENT * j)
        b.update(1)
  finally:
    if writer is not None:
      writer.close()
  entry = {"world_index": tw.index, "seed": tw.seed, "trajectory": tw.trajectory, "caption": tw.caption,
           "hover_segments": tw.hover_segments, "curves": acc.result()}
  if stem is None:
    return entry, None
  kept = np.concatenate(acc.kept)[:run.gif_frames]
  figures.write_small_gif(stem + ".gif", figures.side_by_side(kept, np.array(target.oracle[:len(kept)])), run.fps)
  entry["videos"] = {"mp4": os.path.relpath(stem + ".mp4", run.out_dir),
                     "gif": os.path.relpath(stem + ".gif", run.out_dir)}
  return entry, kept


def _evaluate_world(run: _Run, tw: TestWorld, models: Mapping[str, ModelSpec], samplers: Mapping[str, ModelStream],
                    results: dict, references: dict, scratch: str, video_dir: Optional[str]):
  """One world: the oracle, the references, every model; appends to `results` and `references`;
  writes the world's all-models GIF under `video_dir`."""
  target = _render_target(run, tw, scratch)
  refs = refs_lib.world_references(next(iter(models.values())), target.oracle, run.chunk_frames)
  for name, curves in refs.items():
    references[name].append(curves)
  n = refs_lib.reference_frames(run.num_frames, run.fps)
  references["vae_reconstruction"].append({"psnr": float(np.mean(refs["vae_ceiling"]["psnr"][:n])),
                                           "ssim": float(np.mean(refs["vae_ceiling"]["ssim"][:n])), "frames": n})
  references["motion"].append(None if target.motion is None else np.linalg.norm(target.motion, axis=-1))
  panels = {"oracle": np.array(target.oracle[:run.gif_frames])}
  noise_seed = _noise_seed(run.seed, tw.seed)
  run_videos = dataclasses.replace(run, video_dir=video_dir)
  for name in models:
    entry, kept = _evaluate_model(run_videos, name, samplers[name], tw, target, noise_seed)
    results[name].append(entry)
    if kept is not None:
      panels[name] = kept
  if video_dir:
    labelled = [figures._label(v, k) for k, v in panels.items()]  # pylint: disable=protected-access
    n = min(len(p) for p in labelled)
    figures.write_small_gif(os.path.join(video_dir, f"world{tw.index}_all.gif"),
                            figures.side_by_side(*[p[:n] for p in labelled]), run.fps)


def _setup(models, world, seconds, fps, height, width, out_dir, seed, progress, gif_seconds, write_videos,
           world_config, chunk_frames) -> _Run:
  """The run's settings and world (`make_world`); checks that the models take the world's controls."""
  first = next(iter(models.values()))
  height, width = int(height or first.height or 64), int(width or first.width or 64)
  durations = sorted({float(s) for s in (seconds if isinstance(seconds, (list, tuple)) else [seconds])})
  if durations[0] <= 0:
    raise ValueError(f"seconds={seconds} must be positive")
  kind = WORLD_CONTROL_TYPES[world]
  for name, spec in models.items():
    g = spec.generator
    if spec.dit_config.control_channels and g.control_type != kind:
      raise ValueError(f"model {name!r} takes {g.control_type!r} controls, the {world!r} world gives {kind!r}")
  latent_steps = max(1, math.ceil(durations[-1] * fps / FRAMES_PER_LATENT))
  num_frames = 1 + FRAMES_PER_LATENT * latent_steps
  wcfg = worlds_lib.WorldConfig(height=height, width=width, num_frames=num_frames, **dict(world_config or {}))
  os.makedirs(out_dir, exist_ok=True)
  return _Run(world, worlds_lib.make_world(world, wcfg), fps, height, width, durations, latent_steps, num_frames,
              out_dir, os.path.join(out_dir, "videos") if write_videos else None,
              max(2, int(round(gif_seconds * fps))), progress, seed, wcfg, int(chunk_frames))


SET_ROLES = {"in_distribution": "worlds drawn like training's (training textures, trajectory types and caption "
                                "words; validation seeds)",
             "held_out": "generalisation: test-split worlds (unseen textures, the held-out spiral trajectory and "
                         "their caption words)"}


def _reference_summaries(references: Mapping[str, list], config: Mapping[str, Any], relative: float) -> dict:
  """report["references"][name] = {"summary", "mean_curves"} of each `refs_lib.REFERENCES` but frozen
  frame 0 (`report.model_entries` has it), and `vae_vs_flat`."""
  out = {}
  for name in refs_lib.REFERENCES:
    if name == "frozen_frame0":
      continue
    mean = report_lib._mean_curves(references[name])  # pylint: disable=protected-access
    out[name] = {"summary": report_lib._summaries(mean, config["seconds"], config["fps"], config["good_psnr"],  # pylint: disable=protected-access
                                                  config["video_frames"], relative),
                 "mean_curves": mean}
  out["vae_vs_flat"] = refs_lib.vae_vs_flat(references["vae_ceiling"], references["flat_colour"])
  return out


def _evaluate_set(run: _Run, set_name: str, num_worlds: int, models, samplers, config) -> dict:
  """One evaluation set: {"models", "references", "plots", "mean_curves", "set"} (paths relative to
  `run.out_dir`; the first set writes to `out_dir` itself, the others to `out_dir/<set>`)."""
  split = EVAL_SPLITS[set_name]
  tests = eval_worlds(run.env, num_worlds, run.num_frames, run.fps, split=split)
  set_dir = run.out_dir if set_name == config["primary_set"] else os.path.join(run.out_dir, set_name)
  video_dir = os.path.join(set_dir, "videos") if run.video_dir else None
  for d in (set_dir, video_dir):
    if d:
      os.makedirs(d, exist_ok=True)
  results = {name: [] for name in models}
  references = {k: [] for k in (*refs_lib.REFERENCES, "vae_reconstruction", "motion")}
  scratch = tempfile.mkdtemp(prefix="oracle_", dir=run.out_dir)
  try:
    for tw in tests:
      _evaluate_world(run, tw, models, samplers, results, references, scratch, video_dir)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  throughputs = {name: s.throughput() for name, s in samplers.items()}
  entries, refs, mean_curves = report_lib.model_entries(models, throughputs, results, references, config)
  relative = refs["vae_reconstruction"]["psnr"] - report_lib.RELATIVE_HORIZON_DB
  refs.update(_reference_summaries(references, config, relative))
  refs["definitions"] = refs_lib.DEFINITIONS
  shown = {**mean_curves, **{f"{k.replace('_', ' ')} (reference)": refs[k]["mean_curves"]
                             for k in ("vae_ceiling", "copy_last", "flat_colour")}}
  plots = figures.write_plots(set_dir, run.world, shown, refs["frozen_frame0"]["mean_curves"], run.fps)
  motion = [m for m in references["motion"] if m is not None]
  set_info = {"split": split, "role": SET_ROLES.get(set_name, split), "num_worlds": num_worlds,
              "world_seeds": [t.seed for t in tests], "trajectories": [t.trajectory for t in tests],
              "captions": [t.caption for t in tests], "hover_segments": [t.hover_segments for t in tests]}
  if motion:
    set_info["oracle_motion_px_median"] = float(np.median(np.concatenate(motion)))
  return {"models": entries, "references": refs,
          "plots": {k: os.path.relpath(v, run.out_dir) for k, v in plots.items()}, "set": set_info}


def _motion_check(run: _Run, sets: Mapping[str, dict], clip_frames: int) -> Optional[dict]:
  """Camera: the median image motion per latent step (pixels) of the training clips (`World.sample`,
  train split, `clip_frames` frames) against each set's oracle; ratio = set / training."""
  if run.world != "camera" or clip_frames < 1 + FRAMES_PER_LATENT:
    return None
  train = float(np.median(training_motion(run.env, 16, clip_frames)))
  out = {"training_clips": 16, "training_clip_frames": clip_frames, "training_median_px": train}
  for name, s in sets.items():
    m = s["set"].get("oracle_motion_px_median")
    out[name] = {"median_px": m, "ratio_to_training": None if m is None or train <= 0 else m / train}
  return out


def _set_markdown(name: str, s: Mapping[str, Any], config: Mapping[str, Any], primary: bool) -> str:
  """One set's section of summary.md: the models' table, the references' table, VAE vs flat colour."""
  info = s["set"]
  fmt = lambda x, f="{:.2f}": "n/a" if x is None else f.format(x)
  head = f"## {name} ({'the metrics' if primary else 'reported separately'}): {info['role']}"
  head = head.replace("separately): generalisation:", "separately, generalisation):")
  table = report_lib.summary_table({"config": dict(config, num_worlds=info["num_worlds"]), "models": s["models"],
                                    "references": s["references"]})
  table = table.replace(" held-out world(s)", f" {name} world(s) ({info['split']} split: "
                        f"{', '.join(info['trajectories'])})")
  lines = [head, "", table, "", "| reference | duration | PSNR mean | PSNR first 10 s | PSNR last 10 s | SSIM mean | "
           f"good horizon (s, PSNR >= {config['good_psnr']:g}) |", "|---|---|---|---|---|---|---|"]
  refs = s["references"]
  for ref in refs_lib.REFERENCES:
    for dur, sm in refs[ref]["summary"].items():
      ps = sm["psnr"]
      horizon = fmt(ps.get("good_horizon_s"), "{:.1f}") + ("+" if ps.get("good_horizon_reached_end") else "")
      lines.append(f"| {ref} | {dur} | {fmt(ps['mean'])} | {fmt(ps['first_10s'])} | {fmt(ps['last_10s'])} | "
                   f"{fmt(sm['ssim']['mean'], '{:.3f}')} | {horizon} |")
  v = refs["vae_vs_flat"]
  verdict = "a clear margin" if v["clear_margin"] else f"NOT a clear margin (< {v['threshold_db']:g} dB)"
  lines += ["", f"VAE vs flat colour on these clips: the VAE's reconstruction PSNR {v['vae_psnr']:.2f} dB, frame 0's "
            f"flat colour {v['flat_psnr']:.2f} dB: {v['margin_db']:+.2f} dB, {verdict}."]
  if info.get("oracle_motion_px_median") is not None and config.get("motion"):
    m = config["motion"]
    lines.append(f"Motion: the oracle's median image motion per latent step {info['oracle_motion_px_median']:.2f} px, "
                 f"the training clips' {m['training_median_px']:.2f} px (ratio "
                 f"{fmt(m[name]['ratio_to_training'])}); hovering segments: {sum(info['hover_segments'])}.")
  return "\n".join(lines)


def evaluate_models(models: Mapping[str, ModelSpec], *, world: str = "camera", num_worlds: int = 2,
                    seconds: float | Sequence[float] = 60.0, fps: float = 24.0,
                    height: Optional[int] = None, width: Optional[int] = None,
                    out_dir: str = "eval", seed: int = 0, progress: bool = True,
                    good_psnr: float = 20.0, chunk_frames: int = 24, gif_seconds: float = 4.0,
                    write_videos: bool = True, world_config: Optional[Mapping[str, Any]] = None,
                    eval_sets: Sequence[str] = ("in_distribution", "held_out"),
                    training_clip_frames: int = 17) -> dict:
  """Streams every model on the same worlds of each evaluation set and compares it with the oracle.

  Args:
    models: name -> ModelSpec (e.g. `model_spec_from_workdir`).
    world: "camera", "puppet" or "bouncing".
    num_worlds: worlds per set (`split_seed(split, k)`, k < num_worlds).
    seconds: rollout duration(s); the longest is run, each is summarised on its prefix.
      `seconds * fps` video frames, rounded up to whole latent frames (+ frame 0).
    height, width: pixels (multiples of 16); default: the first model's training resolution.
    seed: the noise seed (the same for every model; combined with the world's seed).
    good_psnr: dB threshold of the good horizon.
    chunk_frames: latent frames per compiled DiT call (bounded memory; the last is padded).
    gif_seconds: length of the GIFs (the MP4s hold the whole rollout).
    world_config: extra `WorldConfig` fields (e.g. speed) for the worlds (training's data options).
    eval_sets: names in `oracle.EVAL_SPLITS`; the first is the primary set (the report's top-level
      "models", "references", "plots"), each other one is under `report[name]` (and `out_dir/name`).
    training_clip_frames: video frames of the training clips (the motion check).
  Returns:
    the report (also written to `out_dir/report.json`, and `summary.md`), see `apt2_jax.evaluation`.
  """
  if not models:
    raise ValueError("evaluate_models needs at least one model")
  eval_sets = tuple(eval_sets)
  unknown = [s for s in eval_sets if s not in EVAL_SPLITS]
  if not eval_sets or unknown:
    raise ValueError(f"eval_sets={eval_sets}: expected names from {tuple(EVAL_SPLITS)}")
  run = _setup(models, world, seconds, fps, height, width, out_dir, seed, progress, gif_seconds,
               write_videos, world_config, chunk_frames)
  samplers = {name: ModelStream(spec, run.height, run.width, chunk_frames) for name, spec in models.items()}
  config = {"world": world, "num_worlds": num_worlds, "seconds": run.durations, "fps": fps,
            "height": run.height, "width": run.width, "seed": seed, "latent_frames": run.latent_steps + 1,
            "video_frames": run.num_frames, "chunk_frames": chunk_frames, "good_psnr": good_psnr,
            "psnr_cap": PSNR_CAP, "eval_sets": list(eval_sets), "primary_set": eval_sets[0],
            "world_config": dataclasses.asdict(run.world_config),
            "definitions": report_lib.DEFINITIONS + "\n\n" + refs_lib.DEFINITIONS}
  sets = {name: _evaluate_set(run, name, num_worlds, models, samplers, config) for name in eval_sets}
  config["world_seeds"] = sets[eval_sets[0]]["set"]["world_seeds"]
  config["motion"] = _motion_check(run, sets, training_clip_frames)
  primary = sets[eval_sets[0]]
  report = {"config": config, "models": primary["models"], "references": primary["references"],
            "plots": primary["plots"], "sets": {k: v["set"] for k, v in sets.items()}}
  for name in eval_sets[1:]:
    report[name] = {k: sets[name][k] for k in ("models", "references", "plots")}
  report = report_lib._jsonable(report)  # pylint: disable=protected-access
  from apt2_jax import disk  # whole files or none (a full disk is one line)
  disk.write_atomic(os.path.join(out_dir, "report.json"), json.dumps(report, indent=1), "evaluation report")
  sections = [_set_markdown(name, {**(report if i == 0 else report[name]), "set": report["sets"][name]},
                            report["config"], i == 0) for i, name in enumerate(eval_sets)]
  text = f"# {world} world evaluation\n\n" + "\n\n".join(sections)
  disk.write_atomic(os.path.join(out_dir, "summary.md"), text + "\n", "evaluation report")
  if progress:
    print(text, flush=True)
  return report
