"""The light streaming decoder (`apt2_jax/models/light_decoder.py`): streaming equals the whole-clip
decode; config errors name the field; the `vae_distill` stage trains it behind a frozen teacher and
its checkpoint loads through `load_vae(decoder=...)` and the generator's `config.vae` hook."""
import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from apt2_jax import train
from apt2_jax.configs import vae as vae_experiment
from apt2_jax.generation import loading
from apt2_jax.generation import vae as generation_vae
from apt2_jax.models import light_decoder
from apt2_jax.models import vae as vae_lib
from apt2_jax.stages import vae as stage

TINY_LIGHT = dict(decoder_type="light", light_dims=(8, 6, 4, 4), light_blocks=(1, 1, 1, 1))


def _tiny_light(**overrides):
  return vae_lib.vae_config("tiny", **{**TINY_LIGHT, **overrides})


def test_streaming_decode_equals_whole_clip():
  model = vae_lib.VAE(_tiny_light())
  params = vae_lib.init_params(model, jax.random.key(0), 16, 16)
  assert set(params["params"]["decoder"]) >= {"conv_in", "mem_0", "to_first", "to_frames", "up_1",
                                              "up_2", "conv_out"}
  z = jax.random.normal(jax.random.key(1), (2, 4, 2, 3, 4))
  whole = model.apply(params, z, method=vae_lib.VAE.decode)
  assert whole.shape == (2, 13, 16, 24, 3)
  # One latent frame at a time through the jitted step and its fixed-shape state.
  cache = vae_lib.init_decode_cache(model, 2, 2, 3)
  shapes = jax.tree.map(np.shape, cache)
  assert shapes == {"conv_in": (2, 1, 2, 3, 4), "mem_0": (2, 1, 2, 3, 8)}
  parts = []
  for i in range(z.shape[1]):
    out, cache = vae_lib.decode_step(model, params, cache, z[:, i:i + 1], i == 0)
    assert out.shape[1] == (1 if i == 0 else 4)
    assert jax.tree.map(np.shape, cache) == shapes
    parts.append(out)
  np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, atol=1e-5)
  # Chunks of several latent frames equal it too (the state carries across any cut).
  first, cache = model.apply(params, z[:, :3], None, True, method=vae_lib.VAE.decode_step)
  rest, _ = model.apply(params, z[:, 3:], cache, False, method=vae_lib.VAE.decode_step)
  np.testing.assert_allclose(np.concatenate([first, rest], axis=1), whole, atol=1e-5)
  # Causal: a later latent frame does not change earlier video frames.
  other = model.apply(params, z.at[:, 2:].set(0.0), method=vae_lib.VAE.decode)
  np.testing.assert_array_equal(other[:, :5], whole[:, :5])
  assert not np.allclose(other[:, 5:], whole[:, 5:])


def test_pixel_shuffle_is_depth_to_space():
  x = np.arange(2 * 3 * 4 * 8, dtype=np.float32).reshape(2, 3, 4, 8)
  y = np.asarray(light_decoder.pixel_shuffle(x))
  assert y.shape == (2, 6, 8, 2)
  for dy in range(2):
    for dx in range(2):
      np.testing.assert_array_equal(y[:, dy::2, dx::2], x[..., (2 * dy + dx) * 2:(2 * dy + dx + 1) * 2])


def test_wrong_config_fields_fail_clearly():
  with pytest.raises(ValueError, match=r"VAEConfig.decoder_type='lite' is not one of \('causal', 'light'\)"):
    _tiny_light(decoder_type="lite")
  with pytest.raises(ValueError, match="VAEConfig.light_dims=.*4 positive channel counts"):
    _tiny_light(light_dims=(8, 8, 8))
  with pytest.raises(ValueError, match="VAEConfig.light_blocks=.*>= 0"):
    _tiny_light(light_blocks=(1, -1, 0, 0))
  with pytest.raises(ValueError, match="decoder_type"):  # through a config block, as a run reads it
    generation_vae.vae_config_from_block({"size": "tiny", "decoder_type": "tiny_light"})
  config = vae_experiment.get_config("light_decoder")
  assert config.stage == "vae_distill" and config.vae.decoder_type == "light"
  with pytest.raises(ValueError, match="config.teacher"):
    stage.validate(config)
  with config.unlocked():
    config.teacher = "/nowhere"
    config.vae.light_dims = (64, 48)
  with pytest.raises(ValueError, match="VAEConfig.light_dims"):
    stage.validate(config)
  # The configured light decoder is the documented one.
  cfg = generation_vae.vae_config_from_block(vae_experiment.get_config("light_decoder").vae)
  assert (cfg.decoder_type, cfg.light_dims, cfg.light_blocks) == ("light", (64, 48, 32, 16), (1, 1, 1, 0))
  assert cfg.base_dim == vae_lib.vae_config("small").base_dim  # the small teacher's encoder
  for c in (cfg, _tiny_light()):
    assert generation_vae.vae_config_from_dict(generation_vae.vae_config_to_dict(c)) == c


