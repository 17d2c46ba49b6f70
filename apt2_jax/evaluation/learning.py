"""The stage-1 learning check: does the diffusion-adapted model learn its world in distribution?

Reported before any stage-3 claim (a drift comparison means nothing if stage 1 never learned):

  teacher_forced  on in-distribution clips (`validation` seeds, drawn as training's), the model's
                  one-step prediction of each latent frame s + 1 from a noised target at a fixed
                  t = `TEACHER_FORCED_T` (0.5, unshifted: half signal, half noise; the middle of
                  what the shifted training schedule covers) with the clean recycled frame s, its
                  controls and the caption: `x0_hat = x_t - t v`. Compared with the
                  copy-last-latent-frame predictor (frame s + 1 := frame s) in normalised latent
                  MSE (the criterion: `beats_copy_last` when the model's MSE is lower) and in
                  pixel PSNR (frames of latent s + 1 decoded by the codec vs the frames of latent s,
                  frame 0 repeated for the first). `teacher_forced_pure` is the same at t = 1
                  (`TEACHER_FORCED_T_PURE`: nothing of frame s + 1 in the input; only the context
                  and the controls can beat copying).
  rollout         the model streamed with its multi-step Euler sampler on in-distribution worlds
                  (`oracle.IN_DISTRIBUTION`; default: one training clip's length):
                  `motion_ratio` overall and on bursts (`drift`), beside the oracle's own.

    result = stage1_learning_check("runs/testbed/adapt", {"pano_burst_fraction": 0.25})
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from apt2_jax import controls as controls_lib
from apt2_jax.data import worlds as worlds_lib
from apt2_jax.evaluation import drift
from apt2_jax.evaluation import gates
from apt2_jax.evaluation.metrics import PSNR_CAP, psnr
from apt2_jax.generation import prompt as prompt_lib
from apt2_jax.generation import stream
from apt2_jax.models import CausalDiT
from apt2_jax.models import vae as vae_lib
from apt2_jax.objectives import flow

TEACHER_FORCED_T = 0.5
# Pure noise in the target slot: the next frame must come from the context and the controls alone
# (the regime a rollout's first Euler step is in); reported beside TEACHER_FORCED_T.
TEACHER_FORCED_T_PURE = 1.0


@functools.lru_cache(maxsize=4)
def _teacher_forced_fn(dit_config, vae_config, encoding: str, t: float):
  """jit: (params, vae params, video uint8 [1, T, H, W, 3], controls [1, T, D] or None, prompt,
  key) -> (clean latents [1, F, h, w, C], x0_hat of frames 1.. [1, F-1, h, w, C])."""
  model, vae = CausalDiT(dit_config), vae_lib.VAE(vae_config)

  def fn(params, vae_params, video, controls, prompt, key):
    mean, _ = vae.apply(vae_params, stream.from_uint8(video), method=vae_lib.VAE.encode)
    latents = vae_lib.normalize_latents(mean, vae_config).astype(jnp.float32)
    b, f, h, w, _ = latents.shape
    maps = None if controls is None else controls_lib.latent_control_maps(controls, f, h, w, encoding)
    recycled, x0, ctrl = flow.teacher_forcing_inputs(latents, maps)
    tt = jnp.full((b,), t, jnp.float32)
    xt = flow.noisy(x0, jax.random.normal(key, x0.shape, jnp.float32), tt)
    v = model.apply({"params": params}, xt, recycled, ctrl, tt, prompt, mode="block_causal")
    return latents, xt - t * v
  return jax.jit(fn)


def _decode(vae_config, vae_params, latents) -> np.ndarray:
  """Normalised latents [1, F, h, w, C] -> uint8 video [1 + 4 (F - 1), H, W, 3] (whole clip)."""
  vae = vae_lib.VAE(vae_config)
  z = vae_lib.denormalize_latents(jnp.asarray(latents), vae_config)
  return np.asarray(stream.to_uint8(vae.apply(vae_params, z, method=vae_lib.VAE.decode)))[0]


def copy_last_latent_frames(video: np.ndarray) -> np.ndarray:
  """The copy-last-latent-frame predictor in pixels: video frame 4j - 3 + k (latent frame j >= 1)
  := frame 4 (j - 1) - 3 + k, frame 0 for j = 1; frame 0 is itself. uint8 like `video`."""
  t = np.arange(len(video))
  src = np.where(t == 0, 0, np.maximum(t - drift.FRAMES_PER_LATENT, 0))
  return np.asarray(video)[src]


def teacher_forced_check(generator, clips, t: float = TEACHER_FORCED_T, seed: int = 0) -> dict:
  """The teacher-forced one-step check of a `generation.Generator` on clips (dicts with uint8
  `video` [T, H, W, 3], `controls` [T, D], `text_tokens`), see the module docstring."""
  g = generator
  fn = _teacher_forced_fn(g.dit_config, g.vae_config, g.control_encoding, float(t))
  sums = {"model_mse": [], "copy_last_mse": [], "model_psnr": [], "copy_last_psnr": []}
  for i, clip in enumerate(clips):
    video = np.asarray(clip["video"])
    controls = jnp.asarray(clip["controls"], jnp.float32)[None] if g.dit_config.control_channels else None
    text = np.asarray(clip["text_tokens"])[:g.text_len] if g.dit_config.caption_vocab_size else ""
    prompt = jnp.asarray(prompt_lib.prepare(text, g.dit_config, 1, g.text_len))
    latents, x0_hat = fn(g.params, g.vae_params, jnp.asarray(video)[None], controls, prompt,
                         jax.random.fold_in(jax.random.key(seed), i))
    latents, x0_hat = np.asarray(latents), np.asarray(x0_hat)
    sums["model_mse"].append(np.mean(np.square(x0_hat - latents[:, 1:])))
    sums["copy_last_mse"].append(np.mean(np.square(latents[:, :-1] - latents[:, 1:])))
    decoded = _decode(g.vae_config, g.vae_params, np.concatenate([latents[:, :1], x0_hat], axis=1))
    sums["model_psnr"].append(np.mean(psnr(decoded[1:], video[1:], cap=PSNR_CAP)))
    # Copying the last latent frame, through the same codec (for the lossless codec this is
    # `copy_last_latent_frames(video)` exactly).
    copied = _decode(g.vae_config, g.vae_params, np.concatenate([latents[:, :1], latents[:, :-1]], axis=1))
    sums["copy_last_psnr"].append(np.mean(psnr(copied[1:], video[1:], cap=PSNR_CAP)))
    if "warp_last" in clip:  # the one-step ceiling, through the same codec
      warped, _ = fn(g.params, g.vae_params, jnp.asarray(clip["warp_last"])[None], controls, prompt,
                     jax.random.key(0))
      warped = _decode(g.vae_config, g.vae_params, np.asarray(warped))
      sums.setdefault("warp_last_psnr", []).append(np.mean(psnr(warped[1:], video[1:], cap=PSNR_CAP)))
  out = {k: float(np.mean(v)) for k, v in sums.items()}
  out.update(t=float(t), clips=len(clips), mse_ratio=out["model_mse"] / max(out["copy_last_mse"], 1e-30),
             beats_copy_last=bool(out["model_mse"] < out["copy_last_mse"]))
  return out


def rollout_check(spec, config, chunk_frames: int = 8) -> dict:
  """`motion_ratio` (overall, bursts) of a `ModelSpec` streamed on the in-distribution worlds of a
  `run.EvalConfig` (its first noise seed), and the oracle's."""
  from apt2_jax.evaluation import oracle, run
  from apt2_jax.evaluation.models import ModelStream
  env = config.env(oracle.IN_DISTRIBUTION)
  steps = config.latent_steps()
  stream = ModelStream(spec, config.height, config.width, chunk_frames)
  window = spec.dit_config.window
  curves, oracle_curves, commanded = [], [], []
  for tw in oracle.eval_worlds(env, oracle.IN_DISTRIBUTION, config.num_worlds, config.video_frames(), config.fps):
    target = oracle.make_target(env, tw, [window])
    seed = run.noise_seed(config.noise_seeds[0], 0, tw.index)
    curves.append(run.stream_world(stream, target, tw, seed, steps)[0])
    oracle_curves.append(drift.frame_metrics(target.oracle, target.oracle, target.recent[window],
                                             target.homographies, known=target.known))
    commanded.append(target.commanded)
  s = drift.summarize(curves, commanded, config.fps)
  o = drift.summarize(oracle_curves, commanded, config.fps)
  return {"seconds": s["duration_s"], "worlds": len(curves), "num_steps": int(spec.num_steps),
          "shift": float(spec.shift),
          "motion_ratio": s["overall"]["motion_ratio"], "motion_ratio_burst": s["overall"]["motion_ratio_burst"],
          "burst_pairs": s["overall"]["burst_pairs"], "oracle_motion_ratio": o["overall"]["motion_ratio"],
          "oracle_motion_ratio_burst": o["overall"]["motion_ratio_burst"],
          "psnr_known": s["overall"]["psnr_known"], "psnr_recent": s["overall"]["psnr_recent"],
          "horizon_s": s["horizon_s"], "horizon_reached_end": s["horizon_reached_end"]}


