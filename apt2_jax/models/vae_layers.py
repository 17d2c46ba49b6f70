"""The causal 3D VAE's layers (Wan2.1 layout, channels-last): causal 3D and 2D convolutions, RMS
norm, residual and attention blocks, spatial/temporal resampling and the mid/up blocks, each
taking and returning its part of the feature cache (`apt2_jax.models.vae` documents the cache and
builds the encoder, decoder and VAE from these)."""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Cache = Any  # nested dict of arrays (or None leaves for convolutions without temporal context)

# LeCun normal without truncation: the truncated normal's inverse erf makes XLA compile `init`
# several times slower, for no benefit here.
_KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "normal")

CACHE_T = 2  # time steps of context a causal 3x3x3 convolution keeps between calls


def _conv(x: Array, kernel: Array, bias: Array, strides, padding) -> Array:
  """N-d convolution, channels-last, over the trailing spatial axes of `x`."""
  nd = kernel.ndim - 2
  batch_shape = x.shape[:x.ndim - nd - 1]
  x = x.reshape((-1,) + x.shape[x.ndim - nd - 1:])
  spatial = "DHW"[3 - nd:]
  y = jax.lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=strides, padding=padding,
      dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
  y = y + bias.astype(y.dtype)
  return y.reshape(batch_shape + y.shape[1:])


def _causal_conv3d(x: Array, kernel: Array, bias: Array, strides, pad_hw) -> Array:
  """Valid-in-time, 'same'-in-space 3D convolution as one 2D convolution per output frame.

  The `kt` input frames each output frame sees are stacked on channels, and the kernel reshaped
  to `[kh, kw, kt * Cin, Cout]`: the same sums as the 3D convolution, but XLA's 2D convolutions
  (and their gradients) run several times faster than its 3D ones on CPU, at the cost of a `kt`
  times larger input buffer.
  """
  kt, kh, kw, cin, cout = kernel.shape
  st, sh, sw = strides
  t_out = (x.shape[1] - kt) // st + 1
  frames = [x[:, dt:dt + st * (t_out - 1) + 1:st] for dt in range(kt)]
  stacked = frames[0] if kt == 1 else jnp.concatenate(frames, axis=-1)  # [B, T', H, W, kt*Cin]
  k2 = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kt * cin, cout)
  return _conv(stacked, k2, bias, (sh, sw), ((pad_hw[0], pad_hw[0]), (pad_hw[1], pad_hw[1])))


