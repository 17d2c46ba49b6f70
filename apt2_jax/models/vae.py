"""Causal 3D video VAE (Wan2.1 layout) with a streaming, fixed-shape decoder.

The architecture mirrors diffusers' `AutoencoderKLWan` (Wan2.1) so that its weights import
unchanged (`apt2_jax.convert.wan_vae`): causal 3D convolutions, RMS-normalised residual blocks,
one single-head spatial attention in the middle block, 2x spatial resampling at every scale but
the last and 2x temporal resampling at two of them (4x in time, 8x in each spatial axis), a KL
bottleneck and Wan's per-channel latent normalisation.

Time is causal. Video frame 0 is its own latent frame; every later latent frame covers 4 video
frames, so `1 + 4k` video frames <-> `1 + k` latent frames. Layouts are channels-last:
video `[batch, frames, height, width, 3]` in [-1, 1], latents `[batch, latent_frames, height / 8,
width / 8, z_dim]`.

Feature cache. Every causal convolution with a temporal kernel of 3 sees the last 2 time steps of
its own input from the previous call; a clip's start is 2 zero frames. The cache is a nested dict
of fixed-shape arrays mirroring the module tree (`{'conv_in': [B, 2, h, w, C], 'mid_block':
{'resnets_0': {'conv1': ..., 'conv2': ...}, ...}, ...}`), passed in and returned, so that
`decode_step` decodes one latent frame at a time without recomputing the past and equals the
whole-clip decode. The `first` flag (static) marks the call holding the clip's frame 0: temporal
upsampling passes that frame through unchanged (1 video frame) and starts its own convolution
from zeros; every later latent frame decodes to 4 video frames. Two jitted variants in all.

`VAEConfig.codec = "space_to_depth"` (size `pixels`) swaps the networks for the lossless,
parameter-free pixel codec of `apt2_jax.models.pixel_codec`, behind the same interface.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from apt2_jax.models import light_decoder, pixel_codec

Array = jax.Array
Cache = Any  # nested dict of arrays (or None leaves for convolutions without temporal context)

# Wan2.1's latent statistics (diffusers `AutoencoderKLWan` defaults).
WAN_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# LeCun normal without truncation: the truncated normal's inverse erf makes XLA compile `init`
# several times slower, for no benefit here.
_KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "normal")

TEMPORAL_FACTOR = 4
SPATIAL_FACTOR = 8
CACHE_T = 2  # time steps of context a causal 3x3x3 convolution keeps between calls


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Sizes of the causal VAE. Field names follow diffusers' `AutoencoderKLWan` config.

  Attributes:
    base_dim: encoder channels at full resolution (channels per scale = base_dim * dim_mult).
    z_dim: latent channels.
    dim_mult: channel multiplier per scale (4 scales: 3 resamplings, 8x spatially).
    num_res_blocks: residual blocks per encoder scale (the decoder has one more, as in Wan).
    temperal_downsample: per resampling, whether it also halves time (Wan's spelling).
    decoder_base_dim, decoder_dim_mult, decoder_num_res_blocks: decoder overrides (None = as the
      encoder); the slim decoder uses 64 x (1, 2, 4, 8) with 1 (+1) residual blocks per scale.
    latents_mean, latents_std: per-channel statistics; `normalize_latents` maps the posterior mean
      to zero mean, unit variance. None = (0, 1).
    dropout: dropout rate in residual blocks (training only).
    remat: rematerialise residual blocks in the backward pass.
    dtype: computation dtype (parameters stay float32).
    codec: "learned" (this VAE), "space_to_depth" or "pca" (`pixel_codec`: no parameters,
      z_dim 768 = 4 frames x 8 x 8 pixels x RGB; "pca": its top 32 components, 32).
    decoder_type: "causal" (Wan's decoder above, sized by the decoder_* fields) or "light"
      (`apt2_jax.models.light_decoder`: a tiny streaming decoder distilled from the full one).
    light_dims, light_blocks: the light decoder's channels and residual blocks per scale
      (`light_decoder.LightDecoder`); unused by the causal decoder.
  """
  base_dim: int = 96
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  temperal_downsample: tuple[bool, ...] = (False, True, True)
  decoder_base_dim: Optional[int] = None
  decoder_dim_mult: Optional[tuple[int, ...]] = None
  decoder_num_res_blocks: Optional[int] = None
  latents_mean: Optional[tuple[float, ...]] = None
  latents_std: Optional[tuple[float, ...]] = None
  dropout: float = 0.0
  remat: bool = False
  dtype: Any = jnp.float32
  codec: str = "learned"
  decoder_type: str = "causal"
  light_dims: tuple[int, ...] = light_decoder.LIGHT_DIMS
  light_blocks: tuple[int, ...] = light_decoder.LIGHT_BLOCKS

  def __post_init__(self):
    pixel_codec.check_config(self.codec, self.z_dim)
    light_decoder.check_config(self.decoder_type, self.light_dims, self.light_blocks)
    if len(self.dim_mult) != len(self.temperal_downsample) + 1:
      raise ValueError(f"VAEConfig.dim_mult {self.dim_mult} needs one more entry than "
                       f"temperal_downsample {self.temperal_downsample}")
    if len(self.dim_mult) != 4 or sum(self.temperal_downsample) != 2:
      raise ValueError("VAEConfig: 4 scales with 2 temporal resamplings (4x time, 8x space) are "
                       f"required, got dim_mult={self.dim_mult}, "
                       f"temperal_downsample={self.temperal_downsample}")
    if len(self.dec_dim_mult) != len(self.dim_mult):
      raise ValueError(f"VAEConfig.decoder_dim_mult {self.decoder_dim_mult} must have "
                       f"{len(self.dim_mult)} scales")
    for name in ("latents_mean", "latents_std"):
      value = getattr(self, name)
      if value is not None and len(value) != self.z_dim:
        raise ValueError(f"VAEConfig.{name} has {len(value)} entries, z_dim is {self.z_dim}")

  @property
  def dec_base_dim(self) -> int:
    return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim

  @property
  def dec_dim_mult(self) -> tuple[int, ...]:
    return self.dim_mult if self.decoder_dim_mult is None else tuple(self.decoder_dim_mult)

  @property
  def dec_num_res_blocks(self) -> int:
    return (self.num_res_blocks if self.decoder_num_res_blocks is None
            else self.decoder_num_res_blocks)

  @property
  def temperal_upsample(self) -> tuple[bool, ...]:
    return tuple(self.temperal_downsample[::-1])