def in_distribution_clips(world: str, world_config: Mapping[str, Any], height: int, width: int, num_frames: int,
                          num_clips: int) -> list[dict]:
  """Clips drawn as training's (`World.sample`) on the first `validation` seeds."""
  from apt2_jax.evaluation.oracle import world_fields
  env = worlds_lib.make_world(world, worlds_lib.WorldConfig(height=height, width=width, num_frames=num_frames,
                                                            **world_fields(world_config)))
  clips = [env.sample(seed=worlds_lib.split_seed("validation", k)) for k in range(num_clips)]
  if hasattr(env, "warp"):  # warp-last: the true last frame moved by the commanded motion (exact)
    for clip in clips:
      warp = lambda frame, s, t, c=clip["controls"]: env.warp(frame, c, s, t)
      clip["warp_last"] = drift.reference_frames(clip["video"], "warp_last", warp)
  return clips


def run_world_config(data) -> dict:
  """The `WorldConfig` overrides of a run's `config.data`: `world_options` (or `world_config`) and
  `speed`."""
  options = dict(data.get("world_options") or data.get("world_config") or {})
  if data.get("speed") not in (None, 1.0):
    options.setdefault("speed", float(data["speed"]))
  return options


def stage1_learning_check(workdir: str, world_config: Optional[Mapping[str, Any]] = None, *,
                          world: Optional[str] = None, vae: Optional[str] = None, num_clips: int = 8,
                          t: float = TEACHER_FORCED_T, num_worlds: int = 2, rollout_seconds: Optional[float] = None,
                          num_steps: Optional[int] = None, shift: Optional[float] = None, guidance: float = 1.0,
                          fps: float = 24.0) -> dict:
  """The stage-1 learning check of a stage workdir (or bundle) on its world.

  Args:
    workdir: the stage-1 (`adapt`) run.
    world_config: `WorldConfig` overrides (default: the run's, `run_world_config`).
    world: default the run's `config.data.world`.
    vae: a codec/VAE to use instead of the run's (`generation.load`).
    num_clips, t: the teacher-forced clips (the run's clip length) and flow time.
    num_worlds, rollout_seconds: the rollout check (default: one training clip's length).
    num_steps, shift, guidance: the Euler sampler (default: the run's `config.eval.sample_steps` /
      `sample_shift`, else 32 steps and `config.flow.shift`).
  Returns:
    {"workdir", "stage", "world", "teacher_forced": `teacher_forced_check` at `t`,
     "teacher_forced_pure": the same at t = 1, "rollout": `rollout_check`}.
  """
  from apt2_jax import checkpointing
  from apt2_jax import generation
  from apt2_jax.evaluation import run
  from apt2_jax.evaluation.models import ModelSpec
  gen = generation.load(workdir, vae=vae)
  cfg = checkpointing.load_config(workdir)
  data, ev = cfg.get("data") or {}, cfg.get("eval") or {}
  world = world or data.get("world", "panorama")
  world_config = dict(world_config if world_config is not None else run_world_config(data))
  height, width = int(gen.height or 64), int(gen.width or 64)
  clip_frames = int(data.get("frames") or data.get("num_frames") or 33)
  clips = in_distribution_clips(world, world_config, height, width, clip_frames, num_clips)
  steps = int(num_steps or ev.get("sample_steps") or 32)
  shift = float(shift or ev.get("sample_shift") or (cfg.get("flow") or {}).get("shift", 1.0))
  spec = ModelSpec(gen, num_steps=steps, shift=shift, guidance=guidance)
  config = run.EvalConfig(world=world, world_config=world_config, num_worlds=num_worlds, noise_seeds=(0,),
                          seconds=rollout_seconds or (clip_frames - 1) / fps, height=height, width=width,
                          fps=fps, progress=False)
  pure = teacher_forced_check(gen, clips, TEACHER_FORCED_T_PURE)
  return {"workdir": workdir, "stage": gen.stage, "world": world, "world_config": world_config,
          "teacher_forced": teacher_forced_check(gen, clips, t), "teacher_forced_pure": pure,
          "gate1": gates.gate1(pure["model_psnr"], pure.get("warp_last_psnr")),
          "rollout": rollout_check(spec, config)}