class CausalConv3d(nn.Module):
  """3D convolution, causal in time, 'same' in space.

  `__call__(x [B, T, H, W, Cin], cache [B, cache_t, H, W, Cin] | None) -> (y, new_cache)`:
  the cache (zeros when None: the clip's start) is prepended in time and the convolution is valid
  in time, so a clip cut into chunks gives the same output as the whole clip. `new_cache` holds
  the last `cache_t` input frames (None for a temporal kernel of 1).
  """
  features: int
  kernel_size: tuple[int, int, int] = (3, 3, 3)
  strides: tuple[int, int, int] = (1, 1, 1)
  cache_t: Optional[int] = None  # default: kernel_t - 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cache: Optional[Array] = None):
    kt, kh, kw = self.kernel_size
    kernel = self.param("kernel", _KERNEL_INIT,
                        (kt, kh, kw, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    cache_t = kt - 1 if self.cache_t is None else self.cache_t
    new_cache = None
    if cache_t:
      if cache is None:
        cache = jnp.zeros(x.shape[:1] + (cache_t,) + x.shape[2:], x.dtype)
      x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
      new_cache = x[:, x.shape[1] - cache_t:]
    if x.shape[1] < kt:  # too little time for one output step (a chunk of a single frame)
      return jnp.zeros(x.shape[:1] + (0,) + x.shape[2:4] + (self.features,), x.dtype), new_cache
    y = _causal_conv3d(x, kernel, bias, self.strides, (kh // 2, kw // 2))
    return y, new_cache


class Conv2d(nn.Module):
  """Per-frame 2D convolution `[..., H, W, Cin] -> [..., H', W', features]`."""
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: Any = ((1, 1), (1, 1))
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", _KERNEL_INIT,
                        self.kernel_size + (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return _conv(x, kernel, bias, self.strides, self.padding)


class RMSNorm(nn.Module):
  """Wan's RMS norm over channels: `x / ||x|| * sqrt(C) * scale` (F.normalize, eps 1e-12)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
    y = x32 / jnp.maximum(norm, 1e-12) * np.sqrt(x.shape[-1])
    return (y * scale).astype(x.dtype)


class ResidualBlock(nn.Module):
  """RMSNorm-SiLU-CausalConv3d twice, plus a (1x1x1 projected) shortcut.

  `(x [B, T, H, W, in], cache {'conv1', 'conv2'} | None) -> (y [B, T, H, W, out], cache)`.
  """
  out_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cache: Optional[Cache] = None, deterministic: bool = True):
    cache = cache or {}
    h = x
    if x.shape[-1] != self.out_dim:
      h, _ = CausalConv3d(self.out_dim, (1, 1, 1), dtype=self.dtype, name="conv_shortcut")(x)
    x = nn.silu(RMSNorm(name="norm1")(x))
    x, c1 = CausalConv3d(self.out_dim, dtype=self.dtype, name="conv1")(x, cache.get("conv1"))
    x = nn.silu(RMSNorm(name="norm2")(x))
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x, c2 = CausalConv3d(self.out_dim, dtype=self.dtype, name="conv2")(x, cache.get("conv2"))
    return x + h, {"conv1": c1, "conv2": c2}


class AttentionBlock(nn.Module):
  """Single-head self-attention within each frame (no temporal mixing, hence no cache).

  `x [B, T, H, W, C] -> [B, T, H, W, C]`.
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, t, h, w, c = x.shape
    identity = x
    x = RMSNorm(name="norm")(x)
    qkv = Conv2d(3 * c, (1, 1), padding="VALID", dtype=self.dtype, name="to_qkv")(x)
    q, k, v = jnp.split(qkv.reshape(b * t, h * w, 1, 3 * c), 3, axis=-1)
    x = jax.nn.dot_product_attention(q, k, v)  # scale 1 / sqrt(c), one head
    x = x.reshape(b, t, h, w, c)
    x = Conv2d(c, (1, 1), padding="VALID", dtype=self.dtype, name="proj")(x)
    return x + identity


def _upsample_nearest(x: Array) -> Array:
  """2x nearest-neighbour spatial upsampling of `[..., H, W, C]`."""
  x = jnp.repeat(x, 2, axis=-3)
  return jnp.repeat(x, 2, axis=-2)


class Resample(nn.Module):
  """Wan's resampling: `downsample2d`, `downsample3d`, `upsample2d`, `upsample3d`.

  Spatial resampling is per frame (a 3x3 conv after nearest 2x upsampling, or a stride-2 3x3 conv
  after padding right and bottom by one). Temporal resampling:
  - `upsample3d`: `time_conv` (causal, kernel 3) doubles the channels, which are interleaved into
    2x the frames. The clip's frame 0 (`first`) passes through unchanged and the convolution
    starts from zeros at frame 1, as Wan decodes.
  - `downsample3d`: `time_conv` (kernel 3, stride 2, no padding) over the previous chunk's last
    frame and this chunk; frame 0 passes through unchanged, so `1 + 2k` frames -> `1 + k`.
  """
  dim: int
  mode: str
  upsample_out_dim: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cache: Optional[Cache] = None, first: bool = True):
    cache = cache or {}
    new_cache = {}
    if self.mode == "upsample3d":
      time_conv = CausalConv3d(2 * self.dim, (3, 1, 1), dtype=self.dtype, name="time_conv")
      head, rest = (x[:, :1], x[:, 1:]) if first else (x[:, :0], x)
      c = cache.get("time_conv")
      if c is None:
        c = jnp.zeros(x.shape[:1] + (CACHE_T,) + x.shape[2:], x.dtype)
      if rest.shape[1]:
        y, c = time_conv(rest, c)
        b, t, h, w, _ = y.shape
        # [B, T, H, W, (2, C)] -> [B, T, 2, H, W, C] -> [B, 2T, H, W, C] (Wan's interleave).
        y = y.reshape(b, t, h, w, 2, self.dim).transpose(0, 1, 4, 2, 3, 5)
        rest = y.reshape(b, 2 * t, h, w, self.dim)
      elif self.is_initializing():
        time_conv(c)  # create the parameters even when the first call has no frame to convolve
      new_cache["time_conv"] = c
      x = jnp.concatenate([head, rest], axis=1)

    if self.mode.startswith("upsample"):
      out_dim = self.upsample_out_dim or self.dim // 2
      x = Conv2d(out_dim, dtype=self.dtype, name="resample")(_upsample_nearest(x))
    elif self.mode.startswith("downsample"):
      x = Conv2d(self.dim, strides=(2, 2), padding=((0, 1), (0, 1)), dtype=self.dtype,
                 name="resample")(x)
    else:
      raise ValueError(f"Unknown resample mode {self.mode!r}")

    if self.mode == "downsample3d":
      time_conv = CausalConv3d(self.dim, (3, 1, 1), (2, 1, 1), cache_t=1, dtype=self.dtype,
                               name="time_conv")
      if first:
        y, c = time_conv(x, x[:, :0])  # no padding: windows [0,1,2], [2,3,4], ...
        x = jnp.concatenate([x[:, :1], y], axis=1)
      else:
        x, c = time_conv(x, cache.get("time_conv"))
      new_cache["time_conv"] = c
    return x, new_cache


class MidBlock(nn.Module):
  """Residual block, attention, residual block at the lowest resolution."""
  dropout: float = 0.0
  remat: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cache: Optional[Cache] = None, deterministic: bool = True):
    cache = cache or {}
    block = _residual_block_cls(self.remat)
    c = x.shape[-1]
    x, c0 = block(c, self.dropout, self.dtype, name="resnets_0")(
        x, cache.get("resnets_0"), deterministic)
    x = AttentionBlock(self.dtype, name="attentions_0")(x)
    x, c1 = block(c, self.dropout, self.dtype, name="resnets_1")(
        x, cache.get("resnets_1"), deterministic)
    return x, {"resnets_0": c0, "resnets_1": c1}


def _residual_block_cls(remat: bool):
  return nn.remat(ResidualBlock, static_argnums=(3,)) if remat else ResidualBlock


class UpBlock(nn.Module):
  """Decoder scale: `num_resnets` residual blocks, then an optional 2x upsampling."""
  out_dim: int
  num_resnets: int
  upsample_mode: Optional[str] = None
  dropout: float = 0.0
  remat: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cache: Optional[Cache] = None, first: bool = True,
               deterministic: bool = True):
    cache = cache or {}
    new_cache = {}
    block = _residual_block_cls(self.remat)
    for j in range(self.num_resnets):
      name = f"resnets_{j}"
      x, new_cache[name] = block(self.out_dim, self.dropout, self.dtype, name=name)(
          x, cache.get(name), deterministic)
    if self.upsample_mode is not None:
      x, new_cache["upsamplers_0"] = Resample(self.out_dim, self.upsample_mode, dtype=self.dtype,
                                              name="upsamplers_0")(
          x, cache.get("upsamplers_0"), first)
    return x, new_cache
