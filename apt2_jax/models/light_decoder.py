"""A light streaming decoder for the causal VAE's latents (`VAEConfig.decoder_type = "light"`).

In the spirit of the paper's slim real-time decoder, and much lighter: a small convolutional
decoder, distilled from the full decoder behind its frozen encoder (stage `vae_distill`, config
`experiments/vae.py:light_decoder`), that turns one latent frame into 4 video frames in tens of
milliseconds on a CPU (`python -m apt2_jax.benchmark_decoder`).

Architecture (`VAEConfig.light_dims = (C0, C1, C2, C3)`, `light_blocks = (n0, n1, n2, n3)`):

  latent frame z [B, 1, h, w, z_dim]                       (after the VAE's 1x1 post_quant_conv)
  conv_in     causal 2x3x3 conv -> C0      sees this latent frame and the previous one
  mem_j       n0 residual blocks at C0; the first conv of each is causal 2x3x3 (it sees the
              previous latent frame's features), the second 3x3 per frame
  to_frames   ReLU, 1x1 conv C0 -> 4 * C1, split into 4 video frames (the clip's frame 0, which
              decodes to one video frame, uses its own 1x1 conv `to_first` C0 -> C1)
  -- from here on every video frame alone (2D convolutions): --
  scale 1     n1 residual blocks at C1 (h x w), then `up_1`: 1x1 conv C1 -> 4 * C2 and a 2x
              pixel shuffle (depth-to-space)
  scale 2     n2 residual blocks at C2 (2h x 2w), then `up_2`: 1x1 conv C2 -> 4 * C3, shuffle
  scale 3     n3 residual blocks at C3 (4h x 4w), then `conv_out`: ReLU, 3x3 conv C3 -> 4 * 3
              and a last shuffle to RGB at 8h x 8w
  Residual block: x + conv3x3(ReLU(conv3x3(ReLU(x)))). No normalisation, ReLU only (cheap on CPU).

The heavy work stays at low resolution; the full-resolution output is a pixel shuffle of a 3x3
convolution at 4h x 4w: per latent frame at 256 x 256, 1.5 GFLOP (XLA's count), ~3k
multiply-adds per output pixel, where the full `small` decoder does 172 GFLOP (~330k).

Temporal state (the `cache`, fixed shapes, the same protocol as `vae.Decoder`): `conv_in` keeps
the previous latent frame `[B, 1, h, w, z_dim]`, each `mem_j` its input of the previous latent
frame `[B, 1, h, w, C0]`. Zeros are the clip's start, so `decode_step` from a zero cache, one
latent frame at a time, equals the whole-clip decode (tested). The video frames of one latent
frame share its features; there is no state at the video-frame scales.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

TEMPORAL_FACTOR = 4
DECODER_TYPES = ("causal", "light")  # VAEConfig.decoder_type: Wan's causal decoder, or this one

# LeCun normal, as `vae_layers._KERNEL_INIT` (and `vae.init_params`, which draws every "kernel" alike).
_KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "normal")

# Defaults of `VAEConfig.light_dims` / `light_blocks` (the `light_decoder` config).
LIGHT_DIMS = (64, 48, 32, 16)
LIGHT_BLOCKS = (1, 1, 1, 0)


def check_config(decoder_type: str, dims, blocks) -> None:
  """Raises ValueError naming the VAEConfig field that a light decoder cannot use."""
  if decoder_type not in DECODER_TYPES:
    raise ValueError(f"VAEConfig.decoder_type={decoder_type!r} is not one of {DECODER_TYPES}")
  if len(tuple(dims)) != 4 or any(int(d) < 1 for d in dims):
    raise ValueError(f"VAEConfig.light_dims={tuple(dims)} must be 4 positive channel counts "
                     "(C0 at the latent frame, C1 per video frame at latent resolution, C2 at 2x, "
                     "C3 at 4x)")
  if len(tuple(blocks)) != 4 or any(int(n) < 0 for n in blocks):
    raise ValueError(f"VAEConfig.light_blocks={tuple(blocks)} must be 4 residual-block counts >= 0 "
                     "(one per scale of light_dims)")


def _conv2d(x: Array, kernel: Array, bias: Array, padding) -> Array:
  """Per-frame 2D convolution, channels-last, over the trailing `[H, W, C]` of `x`."""
  lead = x.shape[:-3]
  y = jax.lax.conv_general_dilated(
      x.reshape((-1,) + x.shape[-3:]), kernel.astype(x.dtype), (1, 1), padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = y + bias.astype(y.dtype)
  return y.reshape(lead + y.shape[1:])


class Conv(nn.Module):
  """Per-frame `k x k` convolution ('same' padding) `[..., H, W, Cin] -> [..., H, W, features]`."""
  features: int
  kernel: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel
    kernel = self.param("kernel", _KERNEL_INIT, (k, k, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return _conv2d(x, kernel, bias, ((k // 2, k // 2), (k // 2, k // 2)))


class CausalConv(nn.Module):
  """2x3x3 convolution causal in time: output frame t sees input frames t - 1 and t.

  `(x [B, F, H, W, Cin], cache [B, 1, H, W, Cin] | None) -> (y [B, F, H, W, features], cache)`:
  the cache (zeros when None: the clip's start) is the input frame before `x`; the new cache is
  `x`'s last frame. The two frames are stacked on channels: one 2D convolution per output frame.
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cache: Optional[Array] = None):
    cin = x.shape[-1]
    kernel = self.param("kernel", _KERNEL_INIT, (2, 3, 3, cin, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    if cache is None:
      cache = jnp.zeros(x.shape[:1] + (1,) + x.shape[2:], x.dtype)
    prev = jnp.concatenate([cache.astype(x.dtype), x[:, :-1]], axis=1)
    stacked = jnp.concatenate([prev, x], axis=-1)  # [B, F, H, W, 2 Cin]
    k2 = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(3, 3, 2 * cin, self.features)
    return _conv2d(stacked, k2, bias, ((1, 1), (1, 1))), x[:, -1:]


def pixel_shuffle(x: Array, factor: int = 2) -> Array:
  """Depth-to-space `[..., H, W, f*f*C] -> [..., f*H, f*W, C]`."""
  *lead, h, w, c = x.shape
  c //= factor * factor
  x = x.reshape(*lead, h, w, factor, factor, c)
  n = len(lead)
  x = jnp.transpose(x, tuple(range(n)) + (n, n + 2, n + 1, n + 3, n + 4))
  return x.reshape(*lead, h * factor, w * factor, c)


class ResBlock2d(nn.Module):
  """Per-frame `x + conv3x3(ReLU(conv3x3(ReLU(x))))` on `[..., H, W, C]`."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    h = Conv(c, dtype=self.dtype, name="conv1")(nn.relu(x))
    h = Conv(c, dtype=self.dtype, name="conv2")(nn.relu(h))
    return x + h


class MemBlock(nn.Module):
  """Residual block at the latent frame whose first conv is causal in time (2x3x3).

  `(x [B, F, h, w, C], cache [B, 1, h, w, C] | None) -> (y, new cache)`.
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cache: Optional[Array] = None):
    c = x.shape[-1]
    h, new_cache = CausalConv(c, dtype=self.dtype, name="conv1")(nn.relu(x), cache)
    h = Conv(c, dtype=self.dtype, name="conv2")(nn.relu(h))
    return x + h, new_cache


class LightDecoder(nn.Module):
  """Latents `[B, F, h, w, z_dim]` -> video `[B, 1 + 4(F-1) if first else 4F, 8h, 8w, 3]`.

  The same call and cache protocol as `apt2_jax.models.vae.Decoder`: `(x, cache, first,
  deterministic) -> (video, cache)`, unclipped. `config` is the VAEConfig (its `light_dims`,
  `light_blocks`, `dtype`).
  """
  config: Any

  @nn.compact
  def __call__(self, x: Array, cache: Optional[Any] = None, first: bool = True,
               deterministic: bool = True):
    del deterministic  # no dropout
    cfg = self.config
    c0, c1, c2, c3 = (int(c) for c in cfg.light_dims)
    n0, n1, n2, n3 = (int(n) for n in cfg.light_blocks)
    dt = cfg.dtype
    cache = cache or {}
    new_cache = {}
    x, new_cache["conv_in"] = CausalConv(c0, dtype=dt, name="conv_in")(
        x, cache.get("conv_in"))
    for j in range(n0):
      x, new_cache[f"mem_{j}"] = MemBlock(dt, name=f"mem_{j}")(x, cache.get(f"mem_{j}"))

    # Latent frame -> video frames: 1 for the clip's frame 0, 4 for every later one.
    x = nn.relu(x)
    b, f, h, w, _ = x.shape
    parts = []
    if first:
      parts.append(Conv(c1, 1, dt, name="to_first")(x[:, :1]))
      x = x[:, 1:]
    if x.shape[1]:
      y = Conv(TEMPORAL_FACTOR * c1, 1, dt, name="to_frames")(x)
      y = y.reshape(b, x.shape[1], h, w, TEMPORAL_FACTOR, c1)
      parts.append(jnp.moveaxis(y, 4, 2).reshape(b, TEMPORAL_FACTOR * x.shape[1], h, w, c1))
    x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)

    # Per video frame: three 2x pixel-shuffle upsamplings.
    for j in range(n1):
      x = ResBlock2d(dt, name=f"scale1_{j}")(x)
    x = pixel_shuffle(Conv(4 * c2, 1, dt, name="up_1")(x))
    for j in range(n2):
      x = ResBlock2d(dt, name=f"scale2_{j}")(x)
    x = pixel_shuffle(Conv(4 * c3, 1, dt, name="up_2")(x))
    for j in range(n3):
      x = ResBlock2d(dt, name=f"scale3_{j}")(x)
    x = pixel_shuffle(Conv(4 * 3, 3, dt, name="conv_out")(nn.relu(x)))
    return x, new_cache
