"""The AAPT discriminator: the generator's block-causal backbone plus per-frame logit heads.

Inputs line up with the generator's: for block s, the frame to judge (latent frame s + 1) takes the
noise slot, noised to the discriminator's time `t` as in APT (`(1 - t) x + t eps`), the recycled
slot holds the previous frame of the same video (s), and the control is that of frame s + 1. The
whole clip goes through in one block-causal pass, so frame s + 1 is judged in the context of the
sink and the window before it, and every frame gets its own logit.

Heads (APT's design, made per frame): after each block listed in `head_layers` (1-based, e.g. the
paper's 16, 26, 36 of 36), one learnable query token per head cross-attends to the visual tokens of
each frame separately; the pooled vectors of all heads are concatenated, layer-normalised and
projected to one logit per frame.

The parameters are `{'backbone': <CausalDiT params>, 'heads': ...}`, so D is initialised from a
stage-1 checkpoint by copying its generator parameters into `backbone`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from apt2_jax.models.dit import CausalDiT, DiTConfig, unbox


def default_head_layers(num_layers: int) -> tuple[int, ...]:
  """The paper's depths (16, 26, 36 of 36) scaled to `num_layers`, deduplicated, 1-based."""
  layers = sorted({max(1, round(num_layers * f)) for f in (16 / 36, 26 / 36, 1.0)})
  return tuple(layers)


class FrameQueryHead(nn.Module):
  """One learnable query per frame position cross-attending to that frame's tokens."""
  dim: int
  num_heads: int

  @nn.compact
  def __call__(self, h):
    """h: [B, F, P, dim] -> [B, F, dim]."""
    b, f, p, d = h.shape
    query = self.param("query", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                       (1, d), jnp.float32)
    x = nn.LayerNorm(name="norm")(h.astype(jnp.float32)).reshape(b * f, p, d)
    q = jnp.broadcast_to(query[None], (b * f, 1, d))
    out = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attn")(q, x)
    return out.reshape(b, f, d)


class Discriminator(nn.Module):
  config: DiTConfig
  head_layers: tuple = ()

  def setup(self):
    layers = tuple(self.head_layers) or default_head_layers(self.config.num_layers)
    bad = [l for l in layers if not 1 <= l <= self.config.num_layers]
    if bad:
      raise ValueError(f"discriminator head_layers {bad} outside 1..{self.config.num_layers}")
    self._layers = layers
    self.backbone = CausalDiT(self.config)
    self.heads = [FrameQueryHead(self.config.dim, max(1, self.config.num_heads // 2), name=f"head_{l}")
                  for l in layers]
    self.out_norm = nn.LayerNorm(name="out_norm")
    self.out_proj = nn.Dense(1, name="out_proj")

  def __call__(self, judged, recycled, control, t, text):
    """Per-frame logits.

    Args:
      judged: [B, F, h, w, C] the frames to judge, already noised to `t` (see `noise_judged`).
      recycled: [B, F, h, w, C] the frame before each judged frame, from the same video.
      control: [B, F, h, w, Cc] or None; t: [B] or [B, F]; text: tokens or embeddings.
    Returns:
      float32 [B, F]: one logit per judged latent frame.
    """
    _, hidden = self.backbone(judged, recycled, control, t, text, mode="block_causal", return_hidden=True)
    pooled = [head(hidden[l - 1]) for l, head in zip(self._layers, self.heads)]
    x = self.out_norm(jnp.concatenate(pooled, axis=-1))
    return self.out_proj(x)[..., 0].astype(jnp.float32)


def noise_judged(frames, t, eps):
  """Noises the judged frames to the discriminator's time: `(1 - t) x + t eps`; t: [B] or [B, F]."""
  t = t.reshape(t.shape + (1,) * (frames.ndim - t.ndim))
  return (1.0 - t) * frames + t * eps


def clip_inputs(video, controls=None):
  """Lines a latent video up for D (and for teacher forcing).

  Args:
    video: [B, F, h, w, C] latent frames x_0 .. x_{F-1} (x_0 = the first frame).
    controls: [B, F, h, w, Cc] control of each frame, or None.
  Returns:
    (judged [B, F-1, ...] = x_1..x_{F-1}, recycled [B, F-1, ...] = x_0..x_{F-2},
     controls of x_1..x_{F-1} or None).
  """
  return video[:, 1:], video[:, :-1], (None if controls is None else controls[:, 1:])


def init_discriminator_params(disc: Discriminator, rng, batch=1, frames=2, latent_hw=(4, 4), text_len=4,
                              boxed=False):
  c = disc.config
  shape = (batch, frames) + tuple(latent_hw) + (c.latent_channels,)
  z = jnp.zeros(shape)
  ctrl = jnp.zeros(shape[:-1] + (c.control_channels,)) if c.control_channels else None
  text = jnp.ones((batch, text_len), jnp.int32) if c.caption_vocab_size else jnp.zeros((batch, text_len, c.text_dim))
  params = jax.jit(disc.init)(rng, z, z, ctrl, jnp.zeros((batch,)), text)["params"]
  return params if boxed else unbox(params)


def from_generator(d_params, g_params):
  """D initialised from a generator (stage-1) checkpoint: the backbone takes G's parameters."""
  g_struct = jax.tree.structure(g_params)
  if g_struct != jax.tree.structure(d_params["backbone"]):
    raise ValueError("generator parameters do not match the discriminator backbone; "
                     f"generator tree {g_struct} vs backbone tree {jax.tree.structure(d_params['backbone'])}")
  for a, b in zip(jax.tree.leaves(g_params), jax.tree.leaves(d_params["backbone"])):
    if a.shape != b.shape:
      raise ValueError(f"generator parameter shape {a.shape} does not match backbone shape {b.shape}")
  return dict(d_params, backbone=g_params)
