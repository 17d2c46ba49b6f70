"""VAE training stages on random smooth videos: loss goes down, resume, decoder-only distillation."""
import json
import os

import jax
import numpy as np
import pytest

from apt2_jax.models import vae as vae_lib
from apt2_jax.stages import vae as stage
from experiments import vae as vae_experiment


def test_config_validation_and_random_videos():
  config = vae_experiment.get_config("tiny")
  stage.validate(config)
  for field, value, match in (("stage", "gan", "config.stage"), ("data.frames", 6, "1 \\+ 4k"),
                              ("data.height", 12, "config.data.height")):
    bad = vae_experiment.get_config("tiny")
    section, _, name = field.rpartition(".")
    setattr(bad[section] if section else bad, name, value)
    with pytest.raises(ValueError, match=match):
      stage.validate(bad)
  distill = vae_experiment.get_config("slim_decoder")
  with pytest.raises(ValueError, match="config.teacher"):
    stage.validate(distill)
  assert stage.vae_config_from(distill).dec_dim_mult == (1, 2, 4, 8)
  video = stage.random_smooth_videos(np.random.default_rng(0), 2, 5, 16, 24)
  assert video.shape == (2, 5, 16, 24, 3) and -1 <= video.min() < video.max() <= 1
  # Smooth in time: neighbouring frames differ much less than the frames themselves vary.
  assert np.abs(np.diff(video, axis=1)).mean() < 0.5 * np.abs(video).mean()


@pytest.mark.slow  # three train-step compilations: about 2 minutes on a 2-core CPU
def test_vae_stage_trains_resumes_and_distills(tmp_path):
  config = vae_experiment.get_config("tiny")
  config.num_steps = 3
  config.checkpoint_every = 3
  workdir = str(tmp_path / "vae")
  first = stage.train_vae(config, workdir)
  assert np.isfinite(first["loss"]) and first["kl"] > 0

  config.num_steps = 6  # resumes from step 3
  last = stage.train_vae(config, workdir)
  assert last["l1"] < first["l1"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "6"
  with open(os.path.join(workdir, "metrics.jsonl")) as f:  # log_every 1: steps 1-6, resumed at 4
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5, 6]
  with open(os.path.join(workdir, "vae_config.json")) as f:
    saved = json.load(f)
  assert len(saved["vae"]["latents_std"]) == 4 and min(saved["vae"]["latents_std"]) > 0

  model, params = stage.load_vae(workdir)
  video = stage.random_smooth_videos(np.random.default_rng(0), 1, 5, 16, 16)
  mean, _ = jax.jit(lambda p, v: model.apply(p, v, method=vae_lib.VAE.encode))(params, video)
  assert mean.shape == (1, 2, 2, 2, 4)

  # Decoder-only distillation into a slimmer decoder behind the frozen encoder.
  distill = vae_experiment.get_config("tiny")
  distill.stage = "vae_distill"
  distill.teacher = workdir
  distill.vae.decoder_base_dim = 4
  distill.vae.decoder_num_res_blocks = 0
  distill.loss.teacher_weight = 0.5
  distill.num_steps = 2
  metrics = stage.train_vae(distill, str(tmp_path / "slim"))
  assert np.isfinite(metrics["teacher_l1"])
  slim_model, slim_params = stage.load_vae(str(tmp_path / "slim"))
  assert slim_model.config.dec_base_dim == 4
  assert slim_model.config.latents_std == model.config.latents_std
  jax.tree.map(np.testing.assert_array_equal, slim_params["params"]["encoder"],
               params["params"]["encoder"])
  assert slim_params["params"]["decoder"]["conv_in"]["kernel"].shape[-1] == 4 * 2
