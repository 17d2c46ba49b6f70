"""The toy pipeline: every AAPT stage in order on the synthetic camera world, then the evaluation.

    python -m apt2_jax.main --config=experiments/toy_pipeline.py:demo --workdir=demo_out/pipeline

`make demo` runs the `demo` variant (CPU, under 20 minutes on 2 cores); `full` trains long enough
for the quality numbers to mean something; `tiny` is the end-to-end test. Stages, each in its own
sub-workdir, each starting from the previous stage's checkpoint (`init_from`):

  vae                            causal VAE on the world's videos
  pretrain                       stage 0: bidirectional video diffusion
  adapt                          stage 1: block-causal diffusion, teacher forcing   <- pretrain
  distill                        stage 2: consistency distillation to 1 NFE         <- adapt
  adversarial                    stage 3: AAPT, student forcing  (G <- distill, D <- adapt)
  adversarial_teacher_forcing    ablation: teacher-forced adversarial training
  adversarial_no_recycle         ablation: recycled input zeroed after frame 0
  long_video                     long rollouts in segments        (G, D <- adversarial)

Rerunning with the same workdir resumes: finished stages are skipped, an interrupted one resumes
from its last checkpoint. Then `apt2_jax.evaluation` rolls every model out on held-out test worlds
against the oracle and writes `report/report.json`, drift-curve PNGs and MP4/GIF rollouts.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time

from absl import logging

from apt2_jax import checkpointing


def _log(msg: str):
  logging.info("[pipeline] %s", msg)


def _is_done(workdir: str, stage_config) -> bool:
  """A stage is done when its latest checkpoint is at its final step."""
  marker = os.path.join(workdir, "DONE.json")
  if os.path.exists(marker):
    with open(marker) as f:
      return json.load(f).get("num_steps") == int(stage_config.num_steps)
  return False


def stage_configs(config, workdir: str):
  """(name, stage config with the chain's paths filled in, sub-workdir) in execution order."""
  out = []
  for name in config.order:
    c = copy.deepcopy(config.stages[name])
    sub = os.path.join(workdir, name)
    links = config.chain.get(name, {})
    with c.unlocked():
      if name != "vae" and "vae" in c and "vae" in config.order:  # the pixel codec has no VAE stage
        c.vae.checkpoint = os.path.join(workdir, "vae")
      for field, source in links.items():
        path = os.path.join(workdir, source)
        if field == "init_from":
          c.init_from = path
        elif field == "d_init_from":
          c.adversarial.d_init_from = path
        elif field == "teacher_from":
          c.distill.teacher = path
        elif field == "match_wall_time":
          pass  # resolved when the stage starts (`match_wall_time`)
        else:
          raise ValueError(f"config.chain.{name}: unknown link {field!r}")
    out.append((name, c, sub))
  return out


def match_wall_time(config, name: str, stage_config, workdir: str):
  """A stage linked by `match_wall_time` runs as many steps as fit in the linked stage's measured
  training time, at its own source stage's measured seconds per step (both from DONE.json): the
  compute-matched control. Returns the stage config with `num_steps` set (unchanged without a link)."""
  links = config.chain.get(name, {})
  if "match_wall_time" not in links:
    return stage_config
  def done(stage):
    path = os.path.join(workdir, stage, "DONE.json")
    if not os.path.exists(path):
      raise ValueError(f"config.chain.{name}.match_wall_time: stage {stage!r} has not finished ({path} missing)")
    with open(path) as f:
      return json.load(f)
  budget = done(links["match_wall_time"])["seconds"]
  source = done(links["init_from"].split("/")[-1])
  per_step = source["seconds"] / max(int(source["num_steps"]), 1)
  c = copy.deepcopy(stage_config)
  with c.unlocked():
    c.num_steps = max(1, int(budget / per_step))
    c.checkpoint_every = max(1, c.num_steps // 4)
  _log(f"{name}: {c.num_steps} steps = {budget:.0f} s of {links['match_wall_time']} at {per_step:.2f} s per step")
  return c


def run_stage(name: str, config, workdir: str):
  """Runs one stage of the chain through the stage registry, like `apt2_jax.main`."""
  from apt2_jax.train import registry
  return registry.run(config, workdir)


def run_pipeline(config, workdir: str) -> dict:
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  plan = stage_configs(config, workdir)
  with open(os.path.join(workdir, "pipeline_config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  timings = {}
  for i, (name, c, sub) in enumerate(plan):
    if "match_wall_time" in config.chain.get(name, {}) and os.path.exists(os.path.join(sub, "DONE.json")):
      _log(f"stage {i + 1}/{len(plan)} {name}: already done, skipping")
      continue
    c = match_wall_time(config, name, c, workdir)
    head = f"stage {i + 1}/{len(plan)} {name} ({c.stage}, {c.num_steps} steps)"
    if _is_done(sub, c):
      _log(f"{head}: already done, skipping")
      continue
    _log(f"{head}: starting; {(time.time() - start) / 60:.1f} min elapsed")
    t0 = time.time()
    run_stage(name, c, sub)
    timings[name] = time.time() - t0
    with open(os.path.join(sub, "DONE.json"), "w") as f:
      json.dump({"num_steps": int(c.num_steps), "seconds": timings[name]}, f)
    _log(f"{head}: done in {timings[name]:.0f} s; {(time.time() - start) / 60:.1f} min elapsed")

  examples = write_examples(config, workdir)
  _log(f"example first frame and controls for `sample`: {examples['image']}, {examples['controls']}")
  curves = training_curves(plan, os.path.join(workdir, "report"))
  report = {}
  if config.evaluation.enabled:
    durations = config.evaluation.get("durations", None)
    _log(f"evaluation on {config.evaluation.num_worlds} {config.world} worlds per set"
         + (f", {', '.join(f'{float(d):g}' for d in durations)} s rollouts" if durations else "")
         + f"; {(time.time() - start) / 60:.1f} min elapsed")
    t0 = time.time()
    report = evaluate(config, workdir)
    timings["evaluation"] = time.time() - t0
  summary = {"workdir": workdir, "minutes": (time.time() - start) / 60, "stage_seconds": timings,
             "final_train_metrics": {k: {m: v[-1][1] for m, v in c.items() if v} for k, c in curves.items()}}
  with open(os.path.join(workdir, "pipeline_summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  _log(f"finished in {summary['minutes']:.1f} min; report in {os.path.join(workdir, 'report')}")
  return report


def write_examples(config, workdir: str, seconds: float = 4.0) -> dict:
  """`examples/first.png` and `examples/controls.json` for the README's `sample` command: frame 0
  of a validation world of the pipeline's world and the controls of one of its trajectories
  (one entry per 4 video frames), so the commands after `make demo` run in distribution."""
  import numpy as np
  from PIL import Image
  from apt2_jax import controls as encodings
  from apt2_jax.data import worlds
  out = os.path.join(workdir, "examples")
  os.makedirs(out, exist_ok=True)
  steps = max(1, int(round(seconds * worlds.FPS / 4)))
  options = dict(config.get("world_options", {}) or {})
  world = worlds.make_world(config.world, worlds.WorldConfig(height=int(config.height), width=int(config.width),
                                                             num_frames=1 + 4 * steps, **options))
  sample = world.sample(worlds.split_seed("validation", 0))
  Image.fromarray(sample["first_frame"]).save(os.path.join(out, "first.png"))
  kind = encodings.WORLD_CONTROL_TYPES[config.world]
  groups = np.asarray(sample["controls"][1:], np.float64).reshape(steps, 4, -1)
  if kind == "camera":
    entries = [{"camera": g.round(5).tolist()} for g in groups]
  elif kind == "pose":
    entries = [{"keypoints": g.reshape(4, -1, 2).clip(0, 1).round(5).tolist()} for g in groups]
  else:
    entries = [{} for _ in groups]
  entries[0]["text"] = sample["caption"]
  with open(os.path.join(out, "controls.json"), "w") as f:
    json.dump({"steps": entries, "repeat_last": True}, f)
  return {"image": os.path.join(out, "first.png"), "controls": os.path.join(out, "controls.json")}


def evaluate(config, workdir: str) -> dict:
  """The evaluation the config names (`apt2_jax.evaluation.evaluate`, one for every world):
  `evaluation.kind = "testbed"` adds the stage-1 learning check and claim (d)'s long rollouts; else
  every model on `durations` (the longest rolled out, the shorter scored on its prefix)."""
  from apt2_jax import evaluation
  from apt2_jax.evaluation import claims
  ev = config.evaluation
  vae_dir = os.path.join(workdir, "vae") if "vae" in config.order else None
  models = {}
  for label, spec in ev.models.items():
    sub = os.path.join(workdir, spec.workdir)
    if not checkpointing.has_checkpoint(sub):
      _log(f"evaluation: skipping {label}: no checkpoint in {sub}")
      continue
    models[label] = evaluation.model_spec_from_workdir(
        sub, vae_workdir=vae_dir, num_steps=int(spec.get("num_steps", 1)), shift=float(spec.get("shift", 1.0)),
        guidance=float(spec.get("guidance", 1.0)), recycle=bool(spec.get("recycle", True)),
        cache_from=str(spec.get("cache_from", "matched")), key=str(spec.get("key", "ema_params")))
  out_dir = os.path.join(workdir, "report")
  if ev.get("kind", "") == "testbed":
    return _evaluate_testbed(config, workdir, models, out_dir)
  durations = sorted(float(s) for s in ev.durations)
  ec = evaluation.EvalConfig(
      roles={label: label for label in models if label in claims.ROLES}, world=config.world,
      world_config=dict(config.get("world_options", {}) or {}), num_worlds=int(ev.num_worlds),
      noise_seeds=(int(ev.seed),), seconds=durations[-1], summary_seconds=tuple(durations[:-1]),
      height=int(config.height), width=int(config.width), fps=float(ev.fps))
  return evaluation.evaluate(models, ec, out_dir)


def _evaluate_testbed(config, workdir: str, models: dict, out_dir: str) -> dict:
  from apt2_jax.evaluation import learning, oracle, report, run
  ev = config.evaluation
  adapt = config.stages.adapt
  short_clip_s = (int(adapt.data.frames) - 1) / float(ev.fps)
  seconds = float(ev.seconds) if "seconds" in ev else float(ev.short_clips) * short_clip_s
  eval_sets = [s for s in (oracle.IN_DISTRIBUTION, oracle.UNSEEN_APPEARANCE)
               if s.name in tuple(ev.get("eval_sets", ("in_distribution", "unseen_appearance")))]
  learning_check = None
  if "diffusion" in models:
    spec = ev.models.diffusion
    _log("stage-1 learning check (teacher-forced prediction vs copying the last frame; rollout motion)")
    learning_check = learning.stage1_learning_check(
        os.path.join(workdir, spec.workdir), dict(config.get("world_options", {}) or {}), world=config.world,
        num_steps=int(spec.get("num_steps", 1)), shift=float(spec.get("shift", 1.0)), fps=float(ev.fps))
    # The one-step generators' teacher-forced one-step PSNR (claim (a): AAPT must not win by blurring).
    clips = learning.in_distribution_clips(config.world, dict(config.get("world_options", {}) or {}),
                                           int(config.height), int(config.width), int(adapt.data.frames), 8)
    learning_check["one_step"] = {
        label: learning.teacher_forced_check(models[label].generator, clips, 1.0)["model_psnr"]
        for label in ("distilled", "aapt_short", "teacher_forcing", "control") if label in models}
  tc = run.EvalConfig(
      roles={label: label for label in models}, world=config.world,
      world_config=dict(config.get("world_options", {}) or {}), num_worlds=int(ev.num_worlds),
      noise_seeds=tuple(int(s) for s in ev.noise_seeds), seconds=seconds, eval_sets=tuple(eval_sets),
      short_clip_s=short_clip_s, height=int(config.height), width=int(config.width), fps=float(ev.fps))
  _log(f"testbed evaluation: {len(models)} models x {len(tc.eval_sets)} sets x {tc.num_worlds} worlds x "
       f"{len(tc.noise_seeds)} seeds, {tc.duration():.0f} s rollouts")
  result = run.evaluate(models, tc, out_dir, learning=learning_check)
  # Claim (d): long-video AAPT against AAPT-short on rollouts `long_factor` x as long.
  from apt2_jax.evaluation import gates
  long_models = {k: models[k] for k in ("aapt", "aapt_short") if k in models}
  if len(long_models) == 2:
    factor = gates.D_ROLLOUT_S / gates.GATE2_ROLLOUT_S
    long_tc = dataclasses.replace(tc, seconds=factor * tc.duration(), eval_sets=tc.eval_sets[:1],
                                  roles={k: k for k in long_models})
    _log(f"claim (d): {', '.join(long_models)} on {long_tc.duration():.0f} s rollouts")
    long_report = run.evaluate(long_models, long_tc, os.path.join(out_dir, "long"))
    st = long_report["sets"][long_tc.eval_sets[0].name]["statistics"]["models"]
    result["claims"]["d"] = gates.claim_d(st)
  else:
    result["claims"]["d"] = gates.claim_d({})
  return report.write_report(result, out_dir, tc.progress)


# The metrics worth watching per stage family (train/<name> in each stage's metrics.jsonl).
CURVES = {"vae": ("loss",), "pretrain": ("loss",), "adapt": ("loss",), "distill": ("loss",),
          "adversarial": ("g_loss", "d_loss", "realism_gap", "r1", "r2"),
          "long_video": ("g_loss", "d_loss", "realism_gap")}


def training_curves(plan, out_dir: str) -> dict:
  """Writes `training_curves.json` and `training_curves.png` (one panel per stage)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  os.makedirs(out_dir, exist_ok=True)
  curves = {}
  for name, c, sub in plan:
    path = os.path.join(sub, "metrics.jsonl")
    if not os.path.exists(path):
      continue
    rows = [json.loads(line) for line in open(path)]
    keys = CURVES.get(c.stage, ("loss",))
    curves[name] = {k: [(r["step"], r[f"train/{k}"]) for r in rows if f"train/{k}" in r] for k in keys}
  with open(os.path.join(out_dir, "training_curves.json"), "w") as f:
    json.dump(curves, f)
  if curves:
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 2.8), squeeze=False)
    for ax, (name, series) in zip(axes[0], curves.items()):
      for k, points in series.items():
        if points:
          ax.plot(*zip(*points), label=k)
      ax.set_title(name, fontsize=9)
      ax.set_xlabel("step", fontsize=8)
      ax.legend(fontsize=6)
      ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "training_curves.png"), dpi=90)
    plt.close(fig)
  return curves
