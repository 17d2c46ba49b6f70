"""Streaming decode: the full VAE decoder against the light decoder (speed, and PSNR between them).

  python -m apt2_jax.benchmark_decoder --teacher=/tmp/vae_small --decoder=/tmp/light_decoder \\
      --json_out=docs/benchmarks/light_decoder.json

Speed: ms per latent frame (-> 4 video frames) of `generation.stream.decode` (denormalise, the
decoder's `decode_step` with its state, uint8), jitted as `generation.stream.compiled` jits it,
float32, batch `--batch`, steady state (later frames; the first-frame variant is compiled and run
first), at `--height` x `--width` (default 256 x 256). The two decoders are timed in alternating
rounds (`--rounds`), so that load from other processes on a shared machine hits both alike;
median and min over every timed step, in wall-clock ms and in this process's CPU ms (all its
threads: on a core shared with other work, the CPU time is what the step would take alone on
it, the wall time includes waiting for the others). Parameters: the checkpoints' when given, else random
(latency does not depend on their values): `--full_size` / `--light_dims` / `--light_blocks`.

Quality (needs `--teacher` and `--decoder`): held-out clips of the world (`--eval_split`, seeds
no training run sees: the `worlds` source trains on "train" and validates on "validation"),
rendered at the decoder run's resolution (or `--eval_height/width`), encoded by the teacher's
encoder (the posterior mean), decoded by both decoders, the light one streaming one latent frame
at a time. PSNR over [-1, 1] (peak-to-peak 2), per clip then averaged: light vs full decoder
(the distillation target), and each against the ground-truth frames.

Not part of `python -m apt2_jax.benchmark` (that package is maintained separately).
"""
from __future__ import annotations

import json
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from apt2_jax.generation import stream
from apt2_jax.generation.vae import load_vae
from apt2_jax.models import DiTConfig
from apt2_jax.models import vae as vae_lib


def _block(x):
  return jax.tree.map(lambda a: a.block_until_ready(), x)


class _Timer:
  """One decoder's jitted streaming decode at a resolution, ready to time step by step."""

  def __init__(self, cfg: vae_lib.VAEConfig, params, batch: int, height: int, width: int):
    self.cfg = cfg
    self.params = params
    self.decode = stream.compiled(stream.StreamSpec(DiTConfig(latent_channels=cfg.z_dim), cfg)).decode
    h, w = height // vae_lib.SPATIAL_FACTOR, width // vae_lib.SPATIAL_FACTOR
    self.z = jax.random.normal(jax.random.key(1), (batch, 1, h, w, cfg.z_dim), jnp.float32)
    t = time.perf_counter()
    cache = vae_lib.init_decode_cache(vae_lib.VAE(cfg), batch, h, w)
    _, self.cache = _block(self.decode(params, cache, self.z, first=True))
    self.first_s = time.perf_counter() - t
    cost = self.decode.lower(params, self.cache, self.z).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.gflop = float((cost or {}).get("flops", float("nan"))) / 1e9  # XLA's count, one step
    t = time.perf_counter()
    out, self.cache = _block(self.decode(params, self.cache, self.z))
    self.compile_s = time.perf_counter() - t
    assert out.shape == (batch, vae_lib.TEMPORAL_FACTOR, height, width, 3), out.shape
    self.times_ms: list[float] = []
    self.cpu_ms: list[float] = []

  def run(self, steps: int):
    for _ in range(steps):
      t, c = time.perf_counter(), time.process_time()
      out, self.cache = self.decode(self.params, self.cache, self.z)
      _block((out, self.cache))
      self.times_ms.append(1e3 * (time.perf_counter() - t))
      self.cpu_ms.append(1e3 * (time.process_time() - c))

  def result(self, name: str) -> dict:
    median = statistics.median(self.times_ms)
    return {"decoder": name, "decoder_type": self.cfg.decoder_type,
            "decoder_params": int(sum(x.size for x in jax.tree.leaves(self.params["params"]["decoder"]))),
            "gflop_per_latent_frame": round(self.gflop, 3),
            "first_frame_compile_and_run_s": round(self.first_s, 2),
            "later_frame_compile_and_run_s": round(self.compile_s, 2),
            "ms_per_latent_frame_median": round(median, 2),
            "ms_per_latent_frame_min": round(min(self.times_ms), 2),
            "cpu_ms_per_latent_frame_median": round(statistics.median(self.cpu_ms), 2),
            "cpu_ms_per_latent_frame_min": round(min(self.cpu_ms), 2),
            "video_fps_median": round(vae_lib.TEMPORAL_FACTOR * self.z.shape[0] * 1e3 / median, 1),
            "timed_steps": len(self.times_ms)}


def _models(teacher: str | None, decoder: str | None, full_size: str, light_dims, light_blocks):
  """((full cfg, params), (light cfg, params)): the checkpoints', or random ones."""
  if teacher:
    full = load_vae(teacher)
  else:
    cfg = vae_lib.vae_config(full_size)
    full = (vae_lib.VAE(cfg), vae_lib.init_params(vae_lib.VAE(cfg), jax.random.key(0), 16, 16))
  if decoder:
    light = load_vae(teacher, decoder=decoder) if teacher else load_vae(decoder)
  else:
    cfg = vae_lib.vae_config(full_size, decoder_type="light", light_dims=tuple(light_dims),
                             light_blocks=tuple(light_blocks))
    light = (vae_lib.VAE(cfg), vae_lib.init_params(vae_lib.VAE(cfg), jax.random.key(0), 16, 16))
  return (full[0].config, full[1]), (light[0].config, light[1])


