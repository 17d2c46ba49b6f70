"""Wan2.1 VAE parity with diffusers' `AutoencoderKLWan` (small random model, CPU, float32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from apt2_jax.convert import wan_vae  # noqa: E402
from apt2_jax.models import vae as vae_lib  # noqa: E402


# Tests compile many small programs: XLA's backend optimisations cost more than they save here.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _to_ours(x):
  """torch `[B, C, T, H, W]` -> channels-last `[B, T, H, W, C]`."""
  return jnp.asarray(x.numpy().transpose(0, 2, 3, 4, 1))


def _to_torch_layout(x):
  return np.asarray(x).transpose(0, 4, 1, 2, 3)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A small random AutoencoderKLWan with Wan's architecture, saved as a diffusers folder."""
  torch.manual_seed(0)
  model = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2],
                                     num_res_blocks=1).eval()
  with torch.no_grad():  # gammas are ones at init: perturb them so that their mapping matters
    for name, p in model.named_parameters():
      if name.endswith("gamma"):
        p.add_(0.2 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp("wan_vae")
  model.save_pretrained(folder)
  return model, str(folder)


def test_vae_parity_with_diffusers(reference):
  torch_model, folder = reference
  params, config, report = wan_vae.import_vae(folder)
  assert not report.new and not report.dropped and not report.reshaped
  assert config.dim_mult == (1, 2, 2, 2) and config.latents_std == vae_lib.WAN_LATENTS_STD

  torch.manual_seed(1)
  video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
  z = torch.randn(1, 16, 3, 2, 2)
  with torch.no_grad():
    posterior = torch_model.encode(video).latent_dist
    decoded = torch_model.decode(z).sample

  model = vae_lib.VAE(config)
  mean, logvar = jax.jit(lambda p, v: model.apply(p, v, method=vae_lib.VAE.encode),
                         compiler_options=FAST_COMPILE)(params, _to_ours(video))
  ours = jax.jit(lambda p, z: model.apply(p, z, method=vae_lib.VAE.decode),
                 compiler_options=FAST_COMPILE)(params, _to_ours(z))
  errors = {
      "encode mean": np.abs(_to_torch_layout(mean) - posterior.mean.numpy()).max(),
      "encode logvar": np.abs(_to_torch_layout(logvar) - posterior.logvar.numpy()).max(),
      "decode": np.abs(_to_torch_layout(ours) - decoded.numpy()).max(),
  }
  print("VAE parity max abs errors:", errors)
  assert all(e < 1e-4 for e in errors.values()), errors
  # The comparison is not vacuous: most decoded values lie inside the clamp range.
  assert np.mean(np.abs(decoded.numpy()) < 0.999) > 0.5


def test_vae_export_import_round_trip(reference, tmp_path):
  torch_model, folder = reference
  params, config, _ = wan_vae.import_vae(folder)
  wan_vae.export_vae(params, config, str(tmp_path))
  again, config_again, report = wan_vae.import_vae(str(tmp_path))
  assert config_again == config and not report.new and not report.dropped
  jax.tree.map(np.testing.assert_array_equal, again, params)
  # PyTorch users load the export with stock diffusers and get the very same tensors.
  reloaded = diffusers.AutoencoderKLWan.from_pretrained(str(tmp_path)).state_dict()
  original = torch_model.state_dict()
  assert set(reloaded) == set(original)
  for key, value in original.items():
    assert torch.equal(reloaded[key], value), key


def test_vae_names_round_trip():
  for key in ("decoder.up_blocks.0.upsamplers.0.resample.1.weight",
              "decoder.up_blocks.1.upsamplers.0.time_conv.bias",
              "encoder.down_blocks.2.conv_shortcut.weight",
              "encoder.mid_block.attentions.0.norm.gamma", "post_quant_conv.weight"):
    name, _ = wan_vae.torch_name_to_ours(key)
    assert wan_vae.our_name_to_torch(name) == key
  assert wan_vae.torch_name_to_ours("encoder.down_blocks.2.conv1.weight")[0] == (
      "encoder/down_blocks_2/conv1/kernel")