def _config(name, **overrides):
  c = vae_experiment.get_config(name)
  c.progress_bar = False
  with c.unlocked():
    for k, v in overrides.items():
      node = c
      *path, last = k.split(".")
      for p in path:
        node = node[p]
      node[last] = v
  return c


@pytest.mark.slow  # two step compiles (the tiny teacher, the distillation): ~1 min alone on 2 cores
def test_distill_trains_and_loads_through_the_hook(tmp_path):
  teacher = str(tmp_path / "teacher")
  train.train_and_evaluate(_config("tiny", num_steps=1, checkpoint_every=1), teacher)
  light = str(tmp_path / "light")
  config = _config("light_decoder", teacher=teacher, num_steps=3, checkpoint_every=3, batch_size=2,
                   log_every=1, **{"vae.size": "tiny", "vae.light_dims": TINY_LIGHT["light_dims"],
                                   "vae.light_blocks": TINY_LIGHT["light_blocks"],
                                   "data.source": "random", "data.frames": 5, "data.height": 16,
                                   "data.width": 16, "optimizer.warmup_steps": 0})
  metrics = train.train_and_evaluate(config, light)["train"]
  assert np.isfinite(metrics["teacher_l1"])
  losses = train.read_metrics(light, "train/teacher_l1")
  assert sorted(losses) == [1, 2, 3]

  t_model, t_params = generation_vae.load_vae(teacher)
  l_model, l_params = generation_vae.load_vae(teacher, decoder=light)
  assert l_model.config == dataclasses.replace(t_model.config, **TINY_LIGHT)
  assert l_model.config.latents_std == t_model.config.latents_std
  for side in ("encoder", "quant_conv"):  # the teacher's encoder side, exactly
    jax.tree.map(np.testing.assert_array_equal, l_params["params"][side], t_params["params"][side])
  alone_model, alone_params = generation_vae.load_vae(light)  # the distill workdir is a whole VAE
  assert alone_model.config == l_model.config
  jax.tree.map(np.testing.assert_array_equal, alone_params, l_params)
  z = jax.random.normal(jax.random.key(0), (1, 2, 2, 2, 4))
  assert vae_lib.decode_stream(l_model, l_params, z).shape == (1, 5, 16, 16, 3)

  # The generator's hook: config.vae.decoder_checkpoint (or load(..., decoder=)) swaps the decoder.
  run = ml_collections.ConfigDict({"vae": {"size": "tiny", "checkpoint": teacher,
                                           "decoder_checkpoint": light}})
  cfg, variables = loading._run_vae(run, None, "run")  # pylint: disable=protected-access
  assert cfg == l_model.config
  jax.tree.map(np.testing.assert_array_equal, variables, l_params)
  cfg, _ = loading._run_vae(ml_collections.ConfigDict({"vae": {"checkpoint": teacher}}), None, "run",
                            light)  # pylint: disable=protected-access
  assert cfg.decoder_type == "light"

  # A decoder distilled behind another encoder is refused.
  other = jax.tree.map(np.asarray, t_params)
  other["params"]["encoder"]["conv_in"]["bias"] = other["params"]["encoder"]["conv_in"]["bias"] + 1.0
  with pytest.raises(ValueError, match="was not distilled behind the VAE"):
    generation_vae._with_decoder(t_model.config, other, light, "other")  # pylint: disable=protected-access
  with pytest.raises(FileNotFoundError, match="not a VAE stage workdir"):
    generation_vae.load_vae(teacher, decoder=str(tmp_path / "nowhere"))


def test_stream_and_export_with_the_light_decoder(tmp_path):
  """The stream functions and the export bundle carry the light decoder through the VAE config."""
  from apt2_jax import export
  from apt2_jax.configs import sizes
  from apt2_jax.inference import StreamingGenerator
  from apt2_jax.models import DiTConfig
  config = DiTConfig.from_dict(sizes.model_config("tiny", control_channels=0))
  gen = StreamingGenerator.random(config, _tiny_light(), seed=0, height=32, width=32)
  assert gen.spec.vae_config.decoder_type == "light"
  image = np.zeros((32, 32, 3), np.uint8)
  g = gen.fork()
  live = [g.start(image, seed=1), g.step(None), g.step(None)]
  assert [f.shape[1] for f in live] == [1, 4, 4]
  out = str(tmp_path / "bundle")
  export.export_bundle(gen, out, serialize=False)
  again = StreamingGenerator.from_checkpoint(out)
  assert again.spec.vae_config == gen.spec.vae_config
  a = again.fork()
  got = [a.start(image, seed=1), a.step(None), a.step(None)]
  for x, y in zip(got, live):
    np.testing.assert_array_equal(x, y)
