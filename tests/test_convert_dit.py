"""Wan2.1 DiT parity with diffusers' `WanTransformer3DModel` (small random model, CPU, float32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from apt2_jax.convert import wan_dit  # noqa: E402
from apt2_jax.models import dit as dit_lib  # noqa: E402

CONTROL = 3


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A small random WanTransformer3DModel (Wan2.1 T2V architecture), as a diffusers folder."""
  torch.manual_seed(0)
  model = diffusers.WanTransformer3DModel(
      patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
      out_channels=16, text_dim=8, freq_dim=16, ffn_dim=32, num_layers=2).eval()
  with torch.no_grad():  # norm weights are ones at init: perturb them so that their mapping matters
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp("wan_dit")
  model.save_pretrained(folder)
  return model, str(folder)


@pytest.fixture(scope="module")
def imported(reference):
  _, folder = reference
  return wan_dit.import_dit(folder, jax.random.key(0), control_channels=CONTROL)


@pytest.fixture(scope="module")
def forward(imported):
  """Our full-attention forward, jitted once: (params, noise, recycled, control, t, text) -> v."""
  _, config, _ = imported
  model = dit_lib.CausalDiT(config)
  return jax.jit(lambda p, *a: model.apply({"params": p}, *a, mode="full"))


def _ours(x):
  return jnp.asarray(x.numpy().transpose(0, 2, 3, 4, 1))


def test_import_reports_widened_input(imported):
  params, config, report = imported
  assert config.in_channels == 16 + 16 + CONTROL and config.dim == 24
  assert report.reshaped == {"patch_embedding/kernel": ((1, 2, 2, 16, 24), (1, 2, 2, 35, 24))}
  assert report.new == ["patch_embedding/kernel[..., 16:35, :] (new input channels: recycled, control)"]
  assert report.dropped == []
  new_channels = params["patch_embedding"]["kernel"][..., 16:, :]
  assert np.std(new_channels) == pytest.approx(1 / np.sqrt(4 * 35), rel=0.25)  # random, not zero


def test_import_plain_wan_input_is_exact(reference):
  """Stage 0 (plain video diffusion, `recycled_channels=False`): Wan's input width, nothing new."""
  torch_model, folder = reference
  params, config, report = wan_dit.import_dit(folder, jax.random.key(0), recycled_channels=False)
  assert config.in_channels == 16
  assert not report.new and not report.dropped and not report.reshaped
  np.testing.assert_array_equal(
      params["patch_embedding"]["kernel"],
      torch_model.patch_embedding.weight.detach().numpy().transpose(2, 3, 4, 1, 0))


def test_dit_parity_with_diffusers_full_attention(reference, imported, forward):
  torch_model, _ = reference
  params, config, _ = imported
  torch.manual_seed(1)
  noise = torch.randn(2, 16, 3, 4, 6)
  text = torch.randn(2, 5, 8)
  t = torch.tensor([0.3, 0.9])
  with torch.no_grad():
    expected = torch_model(noise, t * 1000, text).sample.numpy()

  noise_ours = _ours(noise)
  # Zero recycled and control inputs: the widened channels then add nothing, as in Wan.
  zeros = jnp.zeros_like(noise_ours)
  control = jnp.zeros(noise_ours.shape[:-1] + (CONTROL,))
  v = forward(params, noise_ours, zeros, control, jnp.asarray(t.numpy()),
              jnp.asarray(text.numpy()))
  error = float(np.abs(np.asarray(v).transpose(0, 4, 1, 2, 3) - expected).max())
  print(f"DiT parity max abs error: {error:.3g} (output scale {np.abs(expected).max():.3g})")
  assert error < 1e-4


def test_dit_export_import_round_trip(reference, imported, forward, tmp_path):
  params, config, _ = imported
  wan_dit.export_dit(params, config, str(tmp_path))
  again, config_again, report = wan_dit.import_dit(str(tmp_path), jax.random.key(1),
                                                   control_channels=CONTROL)
  assert config_again == config
  assert not report.new and not report.dropped and not report.reshaped
  jax.tree.map(np.testing.assert_array_equal, again, params)
  # Stock diffusers builds the model from the exported config (full input width) and takes every
  # tensor strictly. (`from_pretrained` wants `accelerate` for Wan's fp32 modules.)
  torch_model, _ = reference
  cls = diffusers.WanTransformer3DModel
  exported = cls.from_config(cls.load_config(str(tmp_path))).eval()
  exported.load_state_dict(safetensors_torch.load_file(str(tmp_path / wan_dit.common.WEIGHTS_NAME)))
  reloaded = exported.state_dict()
  original = torch_model.state_dict()
  assert set(reloaded) == set(original)
  for key, value in original.items():
    if key == "patch_embedding.weight":
      assert torch.equal(reloaded[key][:, :16], value)
    else:
      assert torch.equal(reloaded[key], value), key


def test_dit_names_round_trip():
  for key, ndim in (("blocks.7.attn1.to_out.0.weight", 2), ("blocks.0.ffn.net.0.proj.bias", 1),
                    ("blocks.1.norm2.weight", 1), ("condition_embedder.time_embedder.linear_2.weight", 2),
                    ("blocks.3.scale_shift_table", 3), ("proj_out.weight", 2)):
    name, layer = wan_dit.torch_name_to_ours(key, ndim)
    assert wan_dit.our_name_to_torch(name, layer) == key
  assert wan_dit.torch_name_to_ours("blocks.7.attn1.norm_q.weight", 1) == (
      "blocks/attn1/norm_q/scale", 7)


def test_exported_dit_matches_ours_on_all_input_channels(imported, forward, tmp_path):
  """PyTorch users feed `[noise | recycled | control]` to the export and get our output."""
  params, config, _ = imported
  wan_dit.export_dit(params, config, str(tmp_path))
  cls = diffusers.WanTransformer3DModel
  exported = cls.from_config(cls.load_config(str(tmp_path))).eval()
  exported.load_state_dict(safetensors_torch.load_file(str(tmp_path / wan_dit.common.WEIGHTS_NAME)))
  torch.manual_seed(2)
  noise, recycled = torch.randn(2, 16, 3, 4, 6), torch.randn(2, 16, 3, 4, 6)
  control, text, t = torch.randn(2, CONTROL, 3, 4, 6), torch.randn(2, 5, 8), torch.rand(2)
  with torch.no_grad():
    expected = exported(torch.cat([noise, recycled, control], 1), t * 1000, text).sample.numpy()
  v = forward(params, _ours(noise), _ours(recycled), _ours(control), jnp.asarray(t.numpy()),
              jnp.asarray(text.numpy()))
  np.testing.assert_allclose(np.asarray(v).transpose(0, 4, 1, 2, 3), expected, atol=1e-4)


def test_export_records_input_layout_and_import_places_channels_by_name(imported, tmp_path):
  """Our export's `[noise | recycled | control]` goes back by name: into a model without control
  the recycled channels are kept and the control ones dropped (reported), nothing is misplaced."""
  import json
  params, config, _ = imported
  wan_dit.export_dit(params, config, str(tmp_path))
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved[wan_dit.LAYOUT_KEY] == {"noise": 16, "recycled": 16, "control": CONTROL}
  again, _, report = wan_dit.import_dit(str(tmp_path), jax.random.key(1), control_channels=0)
  np.testing.assert_array_equal(again["patch_embedding"]["kernel"],
                                params["patch_embedding"]["kernel"][..., :32, :])
  assert report.dropped == [f"patch_embedding.weight[:, 32:{32 + CONTROL}] (control input channels)"]
  assert report.new == []
