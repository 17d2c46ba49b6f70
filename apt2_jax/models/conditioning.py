"""Conditioning: timestep embedding, Wan's condition embedder, the built-in caption encoder."""
from __future__ import annotations

import math

import jax.numpy as jnp
import flax.linen as nn

from apt2_jax.models.attention import dense
# The control encoding lives in `apt2_jax.controls`.


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """Sinusoidal embedding of `t` (Wan's scale: t in [0, 1000]) as [cos | sin], float32 `[..., dim]`.

  Matches diffusers' `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimeTextEmbedder(nn.Module):
  """Wan2.1 `condition_embedder`: time MLP, 6-way modulation projection, text projection."""
  config: object

  def setup(self):
    c = self.config
    self.time_embedder_linear_1 = dense(c.dim, ("freq", "embed"), "time_embedder_linear_1", c)
    self.time_embedder_linear_2 = dense(c.dim, ("embed", "embed_out"), "time_embedder_linear_2", c)
    self.time_proj = dense(6 * c.dim, ("embed", "mod"), "time_proj", c)
    self.text_embedder_linear_1 = dense(c.dim, ("text_embed", "embed"), "text_embedder_linear_1", c)
    self.text_embedder_linear_2 = dense(c.dim, ("embed", "embed_out"), "text_embedder_linear_2", c)

  def time(self, t):
    """t: [...] in [0, 1]. Returns (temb [..., dim], modulation [..., 6, dim]), float32."""
    c = self.config
    e = timestep_embedding(t * 1000.0, c.freq_dim)
    temb = self.time_embedder_linear_2(nn.silu(self.time_embedder_linear_1(e))).astype(jnp.float32)
    mod = self.time_proj(nn.silu(temb)).astype(jnp.float32)
    return temb, mod.reshape(mod.shape[:-1] + (6, c.dim))

  def text(self, text):
    """text: [B, T, text_dim] embeddings. Returns [B, T, dim]."""
    h = nn.gelu(self.text_embedder_linear_1(text), approximate=True)
    return self.text_embedder_linear_2(h)

  def __call__(self, t, text):
    return self.time(t), self.text(text)


class CaptionEncoder(nn.Module):
  """A small text encoder trained with the model: token embedding and a few pre-LN transformer
  layers, producing `[B, T, text_dim]` in place of precomputed umT5 embeddings (no text model is
  downloaded). Padding tokens (id 0) are masked out of the attention and zeroed in the output, as
  Wan's padded umT5 sequences are."""
  config: object

  @nn.compact
  def __call__(self, tokens):
    c = self.config
    width = c.caption_dim
    mask = tokens > 0  # [B, T]
    x = nn.Embed(c.caption_vocab_size, width, name="token_embedding",
                 embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "caption")))(tokens)
    if tokens.shape[1] > c.caption_max_len:
      raise ValueError(f"caption of {tokens.shape[1]} tokens is longer than model.caption_max_len={c.caption_max_len}")
    pos = self.param("position_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "caption")),
                     (c.caption_max_len, width))
    x = x + pos[None, :tokens.shape[1]]
    attn_mask = nn.make_attention_mask(mask, mask)
    for i in range(c.caption_layers):
      y = nn.LayerNorm(name=f"layer_{i}_norm1")(x)
      y = nn.MultiHeadDotProductAttention(num_heads=max(1, width // 64), name=f"layer_{i}_attn")(y, y, mask=attn_mask)
      x = x + y
      y = nn.LayerNorm(name=f"layer_{i}_norm2")(x)
      y = nn.Dense(4 * width, name=f"layer_{i}_mlp_in")(y)
      x = x + nn.Dense(width, name=f"layer_{i}_mlp_out")(nn.gelu(y))
    x = nn.LayerNorm(name="final_norm")(x)
    x = nn.Dense(c.text_dim, name="out_proj")(x)
    return jnp.where(mask[..., None], x, 0.0)
