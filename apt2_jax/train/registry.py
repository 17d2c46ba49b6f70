"""The one stage registry: `config.stage` -> the code that runs it.

Entries are "module:attribute" strings, imported only when a stage runs, so that the training
layer never imports the stages (they import it) and a run loads only its own stage's code.
A `make_stage(config, mesh) -> Stage` factory runs on the shared loop
(`apt2_jax.train.loop.train_and_evaluate`); any other attribute is a runner `f(config, workdir)`
that drives the workdir itself (the pipeline runs every stage through `run` in turn).
"""
from __future__ import annotations

import importlib

REGISTRY = {
    "vae": "apt2_jax.stages.vae:make_stage",
    "vae_distill": "apt2_jax.stages.vae:make_stage",
    "pretrain": "apt2_jax.stages.diffusion:make_stage",
    "adapt": "apt2_jax.stages.diffusion:make_stage",
    "distill": "apt2_jax.stages.distill:make_stage",
    "adversarial": "apt2_jax.stages.adversarial:make_stage",
    "long_video": "apt2_jax.stages.long_video:make_stage",
    "pipeline": "apt2_jax.pipeline:run_pipeline",  # every stage in order, then the evaluation
}
LOOP = "apt2_jax.train.loop:train_and_evaluate"
ALL_STAGES = tuple(REGISTRY)
LOOP_STAGES = tuple(name for name, target in REGISTRY.items() if target.endswith(":make_stage"))


def check(stage, valid=ALL_STAGES) -> str:
  """`stage` itself; ValueError naming `config.stage` and the valid names otherwise."""
  if stage not in valid:
    raise ValueError(f"config.stage={stage!r} is not one of {list(valid)}")
  return stage


def resolve(target: str):
  """The object a "module:attribute" string names."""
  module, attribute = target.split(":")
  return getattr(importlib.import_module(module), attribute)


def make_stage(config, mesh):
  """The `Stage` of `config.stage` (a stage run by the shared loop) on `mesh`."""
  stage = check(config.get("stage", None), LOOP_STAGES)
  return resolve(REGISTRY[stage])(config, mesh)


def run(config, workdir: str):
  """Runs (or resumes) `config.stage` in `workdir`: the shared loop for a stage, else its runner."""
  stage = check(config.get("stage", None))
  runner = resolve(LOOP if stage in LOOP_STAGES else REGISTRY[stage])
  return runner(config, workdir)