def speed(full, light, *, batch: int, height: int, width: int, rounds: int, full_steps: int,
          light_steps: int) -> list[dict]:
  """Alternating rounds: `full_steps` full-decoder steps, then `light_steps` light ones."""
  timers = {"full": _Timer(*full, batch, height, width), "light": _Timer(*light, batch, height, width)}
  for _ in range(rounds):
    timers["full"].run(full_steps)
    timers["light"].run(light_steps)
  import os  # pylint: disable=g-import-not-at-top
  common = {"height": height, "width": width, "batch": batch, "dtype": "float32",
            "device": str(jax.devices()[0].device_kind), "rounds": rounds,
            "cpu_cores": len(os.sched_getaffinity(0))}
  return [dict(common, **t.result(name)) for name, t in timers.items()]


def _psnr(a, b) -> float:
  mse = float(np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
  return float("inf") if mse == 0 else 10.0 * np.log10(4.0 / mse)


def quality(full, light, *, world: str, split: str, clips: int, frames: int, height: int,
            width: int, batch: int = 4) -> dict:
  """PSNR of held-out clips: light vs full decoder, and each vs the ground truth."""
  from apt2_jax.data import worlds  # pylint: disable=g-import-not-at-top
  w = worlds.make_world(world, worlds.WorldConfig(height=height, width=width, num_frames=frames))
  video = np.stack([w.sample(seed=worlds.split_seed(split, i))["video"] for i in range(clips)])
  video = video.astype(np.float32) / 127.5 - 1.0
  (fcfg, fparams), (lcfg, lparams) = full, light
  fmodel, lmodel = vae_lib.VAE(fcfg), vae_lib.VAE(lcfg)
  encode = jax.jit(lambda p, v: fmodel.apply(p, v, method=vae_lib.VAE.encode)[0])
  decode = jax.jit(lambda p, z: fmodel.apply(p, z, method=vae_lib.VAE.decode))
  rows = {"light_vs_full": [], "full_vs_truth": [], "light_vs_truth": []}
  for i in range(0, clips, batch):
    v = jnp.asarray(video[i:i + batch])
    z = encode(fparams, v)
    ref = np.asarray(decode(fparams, z))
    out = np.asarray(vae_lib.decode_stream(lmodel, lparams, z))  # one latent frame at a time
    for j in range(v.shape[0]):
      rows["light_vs_full"].append(_psnr(out[j], ref[j]))
      rows["full_vs_truth"].append(_psnr(ref[j], video[i + j]))
      rows["light_vs_truth"].append(_psnr(out[j], video[i + j]))
  result = {f"psnr_{k}_db": round(float(np.mean(v)), 2) for k, v in rows.items()}
  result["psnr_light_vs_full_db_min_clip"] = round(float(np.min(rows["light_vs_full"])), 2)
  result.update(world=world, split=split, clips=clips, frames=frames, height=height, width=width)
  return result


def main(argv):
  del argv
  f = flags.FLAGS
  full, light = _models(f.teacher, f.decoder, f.full_size, f.light_dims, f.light_blocks)
  report = {"teacher": f.teacher or f"random {f.full_size}", "decoder": f.decoder or "random light"}
  if f.speed:
    report["speed"] = speed(full, light, batch=f.batch, height=f.height, width=f.width,
                            rounds=f.rounds, full_steps=f.full_steps, light_steps=f.light_steps)
    for row in report["speed"]:
      print(json.dumps(row), flush=True)
  if f.teacher and f.decoder and f.clips:
    from apt2_jax import checkpointing  # pylint: disable=g-import-not-at-top
    data = checkpointing.load_config(f.decoder).data
    report["quality"] = quality(full, light, world=str(data.get("world", "camera")),
                                split=f.eval_split, clips=f.clips,
                                frames=f.eval_frames or int(data.frames),
                                height=f.eval_height or int(data.height),
                                width=f.eval_width or int(data.width))
    print(json.dumps(report["quality"]), flush=True)
  if f.json_out:
    with open(f.json_out, "w") as fh:
      json.dump(report, fh, indent=2)


def define_flags():
  flags.DEFINE_string("teacher", None, "the full VAE (a `vae` workdir); empty: random `--full_size`")
  flags.DEFINE_string("decoder", None, "the light decoder (a `vae_distill` workdir); empty: random")
  flags.DEFINE_string("full_size", "small", "VAE size of the random full decoder")
  flags.DEFINE_list("light_dims", ["64", "48", "32", "16"], "random light decoder: VAEConfig.light_dims")
  flags.DEFINE_list("light_blocks", ["1", "1", "1", "0"], "random light decoder: VAEConfig.light_blocks")
  flags.DEFINE_bool("speed", True, "time both decoders")
  flags.DEFINE_integer("height", 256, "timed resolution (multiple of 8)")
  flags.DEFINE_integer("width", 256, "timed resolution (multiple of 8)")
  flags.DEFINE_integer("batch", 1, "streams decoded together")
  flags.DEFINE_integer("rounds", 3, "alternating timing rounds")
  flags.DEFINE_integer("full_steps", 1, "timed full-decoder steps per round")
  flags.DEFINE_integer("light_steps", 10, "timed light-decoder steps per round")
  flags.DEFINE_integer("clips", 16, "held-out clips for the PSNR (0: no quality)")
  flags.DEFINE_string("eval_split", "test", "split of the held-out clips' seeds")
  flags.DEFINE_integer("eval_frames", 0, "frames per clip, 1 + 4k (0: the decoder run's)")
  flags.DEFINE_integer("eval_height", 0, "PSNR resolution (0: the decoder run's)")
  flags.DEFINE_integer("eval_width", 0, "PSNR resolution (0: the decoder run's)")
  flags.DEFINE_string("json_out", None, "write the report here as JSON")


if __name__ == "__main__":
  define_flags()
  app.run(main)
