"""Evaluates several generators side by side on the held-out test worlds (`apt2_jax.evaluation`).

  python -m apt2_jax.evaluate \\
      --models=diffusion=/runs/stage1:steps=32,shift=24,guidance=3,aapt=/runs/stage4,no_recycle=/runs/ablation:recycle=0 \\
      --vae=/runs/vae --world=camera --seconds=60,300 --num_worlds=2 --out=/tmp/eval

`--models` is a comma-separated list of `name=WORKDIR` (a DiT stage's workdir or an export
bundle, loaded by `apt2_jax.generation.load`), each optionally followed by sampler options, either
`:k=v,k=v` (options continue until the next `name=...` entry) or in brackets
`name=WORKDIR[k=v,k=v]`. Options: steps (Euler steps per latent frame, 1 = one-step generator),
shift, guidance (CFG weight, 1 = off), recycle (0/1), key (checkpoint entry, default ema_params),
cache_from (matched: the context at each Euler step's t, as stage 1 trained, the default; first; clean). `--benchmark_json` maps model names to `apt2_jax.benchmark` figures,
copied into the report next to the measured throughput.

Writes DIR/report.json, DIR/drift_*.png and DIR/videos/*.mp4|gif; prints the summary.
"""
from __future__ import annotations

import dataclasses
import json
import re

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags():
  """Defines the command-line flags: only when run as a program (or by a test), so that
  importing this module next to other CLIs defines nothing; names already defined are kept."""
  def _define(fn, name, *args, **kwargs):
    if name not in flags.FLAGS:
      fn(name, *args, **kwargs)
  _define(flags.DEFINE_string, "models", None, "name=WORKDIR[:k=v,...] entries, comma separated")
  _define(flags.DEFINE_string, "vae", None, "VAE workdir (or diffusers AutoencoderKLWan folder); default: each "
                      "run's config.vae.checkpoint")
  _define(flags.DEFINE_enum, "world", "camera", ["camera", "puppet", "bouncing"], "test world")
  _define(flags.DEFINE_integer, "num_worlds", 2, "held-out test worlds")
  _define(flags.DEFINE_list, "seconds", ["60"], "rollout duration(s) in seconds; the longest runs, each is "
                    "summarised on its prefix")
  _define(flags.DEFINE_float, "fps", 24.0, "video frames per second")
  _define(flags.DEFINE_integer, "height", None, "pixels (default: the first model's training resolution)")
  _define(flags.DEFINE_integer, "width", None, "pixels (default: the first model's training resolution)")
  _define(flags.DEFINE_string, "out", "eval", "output directory")
  _define(flags.DEFINE_integer, "seed", 0, "noise seed (shared by all models)")
  _define(flags.DEFINE_float, "good_psnr", 20.0, "PSNR threshold (dB) of the good horizon")
  _define(flags.DEFINE_integer, "chunk_frames", 24, "latent frames per compiled DiT call")
  _define(flags.DEFINE_float, "gif_seconds", 4.0, "GIF length in seconds")
  _define(flags.DEFINE_string, "benchmark_json", None, "JSON file {model name: benchmark figures}")
  _define(flags.DEFINE_bool, "progress", True, "progress bars (on a terminal only)")
  from apt2_jax import runtime
  runtime.define_flags()


OPTION_KEYS = {"steps": ("num_steps", int), "num_steps": ("num_steps", int), "shift": ("shift", float),
               "guidance": ("guidance", float), "recycle": ("recycle", lambda v: v.lower() in ("1", "true", "yes")),
               "key": ("key", str), "cache_from": ("cache_from", str)}


def _split_top_level(text: str) -> list[str]:
  """Splits on commas outside brackets."""
  parts, depth, cur = [], 0, ""
  for ch in text:
    depth += ch == "["
    depth -= ch == "]"
    if ch == "," and depth == 0:
      parts.append(cur)
      cur = ""
    else:
      cur += ch
  parts.append(cur)
  return [p.strip() for p in parts if p.strip()]


def _option(entry: dict, item: str, where: str):
  key, sep, value = item.partition("=")
  if not sep or key.strip() not in OPTION_KEYS:
    raise ValueError(f"--models: {where}: bad option {item!r}; known: {sorted(OPTION_KEYS)}")
  field, conv = OPTION_KEYS[key.strip()]
  entry["options"][field] = conv(value.strip())


def parse_models(text: str) -> dict[str, dict]:
  """`--models` -> {name: {"workdir": str, "options": {num_steps, shift, ...}}} (see the docstring)."""
  out, last = {}, None
  for token in _split_top_level(text):
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+)=(.+)", token, re.S)
    if m and m.group(1) not in OPTION_KEYS:
      name, rest = m.groups()
      if name in out:
        raise ValueError(f"--models: model {name!r} given twice")
      bracket = re.fullmatch(r"(.*?)\[(.*)\]", rest, re.S)
      entry = {"workdir": rest, "options": {}}
      if bracket:
        entry["workdir"] = bracket.group(1)
        for item in _split_top_level(bracket.group(2)):
          _option(entry, item, name)
      elif ":" in rest and "=" in rest.split(":", 1)[1] and re.match(r"\w+=", rest.rsplit(":", 1)[1]):
        workdir, first = rest.rsplit(":", 1)
        entry["workdir"] = workdir
        _option(entry, first, name)
      if not entry["workdir"]:
        raise ValueError(f"--models: {name!r} has no workdir")
      out[name], last = entry, name
    elif last is not None:
      _option(out[last], token, last)
    else:
      raise ValueError(f"--models: expected name=WORKDIR, got {token!r}")
  if not out:
    raise ValueError("--models is empty")
  return out


def main(argv):
  if not FLAGS.models:
    raise app.UsageError("--models is required")
  del argv
  from apt2_jax import runtime
  runtime.require_local_paths("vae", "out", "benchmark_json")
  runtime.setup()
  from apt2_jax import evaluation
  entries = parse_models(FLAGS.models)
  benchmark = {}
  if FLAGS.benchmark_json:
    with open(FLAGS.benchmark_json) as f:
      benchmark = json.load(f)
  specs = {}
  for name, entry in entries.items():
    spec = evaluation.model_spec_from_workdir(entry["workdir"], vae_workdir=FLAGS.vae, **entry["options"])
    specs[name] = dataclasses.replace(spec, benchmark=benchmark.get(name))
  report = evaluation.evaluate_models(
      specs, world=FLAGS.world, num_worlds=FLAGS.num_worlds,
      seconds=[float(s) for s in FLAGS.seconds], fps=FLAGS.fps, height=FLAGS.height or None,
      width=FLAGS.width or None, out_dir=FLAGS.out, seed=FLAGS.seed,
      progress=FLAGS.progress and runtime.is_terminal(),
      good_psnr=FLAGS.good_psnr, chunk_frames=FLAGS.chunk_frames, gif_seconds=FLAGS.gif_seconds)
  for name, model in report["models"].items():
    for duration, s in model["summary"].items():
      print(f"{name:>20s} {duration:>6s}  PSNR {s['psnr']['mean']:.2f} dB (first 10 s "
            f"{s['psnr']['first_10s']:.2f}, last 10 s {s['psnr']['last_10s']:.2f}), SSIM "
            f"{s['ssim']['mean']:.3f}, good horizon {s['psnr']['good_horizon_s']:.1f} s, "
            f"{model['throughput']['frames_per_s']:.1f} fps")
  print(f"report: {FLAGS.out}/report.json")


if __name__ == "__main__":
  from apt2_jax import cli
  define_flags()
  cli.run(main)  # bad inputs: one line and exit status 1
