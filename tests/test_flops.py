"""The analytic FLOP counter against XLA's cost_analysis() and known key counts.

XLA counts a `while` body (the scanned blocks) once, so the comparisons use one block; it also
counts elementwise work (norms, RoPE, softmax) that the analytic matmul count leaves out, hence
analytic <= XLA and within 6% at a head width of 64.
"""
import jax
import jax.numpy as jnp
import pytest

from apt2_jax import flops
from apt2_jax.configs import sizes
from apt2_jax.models import CausalDiT, DiTConfig, init_params, kv_cache

B, F, H, W, T = 2, 6, 4, 6, 5
TOKENS = (H // 2) * (W // 2)


@pytest.fixture(scope="module")
def one_block():
  config = DiTConfig.from_dict(sizes.model_config(
      "tiny", num_layers=1, dim=128, ffn_dim=512, num_heads=2, text_dim=64, caption_vocab_size=0))
  model = CausalDiT(config)
  return model, init_params(model, jax.random.key(0)), config


def _xla_flops(fn, *args):
  return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def _close(analytic, xla):
  assert 0.94 * xla <= analytic <= xla, (analytic, xla, analytic / xla)


@pytest.mark.parametrize("mode", ["block_causal", "full"])
def test_whole_clip_matches_cost_analysis(one_block, mode):
  model, params, config = one_block
  z = jnp.zeros((B, F, H, W, config.latent_channels))
  text = jnp.zeros((B, T, config.text_dim))
  xla = _xla_flops(lambda p: model.apply({"params": p}, z, z, None, jnp.ones((B,)), text, mode=mode), params)
  analytic = flops.forward_flops(config, batch=B, frames=F, tokens=TOKENS, text_len=T, mode=mode,
                                 count="computed")["total"]
  _close(analytic, xla)


def test_cached_step_matches_cost_analysis(one_block):
  model, params, config = one_block
  z = jnp.zeros((B, 1, H, W, config.latent_channels))
  tkv = model.apply({"params": params}, jnp.zeros((B, T, config.text_dim)), method=CausalDiT.encode_text)
  cache = kv_cache.init_cache(config, B, H, W)
  xla = _xla_flops(lambda p, c: model.apply({"params": p}, z, z, None, jnp.ones((B,)), c, tkv,
                                            method=CausalDiT.step), params, cache)
  # A full window: every key the XLA path multiplies is valid.
  analytic = flops.step_flops(config, batch=B, tokens=TOKENS, text_len=T, index=config.window + 5)
  assert analytic == flops.step_flops(config, batch=B, tokens=TOKENS, text_len=T, index=0, count="computed")
  _close(analytic, xla)


def test_train_step_is_three_forwards(one_block):
  model, params, config = one_block
  z = jnp.zeros((B, F, H, W, config.latent_channels))
  text = jnp.zeros((B, T, config.text_dim))
  loss = lambda p: jnp.mean(model.apply({"params": p}, z, z, None, jnp.ones((B,)), text) ** 2)
  xla = _xla_flops(jax.grad(loss), params)
  analytic = flops.stage1_train_flops(config, batch=B, frames=F, tokens=TOKENS, text_len=T)
  fwd_computed = flops.forward_flops(config, batch=B, frames=F, tokens=TOKENS, text_len=T,
                                     mode="block_causal", count="computed")["total"]
  fwd_valid = flops.forward_flops(config, batch=B, frames=F, tokens=TOKENS, text_len=T,
                                  mode="block_causal")["total"]
  # The analytic count uses valid keys; XLA multiplies the padded ones too. The patch embedding
  # needs no input gradient, so the backward is a little under 2x.
  assert 0.85 * xla <= analytic + 3 * (fwd_computed - fwd_valid) <= 1.02 * xla


def test_valid_keys_known_values():
  config = DiTConfig.from_dict(sizes.model_config("tiny"))  # window N = 3, 2 layers, width 48
  d, L = config.dim, config.num_layers

  def qk_av(index):
    return flops.forward_flops(config, batch=1, frames=1, tokens=4, text_len=2, mode="step",
                               index=index)["self_attention_qk_av"]
  # index 0: self only; 1: self + sink; 2: + one ring frame; >= N + 1: self + sink + N.
  for index, key_frames in [(0, 1), (1, 2), (2, 3), (4, 5), (1000, 5)]:
    assert qk_av(index) == L * 4 * 4 * (key_frames * 4) * d
  # Block-causal whole clip of 6 frames: frames see 1, 2, 3, 4, 5, 5 key frames.
  bc = flops.forward_flops(config, batch=1, frames=6, tokens=4, text_len=2, mode="block_causal")
  assert bc["self_attention_qk_av"] == L * 4 * 4 * 4 * (1 + 2 + 3 + 4 + 5 + 5) * d
  # The peer block is k + 1 steps.
  assert flops.peer_block_flops(config, batch=1, tokens=4, text_len=2, index=9, num_steps=4) == \
      5 * flops.step_flops(config, batch=1, tokens=4, text_len=2, index=9)
  with pytest.raises(ValueError, match="count"):
    flops.forward_flops(config, batch=1, frames=1, tokens=4, text_len=2, mode="step", index=0, count="x")


def test_apt2_8b_step_scale():
  """The paper's step: ~8B parameters x 1196 tokens, plus attention over 32 frames."""
  config = DiTConfig.from_dict(sizes.model_config("apt2_8b"))
  f = flops.forward_flops(config, batch=1, frames=1, tokens=1196, text_len=512, mode="step", index=100)
  assert 35e12 < f["total"] < 45e12, f["total"]
  assert f["self_attention_qk_av"] == 36 * 4 * 1196 * 32 * 1196 * 3584
