"""Conditioning: timestep embedding, Wan's condition embedder, the built-in caption encoder."""
from __future__ import annotations

import math

import jax.numpy as jnp
import flax.linen as nn

from apt2_jax.models.attention import dense


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


# ================================================================================================
# Camera control as per-pixel rays (AAPT: ray origin and direction relative to the previous frame)
# ================================================================================================

# Fixed normalisation (measured on the camera world's training trajectories,
# `tests/test_conditioning.py` re-measures them): each channel group is divided by the standard
# deviation it has over those trajectories, so the control channels have unit std at training and
# inference alike. Directions are taken relative to the no-motion ray, so a still camera is zero.
RAY_ORIGIN_STD = (0.00071, 0.00041, 0.0296)     # per channel x, y, z (camera frame)
RAY_DIRECTION_STD = (0.0211, 0.0128, 0.0081)
CAMERA_FOV_DEG = 60.0
RAY_CHANNELS = 6


def _rot(axis: int, a):
  c, s = jnp.cos(a), jnp.sin(a)
  o, z = jnp.ones_like(a), jnp.zeros_like(a)
  if axis == 0:
    rows = [[o, z, z], [z, c, -s], [z, s, c]]
  elif axis == 1:
    rows = [[c, z, s], [z, o, z], [-s, z, c]]
  else:
    rows = [[c, -s, z], [s, c, z], [z, z, o]]
  return jnp.stack([jnp.stack(r, -1) for r in rows], -2)


def camera_ray_maps(relative, height: int, width: int, fov_deg: float = CAMERA_FOV_DEG, normalize=True):
  """Per-pixel rays of each frame, expressed in the previous frame's camera.

  Args:
    relative: [..., 5] relative camera controls (pan, tilt, zoom, forward, roll) of each frame with
      respect to the previous one (`apt2_jax.data.worlds.compose_camera`'s parameterisation:
      rotation `Ry(pan) Rx(tilt) Rz(roll)`, then a move of `forward` along the new optical axis,
      log focal length changed by `zoom`).
    height, width: the grid of pixel centres (e.g. the latent resolution).
  Returns:
    float32 [..., height, width, 6]: ray origin (3) and unit ray direction minus the still
    camera's (3), each scaled to unit std (`normalize`).
  """
  relative = jnp.asarray(relative, jnp.float32)
  pan, tilt, zoom, forward, roll = [relative[..., i] for i in range(5)]
  rotation = _rot(1, pan) @ _rot(0, tilt) @ _rot(2, roll)  # [..., 3, 3]
  focal = 0.5 * width / jnp.tan(jnp.deg2rad(fov_deg) / 2)
  y, x = jnp.meshgrid(jnp.arange(height) + 0.5 - height / 2, jnp.arange(width) + 0.5 - width / 2, indexing="ij")
  scale = jnp.exp(zoom)[..., None, None]
  rays = jnp.stack(jnp.broadcast_arrays(x / (focal * scale), y / (focal * scale), jnp.ones_like(x * scale)), -1)
  rays = rays / jnp.linalg.norm(rays, axis=-1, keepdims=True)
  still = jnp.stack([x / focal, y / focal, jnp.ones_like(x)], -1)
  still = still / jnp.linalg.norm(still, axis=-1, keepdims=True)
  direction = jnp.einsum("...ij,...hwj->...hwi", rotation, rays) - still
  origin = forward[..., None] * rotation[..., :, 2]  # [..., 3]
  origin = jnp.broadcast_to(origin[..., None, None, :], direction.shape)
  if normalize:
    origin = origin / jnp.asarray(RAY_ORIGIN_STD, jnp.float32)
    direction = direction / jnp.asarray(RAY_DIRECTION_STD, jnp.float32)
  return jnp.concatenate([origin, direction], axis=-1)


CONTROL_ENCODINGS = ("raw", "rays")
FRAMES_PER_LATENT = 4


def control_channels(encoding: str, control_dim: int) -> int:
  """Channels of the model's control input for per-video-frame controls of width `control_dim`."""
  if encoding == "raw":
    return FRAMES_PER_LATENT * control_dim
  if encoding == "rays":
    if control_dim != 5:
      raise ValueError(f"control_encoding='rays' needs 5-d camera controls, got control_dim={control_dim}")
    return FRAMES_PER_LATENT * RAY_CHANNELS
  raise ValueError(f"control_encoding={encoding!r} is not one of {CONTROL_ENCODINGS}")


def latent_control_maps(controls, latent_frames: int, height: int, width: int, encoding: str = "raw"):
  """Per-video-frame controls `[B, T, D]` -> the model's control channels `[B, F, h, w, Cc]`.

  Latent frame j >= 1 covers video frames 4j-3 .. 4j; their 4 controls are concatenated (camera
  controls are relative to the previous frame, so all 4 are needed): as raw values broadcast over
  the latent pixels (`raw`, Cc = 4 D), or as per-pixel ray maps (`rays`, camera only, Cc = 4 x 6).
  Latent frame 0 (the first image) has no motion: zeros. This is the one definition the trainer,
  the evaluation and the streaming generator share.
  """
  b, t, d = controls.shape
  if t != 1 + FRAMES_PER_LATENT * (latent_frames - 1):
    raise ValueError(f"controls cover {t} video frames, the clip has {latent_frames} latent frames")
  later = controls[:, 1:].reshape(b, latent_frames - 1, FRAMES_PER_LATENT, d)
  if encoding == "raw":
    maps = jnp.broadcast_to(later.reshape(b, latent_frames - 1, 1, 1, FRAMES_PER_LATENT * d),
                            (b, latent_frames - 1, height, width, FRAMES_PER_LATENT * d))
  elif encoding == "rays":
    control_channels("rays", d)
    rays = camera_ray_maps(later, height, width)  # [B, F-1, 4, h, w, 6]
    maps = jnp.moveaxis(rays, 2, -2).reshape(b, latent_frames - 1, height, width, FRAMES_PER_LATENT * RAY_CHANNELS)
  else:
    raise ValueError(f"control_encoding={encoding!r} is not one of {CONTROL_ENCODINGS}")
  zeros = jnp.zeros((b, 1) + maps.shape[2:], maps.dtype)
  return jnp.concatenate([zeros, maps.astype(jnp.float32)], axis=1)
