"""Fixtures of the browser tests: a generator trained by the tiny testbed pipeline, once per
session."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

# The stages the AAPT generator needs; the evaluation is left out (the demo streams `adversarial`).
TINY_STAGES = ("adapt", "distill", "adversarial")


def train_tiny_testbed(workdir: str) -> str:
  """The tiny testbed pipeline (`experiments/testbed.py:tiny`, `python -m apt2_jax.main`) up to
  its AAPT stage; finished stages are skipped, so a second call on `workdir` trains nothing.
  Returns the AAPT generator's workdir."""
  from apt2_jax import pipeline
  from apt2_jax.configs import testbed
  config = testbed.get_config("tiny")
  with config.unlocked():
    config.order = tuple(s for s in config.order if s in TINY_STAGES)
    config.evaluation.enabled = False
  pipeline.run_pipeline(config, workdir)
  return os.path.join(workdir, "adversarial")


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory):
  """The AAPT generator of a testbed pipeline: `$APT2_E2E_WORKDIR/adversarial` when that pipeline
  workdir is given (e.g. `make demo`'s demo_out/testbed, or a tiny run to reuse; an unfinished
  tiny run is completed), else the tiny pipeline trained into a temporary directory."""
  workdir = os.environ.get("APT2_E2E_WORKDIR", "")
  if workdir and os.path.isfile(os.path.join(workdir, "adversarial", "DONE.json")):
    return os.path.join(os.path.abspath(workdir), "adversarial")
  return train_tiny_testbed(os.path.abspath(workdir) if workdir else str(tmp_path_factory.mktemp("testbed_tiny")))
