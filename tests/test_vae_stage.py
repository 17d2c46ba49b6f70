"""VAE stages on the shared loop: config checks and latent statistics (fast); a killed and resumed
run equals the uninterrupted one (fast); train, resume, load, decoder-only distillation (slow)."""
import json
import os

import jax
import numpy as np
import pytest

from apt2_jax import checkpointing, train
from apt2_jax.generation import vae as generation_vae
from apt2_jax.models import vae as vae_lib
from apt2_jax.stages import vae as stage
from apt2_jax.train import data as train_data
from apt2_jax.configs import vae as vae_experiment


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """The runs of one config compile their step once (the loop jits a fresh closure per run)."""
  from jax._src import compilation_cache as cc
  old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  cc.reset_cache()
  yield
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
  cc.reset_cache()


def tiny_config(**overrides):
  c = vae_experiment.get_config("tiny")
  c.progress_bar = False
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def test_config_validation_codec_and_latent_stats(tmp_path):
  config = train.validate_config(vae_experiment.get_config("tiny"))
  # The loop's fields a VAE config may lack get defaults; the batch of 2 splits over 2 devices.
  assert dict(config.mesh) == {"data": -1, "fsdp": 1, "tensor": 1, "sequence": 1}
  assert config.num_devices == 2 and config.optimizer.schedule == "cosine"
  with pytest.raises(ValueError, match="config.stage='gan' is not one of"):
    train.validate_config(tiny_config(stage="gan"))
  with pytest.raises(ValueError, match="config.stage='gan' is not one of .*'pipeline'"):
    train.registry.run(tiny_config(stage="gan"), str(tmp_path))
  for field, value, match in (("data.frames", 6, "1 \\+ 4k"), ("data.height", 12, "config.data.height"),
                              ("data.source", "random_latents", "config.data.source")):
    with pytest.raises(ValueError, match=match):
      stage.validate(tiny_config(**{field: value}))
  with pytest.raises(ValueError, match="config.teacher"):
    stage.validate(vae_experiment.get_config("slim_decoder"))
  with pytest.raises(ValueError, match="config.init_from='.*nowhere' holds no checkpoint"):
    train.validate_config(tiny_config(init_from=str(tmp_path / "nowhere")))

  # One codec: config blocks and JSON round trips.
  slim = generation_vae.vae_config_from_block(vae_experiment.get_config("slim_decoder").vae)
  assert slim.dec_dim_mult == (1, 2, 4, 8)
  assert generation_vae.vae_config_from_block({"size": "tiny", "checkpoint": "/x"}) == vae_lib.vae_config("tiny")
  for cfg in (slim, vae_lib.vae_config("tiny", remat=True)):
    assert generation_vae.vae_config_from_dict(json.loads(json.dumps(generation_vae.vae_config_to_dict(cfg)))) == cfg
  with pytest.raises(ValueError, match="unknown VAE config field"):
    generation_vae.vae_config_from_dict({"z_dims": 4})
  with pytest.raises(FileNotFoundError, match="neither a VAE stage workdir"):
    generation_vae.load_vae(str(tmp_path))

  video = train_data.random_smooth_videos(np.random.default_rng(0), 2, 5, 16, 24)
  assert video.shape == (2, 5, 16, 24, 3) and -1 <= video.min() < video.max() <= 1
  # Smooth in time: neighbouring frames differ much less than the frames themselves vary.
  assert np.abs(np.diff(video, axis=1)).mean() < 0.5 * np.abs(video).mean()

  # Latent statistics: a plain average over the first `warmup` batches, then an EMA.
  rng = np.random.default_rng(1)
  zs = [rng.normal(loc=[1.0, -2.0], scale=[0.5, 3.0], size=(4, 3, 2)).astype(np.float32) for _ in range(3)]
  stats = {"mean": np.zeros(2, np.float32), "std": np.ones(2, np.float32)}
  for count, z in enumerate(zs[:2]):
    stats = stage.update_latent_stats(stats, z, np.int32(count), warmup=2, decay=0.9)
  pooled = np.concatenate(zs[:2]).reshape(-1, 2)
  np.testing.assert_allclose(stats["mean"], pooled.mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats["std"], pooled.std(0), rtol=1e-4)
  second = stats["std"] ** 2 + stats["mean"] ** 2
  z = zs[2].reshape(-1, 2)
  ema = stage.update_latent_stats(stats, zs[2], np.int32(2), warmup=2, decay=0.9)
  mean = 0.9 * stats["mean"] + 0.1 * z.mean(0)
  np.testing.assert_allclose(ema["mean"], mean, rtol=1e-5)
  np.testing.assert_allclose(ema["std"], np.sqrt(0.9 * second + 0.1 * (z ** 2).mean(0) - mean ** 2), rtol=1e-4)


