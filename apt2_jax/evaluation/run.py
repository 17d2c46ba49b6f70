"""`evaluate_models`: every model streamed on the same held-out worlds, compared with the oracle.

Per world: the oracle is rendered once into memory-mapped scratch files (bounded memory); the
references are computed; then each model starts from the oracle's frame 0 with the world's caption
and streams the world's controls with the same per-step noise seed (paired across models), frame
by frame into the metrics, the MP4 and the GIF.
"""
from __future__ import annotations

import dataclasses
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
from apt2_jax.evaluation.oracle import (TestWorld, held_out_worlds, render_oracle, visible_mask,
                                        world_background)
from apt2_jax.evaluation.sampler import FRAMES_PER_LATENT, ModelSpec, Sampler

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


def _noise_seed(seed: int, world_index: int) -> int:
  """The stream seed of a world: the same for every model (paired noise)."""
  return int(np.random.SeedSequence([seed, world_index]).generate_state(1)[0] & 0x7FFFFFFF)


def _evaluate_model(run: _Run, name: str, sampler: Sampler, tw: TestWorld, target: _Target,
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


def _evaluate_world(run: _Run, tw: TestWorld, models: Mapping[str, ModelSpec], samplers: Mapping[str, Sampler],
                    results: dict, references: dict, scratch: str):
  """One held-out world: the oracle, the references, every model; appends to `results` and
  `references`; writes the world's all-models GIF."""
  target = _render_target(run, tw, scratch)
  # References: the VAE's reconstruction of the oracle (the ceiling of any model behind this VAE)
  # and a frozen frame 0 (the floor of a model that ignores the controls).
  references["vae_reconstruction"].append(refs_lib.vae_reference(next(iter(models.values())), target.oracle, run.fps))
  references["frozen_frame0"].append(refs_lib.frozen_frame_curves(target.oracle))
  panels = {"oracle": np.array(target.oracle[:run.gif_frames])}
  noise_seed = _noise_seed(run.seed, tw.index)
  for name in models:
    entry, kept = _evaluate_model(run, name, samplers[name], tw, target, noise_seed)
    results[name].append(entry)
    if kept is not None:
      panels[name] = kept
  if run.video_dir:
    labelled = [figures._label(v, k) for k, v in panels.items()]  # pylint: disable=protected-access
    n = min(len(p) for p in labelled)
    figures.write_small_gif(os.path.join(run.video_dir, f"world{tw.index}_all.gif"),
                            figures.side_by_side(*[p[:n] for p in labelled]), run.fps)


def _setup(models, world, seconds, fps, height, width, out_dir, seed, progress, gif_seconds, write_videos,
           world_config) -> _Run:
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
  video_dir = os.path.join(out_dir, "videos") if write_videos else None
  if video_dir:
    os.makedirs(video_dir, exist_ok=True)
  return _Run(world, worlds_lib.make_world(world, wcfg), fps, height, width, durations, latent_steps, num_frames,
              out_dir, video_dir, max(2, int(round(gif_seconds * fps))), progress, seed, wcfg)


def evaluate_models(models: Mapping[str, ModelSpec], *, world: str = "camera", num_worlds: int = 2,
                    seconds: float | Sequence[float] = 60.0, fps: float = 24.0,
                    height: Optional[int] = None, width: Optional[int] = None,
                    out_dir: str = "eval", seed: int = 0, progress: bool = True,
                    good_psnr: float = 20.0, chunk_frames: int = 24, gif_seconds: float = 4.0,
                    write_videos: bool = True, world_config: Optional[Mapping[str, Any]] = None) -> dict:
  """Streams every model on the same held-out worlds and compares it with the oracle.

  Args:
    models: name -> ModelSpec (e.g. `model_spec_from_workdir`).
    world: "camera", "puppet" or "bouncing".
    num_worlds: test worlds (`split_seed("test", k)`, k < num_worlds).
    seconds: rollout duration(s); the longest is run, each is summarised on its prefix.
      `seconds * fps` video frames, rounded up to whole latent frames (+ frame 0).
    height, width: pixels (multiples of 16); default: the first model's training resolution.
    seed: the noise seed (the same for every model; combined with the world index).
    good_psnr: dB threshold of the good horizon.
    chunk_frames: latent frames per compiled DiT call (bounded memory; the last is padded).
    gif_seconds: length of the GIFs (the MP4s hold the whole rollout).
    world_config: extra `WorldConfig` fields (e.g. speed) for the worlds.
  Returns:
    the report (also written to `out_dir/report.json`), see `apt2_jax.evaluation`.
  """
  if not models:
    raise ValueError("evaluate_models needs at least one model")
  run = _setup(models, world, seconds, fps, height, width, out_dir, seed, progress, gif_seconds,
                     write_videos, world_config)
  tests = held_out_worlds(run.env, num_worlds, run.num_frames, fps)
  samplers = {name: Sampler(spec, run.height, run.width, chunk_frames) for name, spec in models.items()}
  results = {name: [] for name in models}
  references = {"vae_reconstruction": [], "frozen_frame0": []}
  scratch = tempfile.mkdtemp(prefix="oracle_", dir=out_dir)
  try:
    for tw in tests:
      _evaluate_world(run, tw, models, samplers, results, references, scratch)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  config = {"world": world, "num_worlds": num_worlds, "seconds": run.durations, "fps": fps,
            "height": run.height, "width": run.width, "seed": seed, "latent_frames": run.latent_steps + 1,
            "video_frames": run.num_frames, "chunk_frames": chunk_frames, "good_psnr": good_psnr,
            "psnr_cap": PSNR_CAP, "world_seeds": [t.seed for t in tests],
            "world_config": dataclasses.asdict(run.world_config), "definitions": report_lib.DEFINITIONS}
  throughputs = {name: s.throughput() for name, s in samplers.items()}
  entries, refs, mean_curves = report_lib.model_entries(models, throughputs, results, references, config)
  plots = figures.write_plots(out_dir, world, mean_curves, refs["frozen_frame0"]["mean_curves"], fps)
  report = {"config": config, "models": entries, "references": refs,
            "plots": {k: os.path.relpath(v, out_dir) for k, v in plots.items()}}
  return report_lib.write_report(report, out_dir, progress)
