"""Evaluates several generators side by side on a world's evaluation sets (`apt2_jax.evaluation`).

  python -m apt2_jax.evaluation \\
      --models=diffusion=/runs/stage1:steps=32,shift=24,guidance=3,aapt=/runs/stage4,no_recycle=/runs/ablation:recycle=0 \\
      --vae=/runs/vae --world=camera --seconds=20,60 --num_worlds=2 --out=/tmp/eval

`--models` is a comma-separated list of `name=WORKDIR` (a DiT stage's workdir or an export
bundle, loaded by `apt2_jax.generation.load`), each optionally followed by sampler options, either
`:k=v,k=v` (options continue until the next `name=...` entry) or in brackets
`name=WORKDIR[k=v,k=v]`. Options: steps (Euler steps per latent frame, 1 = one-step generator),
shift, guidance (CFG weight, 1 = off), recycle (0/1), key (checkpoint entry, default ema_params),
cache_from (matched: the context at each Euler step's t, as stage 1 trained, the default; first;
clean). A model named after a claim role (`claims.ROLES`: distilled, aapt_short, teacher_forcing,
...) takes that role in the gates and claims. `--benchmark_json` maps model names to
`apt2_jax.benchmark` figures, copied into the report next to the measured throughput.

`--seconds`: the longest is rolled out, each shorter one is scored on its prefix. Writes
DIR/report.json, DIR/claims.md, DIR/drift_<set>.png, DIR/gifs/ and DIR/videos/; prints the
horizons.
"""
from __future__ import annotations

import dataclasses
import json
import re

from absl import app, flags

FLAGS = flags.FLAGS
WORLDS = ("camera", "puppet", "bouncing", "panorama", "torus")


def define_flags():
  """Defines the command-line flags: only when run as a program (or by a test), so that
  importing this module next to other CLIs defines nothing; names already defined are kept."""
  def _define(fn, name, *args, **kwargs):
    if name not in flags.FLAGS:
      fn(name, *args, **kwargs)
  _define(flags.DEFINE_string, "models", None, "name=WORKDIR[:k=v,...] entries, comma separated")
  _define(flags.DEFINE_string, "vae", None, "VAE workdir (or diffusers AutoencoderKLWan folder); default: each "
          "run's config.vae.checkpoint")
  _define(flags.DEFINE_enum, "world", "camera", list(WORLDS), "the world")
  _define(flags.DEFINE_integer, "num_worlds", 2, "worlds per evaluation set")
  _define(flags.DEFINE_list, "seconds", ["60"], "rollout duration(s) in seconds; the longest runs, each shorter "
          "one is scored on its prefix")
  _define(flags.DEFINE_list, "noise_seeds", ["0"], "noise seeds: one rollout per model, world and seed (paired "
          "across models)")
  _define(flags.DEFINE_float, "fps", 24.0, "video frames per second")
  _define(flags.DEFINE_integer, "height", None, "pixels (default: the first model's training resolution)")
  _define(flags.DEFINE_integer, "width", None, "pixels (default: the first model's training resolution)")
  _define(flags.DEFINE_string, "out", "eval", "output directory")
  _define(flags.DEFINE_integer, "chunk_frames", 24, "latent frames per compiled DiT call")
  _define(flags.DEFINE_bool, "videos", True, "write every world's whole rollout as MP4 (first noise seed)")
  _define(flags.DEFINE_bool, "ssim", True, "score SSIM too")
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
  from apt2_jax.evaluation import claims
  try:
    entries = parse_models(FLAGS.models)
    seconds = sorted(float(s) for s in FLAGS.seconds)
    noise_seeds = tuple(int(s) for s in FLAGS.noise_seeds)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  benchmark = {}
  if FLAGS.benchmark_json:
    with open(FLAGS.benchmark_json) as f:
      benchmark = json.load(f)
  models = {}
  for name, entry in entries.items():
    try:
      spec = evaluation.model_spec_from_workdir(entry["workdir"], vae_workdir=FLAGS.vae, **entry["options"])
    except (FileNotFoundError, ValueError) as e:   # a path or run that is no generator: one line
      raise app.UsageError(f"--models: {name}: {e}") from None
    models[name] = dataclasses.replace(spec, benchmark=benchmark.get(name))
  first = next(iter(models.values()))
  config = evaluation.EvalConfig(
      roles={name: name for name in models if name in claims.ROLES}, world=FLAGS.world,
      num_worlds=FLAGS.num_worlds, noise_seeds=noise_seeds, seconds=seconds[-1], summary_seconds=tuple(seconds[:-1]),
      height=int(FLAGS.height or first.height or 64), width=int(FLAGS.width or first.width or 64), fps=FLAGS.fps,
      chunk_frames=FLAGS.chunk_frames, videos=FLAGS.videos, ssim=FLAGS.ssim,
      progress=FLAGS.progress and runtime.is_terminal())
  report = evaluation.evaluate(models, config, FLAGS.out)
  fmt = lambda x, f="{:.1f}": "n/a" if x is None else f.format(x)   # report.json holds NaN as null
  for set_name, s in report["sets"].items():
    st = s["statistics"]
    print(f"{set_name}: horizon threshold {fmt(st['threshold']['threshold_db'], '{:.2f}')} dB")
    for name, m in st["models"].items():
      h, late, fps = m["horizon"], m["late_psnr"], report["models"][name]["throughput"]["frames_per_s"]
      print(f"{name:>20s}  good horizon {fmt(h['median'])} s [{fmt(h['lo'])}, {fmt(h['hi'])}], PSNR "
            f"{st['late_s'][0]:g}-{st['late_s'][1]:g} s {fmt(late['median'], '{:.2f}')} dB, {fmt(fps)} fps")
  print(f"report: {FLAGS.out}/report.json, {FLAGS.out}/claims.md")


if __name__ == "__main__":
  from apt2_jax import cli
  define_flags()
  cli.run(main)  # bad inputs: one line and exit status 1