def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path):
  # The discriminator is on, so its parameters and optimiser state go through the checkpoint too.
  config = tiny_config(num_steps=4, checkpoint_every=2, **{"loss.adversarial_weight": 0.1})
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  train.train_and_evaluate(config, full)
  train.train_and_evaluate(config, killed, stop_after_step=3)  # "killed" after step 3
  assert checkpointing.resolve(killed)[1] == 2
  train.train_and_evaluate(config, killed)                    # resumes at step 2
  for metric in ("train/loss", "train/l1", "train/d_loss"):
    a, b = train.read_metrics(full, metric), train.read_metrics(killed, metric)
    assert sorted(a) == sorted(b) == list(range(1, 5)) and a == b, metric  # exactly
  for key in ("params", "latent_stats", "disc_params", "opt_state"):
    a, _ = checkpointing.load_params(full, key=key)
    b, _ = checkpointing.load_params(killed, key=key)
    jax.tree.map(np.testing.assert_array_equal, a, b)
  stats, _ = checkpointing.load_params(killed, key="latent_stats")
  assert stats["std"].shape == (4,) and stats["std"].min() > 0
  assert {"config", "data", "state"} <= set(os.listdir(os.path.join(killed, "checkpoints", "4")))


@pytest.mark.slow  # three step compiles (vae twice, vae_distill) and an eval: ~40 s on 2 cores
def test_vae_stage_trains_resumes_loads_and_distills(tmp_path):
  config = tiny_config(num_steps=3, checkpoint_every=3, eval_at_end=True)
  workdir = str(tmp_path / "vae")
  first = train.registry.run(config, workdir)
  assert np.isfinite(first["train"]["loss"]) and first["train"]["kl"] > 0

  config.num_steps = 6  # resumes from step 3
  last = train.registry.run(config, workdir)
  # The fixed validation batch (each training batch is new random video: its l1 is noisy).
  assert last["eval"]["recon_l1"] < 0.95 * first["eval"]["recon_l1"]
  assert checkpointing.resolve(workdir)[1] == 6
  with open(os.path.join(workdir, "metrics.jsonl")) as f:  # log_every 1: steps 1-6, resumed at 4
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in rows if "eval/psnr" in r] == [3, 6]
  assert checkpointing.load_config(workdir).vae.size == "tiny"

  model, params = generation_vae.load_vae(workdir)
  stats, _ = checkpointing.load_params(workdir, key="latent_stats")
  assert model.config.latents_std == tuple(float(x) for x in stats["std"]) and min(stats["std"]) > 0
  video = train_data.random_smooth_videos(np.random.default_rng(0), 1, 5, 16, 16)
  mean, _ = jax.jit(lambda p, v: model.apply(p, v, method=vae_lib.VAE.encode))(params, video)
  assert mean.shape == (1, 2, 2, 2, 4)

  # Decoder-only distillation into a slimmer decoder behind the frozen encoder.
  distill = tiny_config(stage="vae_distill", teacher=workdir, num_steps=2,
                        **{"vae.decoder_base_dim": 4, "vae.decoder_num_res_blocks": 0,
                           "loss.teacher_weight": 0.5})
  metrics = train.train_and_evaluate(distill, str(tmp_path / "slim"))["train"]
  assert np.isfinite(metrics["teacher_l1"])
  slim_model, slim_params = generation_vae.load_vae(str(tmp_path / "slim"))
  assert slim_model.config.dec_base_dim == 4
  assert slim_model.config.latents_std == model.config.latents_std
  for side in ("encoder", "quant_conv"):  # frozen: exactly the teacher's after training
    jax.tree.map(np.testing.assert_array_equal, slim_params["params"][side], params["params"][side])
  assert slim_params["params"]["decoder"]["conv_in"]["kernel"].shape[-1] == 4 * 2
