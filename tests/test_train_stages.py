"""One-step smoke runs of every stage through `train_and_evaluate`, evaluation included (slow:
each compiles its own step and streamed sampler).

  pretrain  video from the camera world through a random tiny VAE, full attention
  adapt     random latents; eval streams the Euler sampler with CFG through the rollout
  distill   init_from the adapt run (student and teacher); eval streams the 1-NFE generator
"""
import os

import numpy as np
import pytest

from apt2_jax import checkpointing, train
from tests.config_files import stage0_pretrain, stage1_adapt, stage2_distill
from tests.test_train import tiny_config

pytestmark = pytest.mark.slow


def _finite(metrics):
  return all(np.isfinite(v) for v in metrics.values())


def test_pretrain_one_step_from_world_video(tmp_path, devices):
  config = tiny_config(stage0_pretrain, num_steps=1, eval_at_end=True,
                       **{"data.source": "worlds", "data.pool_size": 8})
  out = train.train_and_evaluate(config, str(tmp_path))
  assert _finite(out["train"]) and _finite(out["eval"]) and "loss_t0.5" in out["eval"]


@pytest.fixture(scope="module")
def adapt_workdir(tmp_path_factory, devices):
  workdir = str(tmp_path_factory.mktemp("adapt"))
  config = tiny_config(stage1_adapt, num_steps=1, eval_at_end=True, caption_dropout=0.5,
                       **{"eval.guidance": 2.0, "eval.sample_steps": 2})
  out = train.train_and_evaluate(config, workdir)
  return workdir, out


def test_adapt_one_step_and_cfg_sampling_eval(adapt_workdir):
  _, out = adapt_workdir
  assert _finite(out["train"]) and _finite(out["eval"])
  assert out["eval"]["rollout_mse"] > 0


def test_distill_one_step_from_adapt(adapt_workdir, tmp_path):
  workdir, _ = adapt_workdir
  config = tiny_config(stage2_distill, num_steps=1, eval_at_end=True, init_from=workdir,
                       ema_decay=0.99)  # ema_params = the loaded params: unaliased before donation
  out = train.train_and_evaluate(config, str(tmp_path))
  assert _finite(out["train"]) and _finite(out["eval"]) and "one_step_rollout_mse" in out["eval"]
  assert checkpointing.load_config(str(tmp_path)).init_from == workdir