def vae_config(size: str, **overrides) -> VAEConfig:
  """Named sizes: `tiny` (tests), `small` (toy pipeline), `wan` (Wan2.1), `slim_decoder`, `pixels`
  (the lossless space-to-depth codec with the panorama world's latent statistics).

  Latent channels follow the DiT sizes of `apt2_jax/configs/sizes.py`: 4 for `tiny`, 768 for
  `pixels`, 16 otherwise.
  """
  sizes = {
      "tiny": dict(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
      "small": dict(base_dim=32, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1),
      # `small` with the light streaming decoder (`light_decoder`; ~36 ms per latent frame at
      # 256x256 on 2 CPU cores): the CPU streaming benchmark's decode.
      "small_light": dict(base_dim=32, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1, decoder_type="light"),
      "wan": dict(latents_mean=WAN_LATENTS_MEAN, latents_std=WAN_LATENTS_STD),
      # The paper's real-time decoder: 2 residual blocks per scale, channels 64/128/256/512 (from
      # full resolution up), behind Wan's encoder and latent space.
      "slim_decoder": dict(decoder_base_dim=64, decoder_dim_mult=(1, 2, 4, 8),
                           decoder_num_res_blocks=1, latents_mean=WAN_LATENTS_MEAN,
                           latents_std=WAN_LATENTS_STD),
      "pixels": pixel_codec.config_fields(),
      # The PCA codec: the space-to-depth blocks' top 32 principal components on the panorama
      # world (31.5 dB held out), unit-variance latents; 8x8 px x 4 frames -> 32 channels.
      "pixels_pca": pixel_codec.pca_config_fields(),
  }
  if size not in sizes:
    raise ValueError(f"Unknown VAE size {size!r}; choose from {sorted(sizes)}")
  return VAEConfig(**{**sizes[size], **overrides})


def latent_frames(video_frames: int) -> int:
  """Latent frames for `1 + 4k` video frames."""
  if video_frames < 1 or (video_frames - 1) % TEMPORAL_FACTOR:
    raise ValueError(f"video frames must be 1 + {TEMPORAL_FACTOR}k, got {video_frames}")
  return 1 + (video_frames - 1) // TEMPORAL_FACTOR


def video_frames(num_latent_frames: int) -> int:
  """Video frames decoded from `num_latent_frames` latent frames (the first gives 1)."""
  return 1 + TEMPORAL_FACTOR * (num_latent_frames - 1)


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# Encoder and decoder
# ------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
  """Video `[B, 1 + 4k, H, W, 3]` (or a later 4-frame chunk) -> `[B, 1 + k, H/8, W/8, 2 z_dim]`."""
  config: VAEConfig

  @nn.compact
  def __call__(self, x: Array, cache: Optional[Cache] = None, first: bool = True,
               deterministic: bool = True):
    cfg = self.config
    cache = cache or {}
    new_cache = {}
    block = _residual_block_cls(cfg.remat)
    dims = [cfg.base_dim * u for u in (1,) + tuple(cfg.dim_mult)]
    x, new_cache["conv_in"] = CausalConv3d(dims[0], dtype=cfg.dtype, name="conv_in")(
        x, cache.get("conv_in"))
    index = 0
    for i, out_dim in enumerate(dims[1:]):
      for _ in range(cfg.num_res_blocks):
        name = f"down_blocks_{index}"
        x, new_cache[name] = block(out_dim, cfg.dropout, cfg.dtype, name=name)(
            x, cache.get(name), deterministic)
        index += 1
      if i != len(cfg.dim_mult) - 1:
        name = f"down_blocks_{index}"
        mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
        x, new_cache[name] = Resample(out_dim, mode, dtype=cfg.dtype, name=name)(
            x, cache.get(name), first)
        index += 1
    x, new_cache["mid_block"] = MidBlock(cfg.dropout, cfg.remat, cfg.dtype, name="mid_block")(
        x, cache.get("mid_block"), deterministic)
    x = nn.silu(RMSNorm(name="norm_out")(x))
    x, new_cache["conv_out"] = CausalConv3d(2 * cfg.z_dim, dtype=cfg.dtype, name="conv_out")(
        x, cache.get("conv_out"))
    return x, new_cache


class Decoder(nn.Module):
  """Latents `[B, F, h, w, z_dim]` -> video `[B, 1 + 4(F-1) if first else 4F, 8h, 8w, 3]`."""
  config: VAEConfig

  @nn.compact
  def __call__(self, x: Array, cache: Optional[Cache] = None, first: bool = True,
               deterministic: bool = True):
    cfg = self.config
    cache = cache or {}
    new_cache = {}
    mult = cfg.dec_dim_mult
    dims = [cfg.dec_base_dim * u for u in (mult[-1],) + tuple(mult[::-1])]
    x, new_cache["conv_in"] = CausalConv3d(dims[0], dtype=cfg.dtype, name="conv_in")(
        x, cache.get("conv_in"))
    x, new_cache["mid_block"] = MidBlock(cfg.dropout, cfg.remat, cfg.dtype, name="mid_block")(
        x, cache.get("mid_block"), deterministic)
    for i, out_dim in enumerate(dims[1:]):
      mode = None
      if i != len(mult) - 1:
        mode = "upsample3d" if cfg.temperal_upsample[i] else "upsample2d"
      name = f"up_blocks_{i}"  # input channels: dims[i], halved by the previous upsampling
      x, new_cache[name] = UpBlock(out_dim, cfg.dec_num_res_blocks + 1, mode, cfg.dropout,
                                   cfg.remat, cfg.dtype, name=name)(
          x, cache.get(name), first, deterministic)
    x = nn.silu(RMSNorm(name="norm_out")(x))
    x, new_cache["conv_out"] = CausalConv3d(3, dtype=cfg.dtype, name="conv_out")(
        x, cache.get("conv_out"))
    return x, new_cache


# ------------------------------------------------------------------------------------------------
# VAE
# ------------------------------------------------------------------------------------------------


class VAE(nn.Module):
  """Causal video VAE with KL bottleneck (Wan2.1 `AutoencoderKLWan` layout).

  Methods (call through `apply(..., method=...)`):
    encode(video [B, 1+4k, H, W, 3]) -> (mean, logvar), each [B, 1+k, H/8, W/8, z_dim].
    decode(z [B, F, h, w, z_dim], clip=True) -> video [B, 1+4(F-1), 8h, 8w, 3].
    encode_chunk(video, cache, first) -> ((mean, logvar), cache): frame 0 alone (first), then
      4-frame chunks; see `encode_chunked`.
    decode_step(z [B, 1, h, w, z_dim], cache, first) -> (video, cache): 1 frame when first,
      else 4; see `decode_step` (jitted) and `init_decode_cache`.
    __call__(video, sample=True) -> (reconstruction, mean, logvar); training pass.
  Parameters: `encoder`, `quant_conv`, `post_quant_conv`, `decoder` (diffusers' names).
  """
  config: VAEConfig

  def setup(self):
    cfg = self.config
    if cfg.codec != "learned":  # `pixel_codec`: no modules, no parameters
      return
    self.encoder = Encoder(cfg)
    self.quant_conv = CausalConv3d(2 * cfg.z_dim, (1, 1, 1), dtype=cfg.dtype)
    self.post_quant_conv = CausalConv3d(cfg.z_dim, (1, 1, 1), dtype=cfg.dtype)
    self.decoder = (light_decoder.LightDecoder(cfg) if cfg.decoder_type == "light"
                    else Decoder(cfg))

  def _check_video(self, video: Array):
    if video.ndim != 5 or video.shape[-1] != 3:
      raise ValueError(f"video must be [batch, frames, height, width, 3], got {video.shape}")
    if video.shape[2] % SPATIAL_FACTOR or video.shape[3] % SPATIAL_FACTOR:
      raise ValueError(f"height and width must be multiples of 8, got {video.shape}")

  def encode_chunk(self, video: Array, cache: Optional[Cache] = None, first: bool = True,
                   deterministic: bool = True):
    """`[B, 1+4k (first) or 4k, H, W, 3]` -> ((mean, logvar) `[B, (1+)k, h, w, z]`, cache)."""
    self._check_video(video)
    if (video.shape[1] - (1 if first else 0)) % TEMPORAL_FACTOR:
      raise ValueError(f"encode needs 1 + 4k frames (4k after the first chunk), got "
                       f"{video.shape[1]} with first={first}")
    if self.config.codec != "learned":
      return pixel_codec.posterior(video, first, self.config.codec), cache
    h, cache = self.encoder(video, cache, first, deterministic)
    h, _ = self.quant_conv(h)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return (mean, jnp.clip(logvar, -30.0, 20.0)), cache

  def encode(self, video: Array, deterministic: bool = True):
    """Whole-clip encode: `[B, 1+4k, H, W, 3]` in [-1, 1] -> (mean, logvar) `[B, 1+k, h, w, z]`."""
    return self.encode_chunk(video, None, True, deterministic)[0]

  def decode_step(self, z: Array, cache: Optional[Cache] = None, first: bool = True,
                  deterministic: bool = True, clip: bool = True):
    """`[B, F, h, w, z]` -> (video `[B, 1+4(F-1) if first else 4F, 8h, 8w, 3]`, cache)."""
    if z.ndim != 5 or z.shape[-1] != self.config.z_dim:
      raise ValueError(f"latents must be [batch, frames, h, w, {self.config.z_dim}], got {z.shape}")
    if self.config.codec != "learned":
      return pixel_codec.decode_step(z, cache, first, clip, self.config.codec)
    z, _ = self.post_quant_conv(z)
    video, cache = self.decoder(z, cache, first, deterministic)
    if clip:
      video = jnp.clip(video, -1.0, 1.0)
    return video, cache

  def decode(self, z: Array, clip: bool = True, deterministic: bool = True) -> Array:
    """Whole-clip decode `[B, F, h, w, z]` -> `[B, 1+4(F-1), 8h, 8w, 3]` (clipped to [-1, 1])."""
    return self.decode_step(z, None, True, deterministic, clip)[0]

  def __call__(self, video: Array, sample: bool = True, deterministic: bool = True):
    """Training pass. Needs an rng stream `sample` when sampling, `dropout` for dropout.

    Returns the unclipped reconstruction `[B, T, H, W, 3]` and the posterior (mean, logvar).
    """
    mean, logvar = self.encode(video, deterministic)
    z = mean
    if sample and self.config.codec == "learned":  # the pixel codec is deterministic
      eps = jax.random.normal(self.make_rng("sample"), mean.shape, mean.dtype)
      z = mean + jnp.exp(0.5 * logvar) * eps
    recon = self.decode(z, clip=False, deterministic=deterministic)
    return recon, mean, logvar


# ------------------------------------------------------------------------------------------------
# Functional API: latent normalisation, chunked encode, streaming decode
# ------------------------------------------------------------------------------------------------


def _latent_stats(config: VAEConfig, dtype) -> tuple[Array, Array]:
  mean = config.latents_mean or (0.0,) * config.z_dim
  std = config.latents_std or (1.0,) * config.z_dim
  return jnp.asarray(mean, dtype), jnp.asarray(std, dtype)


def normalize_latents(z: Array, config: VAEConfig) -> Array:
  """Posterior latents -> the DiT's latent space: `(z - mean) / std` per channel."""
  mean, std = _latent_stats(config, z.dtype)
  return (z - mean) / std


def denormalize_latents(z: Array, config: VAEConfig) -> Array:
  """Inverse of `normalize_latents`: `z * std + mean`."""
  mean, std = _latent_stats(config, z.dtype)
  return z * std + mean


def kl_divergence(mean: Array, logvar: Array) -> Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)), summed over all but the batch axis: `[B]`."""
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.sum(kl.reshape(kl.shape[0], -1), axis=-1)


def init_params(model: VAE, rng: Array, height: int = 64, width: int = 64) -> Any:
  """Random parameters `{'params': ...}` with the modules' initialisers, drawn in one go.

  Kernels are LeCun normal (`_KERNEL_INIT`: std 1/sqrt(fan_in)), biases zero, norm scales one,
  exactly what `model.init` draws in distribution; but one normal draw for all kernels compiles
  in a second, where `model.init`'s hundred separate threefry draws take XLA CPU half a minute.
  The pixel codec has none: `{'params': {}}`.
  """
  if model.config.codec != "learned":
    return {"params": {}}
  video = jax.ShapeDtypeStruct((1, 1 + TEMPORAL_FACTOR, height, width, 3), model.config.dtype)
  shapes = jax.eval_shape(lambda v: model.init({"params": jax.random.key(0),
                                                "sample": jax.random.key(0)}, v), video)
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  names = [str(getattr(path[-1], "key", path[-1])) for path, _ in paths_leaves]
  leaves = [leaf for _, leaf in paths_leaves]
  sizes = [int(np.prod(l.shape)) if n == "kernel" else 0 for n, l in zip(names, leaves)]

  @jax.jit
  def draw(rng):
    flat = jax.random.normal(rng, (sum(sizes),), jnp.float32)
    out, offset = [], 0
    for name, leaf, size in zip(names, leaves, sizes):
      if name == "kernel":
        fan_in = int(np.prod(leaf.shape[:-1]))
        out.append((flat[offset:offset + size] / np.sqrt(fan_in)).reshape(leaf.shape))
        offset += size
      elif name == "scale":
        out.append(jnp.ones(leaf.shape, leaf.dtype))
      elif name == "bias":
        out.append(jnp.zeros(leaf.shape, leaf.dtype))
      else:
        raise ValueError(f"init_params: no initialiser for parameter {name!r}")
    return treedef.unflatten(out)
  return draw(rng)


def init_decode_cache(model: VAE, batch: int, height: int, width: int) -> Cache:
  """Zero feature cache for a stream of latent frames `[batch, 1, height, width, z_dim]`.

  Zeros are the clip's start: the first `decode_step` (first=True) from this cache equals the
  whole-clip decode of frame 0. Shapes are fixed for the whole stream.
  """
  z = jax.ShapeDtypeStruct((batch, 1, height, width, model.config.z_dim), model.config.dtype)

  def first_step(z):
    (_, cache), _ = model.init_with_output(jax.random.key(0), z, None, True,
                                           method=VAE.decode_step)
    return cache
  shapes = jax.eval_shape(first_step, z)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.partial(jax.jit, static_argnames=("model", "first"), donate_argnames=("cache",))
def decode_step(model: VAE, params: Any, cache: Cache, z: Array, first: bool):
  """Streams one latent frame: `z [B, 1, h, w, z_dim]` -> (video `[B, 1 or 4, 8h, 8w, 3]`, cache).

  `first` (static) is True for the stream's frame 0 (decodes to 1 video frame), False after
  (4 frames). Compiles once per (model, shapes, first). The cache is donated: pass the returned
  one to the next step. Unsharded; runs wherever `params` live.
  """
  return model.apply(params, z, cache, first, method=VAE.decode_step)


@functools.partial(jax.jit, static_argnames=("model",))
def encode_chunked(model: VAE, params: Any, video: Array) -> tuple[Array, Array]:
  """Encode `[B, 1+4k, H, W, 3]` frame 0 then 4 frames at a time (a `lax.scan`), as Wan does.

  Equals `VAE.encode` on the whole clip but holds only one chunk's activations: use it to
  pre-encode long clips. Returns (mean, logvar) `[B, 1+k, h, w, z_dim]`.
  """
  k = (video.shape[1] - 1) // TEMPORAL_FACTOR
  (mean0, logvar0), cache = model.apply(params, video[:, :1], None, True,
                                        method=VAE.encode_chunk)
  if k == 0:
    return mean0, logvar0
  b, _, h, w, c = video.shape
  chunks = video[:, 1:].reshape(b, k, TEMPORAL_FACTOR, h, w, c).swapaxes(0, 1)

  def body(cache, chunk):
    (mean, logvar), cache = model.apply(params, chunk, cache, False, method=VAE.encode_chunk)
    return cache, (mean[:, 0], logvar[:, 0])

  _, (means, logvars) = jax.lax.scan(body, cache, chunks)
  mean = jnp.concatenate([mean0, means.swapaxes(0, 1)], axis=1)
  logvar = jnp.concatenate([logvar0, logvars.swapaxes(0, 1)], axis=1)
  return mean, logvar


def decode_stream(model: VAE, params: Any, z: Array) -> Array:
  """Decode `[B, F, h, w, z_dim]` one latent frame at a time with `decode_step`."""
  cache = init_decode_cache(model, z.shape[0], z.shape[2], z.shape[3])
  frames = []
  for i in range(z.shape[1]):
    out, cache = decode_step(model, params, cache, z[:, i:i + 1], i == 0)
    frames.append(out)
  return jnp.concatenate(frames, axis=1)
