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
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from apt2_jax.models import light_decoder, pixel_codec

# The layers live in `vae_layers`; CACHE_T and the kernel init are re-exported for their users.
from apt2_jax.models.vae_layers import (CACHE_T, _KERNEL_INIT, Array, Cache, CausalConv3d, MidBlock,  # noqa: F401
                                        Resample, RMSNorm, UpBlock, _residual_block_cls)

# Wan2.1's latent statistics (diffusers `AutoencoderKLWan` defaults).
WAN_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

TEMPORAL_FACTOR = 4
SPATIAL_FACTOR = 8


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
    loss_weights: per-channel weights of the latent MSE losses (`latent_loss_weights`; None: all
      ones), e.g. `pixel_codec.pixel_loss_weights` for a whitened PCA codec.
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
  loss_weights: Optional[tuple[float, ...]] = None
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
      # The torus world's PCA codec (one scale for all components: per-pixel loss weights).
      "pixels_pca_torus": pixel_codec.pca_config_fields("pca_torus"),
      # The same basis with unit-variance latents and per-pixel loss weights.
      "pixels_pca_torus_white": pixel_codec.pca_config_fields("pca_torus", whiten=True),
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


def latent_loss_weights(config: Optional[VAEConfig]) -> Optional[Array]:
  """`config.loss_weights` as float32 `[z_dim]` (the last axis of the latents), or None (ones)."""
  if config is None or not config.loss_weights:
    return None
  if len(config.loss_weights) != config.z_dim:
    raise ValueError(f"VAEConfig.loss_weights has {len(config.loss_weights)} values, z_dim={config.z_dim}")
  return jnp.asarray(config.loss_weights, jnp.float32)


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
