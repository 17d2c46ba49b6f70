"""Model conditioning pieces: timestep embedding, caption encoder (controls: tests/test_controls.py)."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt2_jax.models import conditioning


def test_timestep_embedding_is_cos_then_sin():
  t = jnp.array([0.0, 250.0, 1000.0])
  emb = np.asarray(conditioning.timestep_embedding(t, 8))
  assert emb.shape == (3, 8) and emb.dtype == np.float32
  np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])
  freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(250 * freqs), np.sin(250 * freqs)]),
                             rtol=1e-5, atol=1e-5)


def test_caption_encoder_zeroes_padding():
  config = types.SimpleNamespace(caption_dim=16, caption_vocab_size=10, caption_max_len=6,
                                 caption_layers=1, text_dim=8)
  encoder = conditioning.CaptionEncoder(config)
  tokens = jnp.array([[3, 4, 5, 0, 0], [1, 0, 0, 0, 0]], jnp.int32)
  params = encoder.init(jax.random.key(0), tokens)
  out = np.asarray(encoder.apply(params, tokens))
  assert out.shape == (2, 5, 8)
  np.testing.assert_array_equal(out[0, 3:], 0.0)
  np.testing.assert_array_equal(out[1, 1:], 0.0)
  assert np.abs(out[0, :3]).min() > 0
  with pytest.raises(ValueError, match="longer than model.caption_max_len"):
    encoder.apply(params, jnp.ones((1, 7), jnp.int32))
