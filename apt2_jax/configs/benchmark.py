"""The benchmark's config (`python -m apt2_jax.benchmark`) and its validation.

Sizes: `tiny` (CI: 64x64 pixels, seconds), `small` (256x256), `peer` (256x256:
the peer comparison's DiT, `small` cut to 8 blocks: width 384, 6 heads of 64, FFN 1536, 256 tokens
per latent frame, float32), `cpu_stream` (256x256, the CPU real-time size: width 256, 6 blocks,
N = 10, the light decoder), `wan_1_3b` (832x480), `apt2_8b` (736x416, N = 30, bfloat16; the
paper's single-H100 setting). The training
figure's flow shift follows the tokens per latent frame (`sizes.flow_shift`: 2.78, 11.1, 27.4, 24). This module is
a config file itself (`--config=<this file>:<size>`); `experiments/benchmark.py` calls it.
"""
from __future__ import annotations

import ml_collections

from apt2_jax.configs import sizes

# size: (height, width in pixels, VAE size, text tokens, stage-1 clip frames, stage-3 rollout steps)
_SIZES = {
    "tiny": (64, 64, "tiny", 8, 5, 4),
    "small": (256, 256, "small", 16, 9, 8),
    "peer": (256, 256, "small", 16, 9, 8),
    "cpu_stream": (256, 256, "small_light", 16, 9, 8),
    "wan_1_3b": (480, 832, "slim_decoder", 512, 21, 20),
    "apt2_8b": (416, 736, "slim_decoder", 512, 31, 30),
}


# Benchmark-only DiT sizes: `peer` is `small` cut to 8 blocks; `cpu_stream` is the size that
# streams at 256x256 in real time on 2 CPU cores with the light decoder (width 256, 4 heads of 64,
# 6 blocks, FFN 1024, N = 10; measured quiet: 105 ms per step + 23 ms decode = 31 fps, cache
# speedup 11.6x, NFE speedup 4.8x, latency growth 0.99; `small`, 12 blocks of width 384, does not).
_MODELS = {
    "peer": lambda: sizes.model_config("small", num_layers=8),
    "cpu_stream": lambda: sizes.model_config("small", dim=256, num_heads=4, ffn_dim=1024, num_layers=6, window=10),
}


def get_config(arg: str = "small") -> ml_collections.ConfigDict:
  size = arg or "small"
  if size not in _SIZES:
    raise ValueError(f"unknown benchmark size {size!r}; choose one of {sorted(_SIZES)}")
  height, width, vae_size, text_len, clip_frames, rollout_steps = _SIZES[size]
  c = ml_collections.ConfigDict()
  c.stage = "benchmark"
  c.size = size
  c.model = _MODELS[size]() if size in _MODELS else sizes.model_config(size)
  if size == "apt2_8b":
    c.model.param_dtype = "bfloat16"   # inference: bf16 weights (16 GB) next to the bf16 KV cache
  c.vae_size = vae_size                # apt2_jax.models.vae.vae_config size used for decode figures
  c.batch = 1                          # streams generated together
  c.height, c.width = height, width    # pixels; latent = /8, tokens per latent frame = /16
  c.text_len = text_len
  c.seed = 0
  c.warmup = 2                         # untimed calls after compilation
  c.reps = 10                          # timed calls (median reported)
  c.peer_steps = 4                     # k of the peer-style block (k denoising passes + 1 clean pass)
  c.growth_frames = (50, 1000)         # latency_growth = step(frame 1000) / step(frame 50)
  c.first_frame_reps = 3
  c.peak_matmul = 2048                 # CPU: side of the square matmul that measures peak FLOP/s
  c.breakdown = True                   # profile the steady step: attention / linear / cache update ms

  c.train = ml_collections.ConfigDict()
  c.train.enabled = True
  c.train.batch = 1
  c.train.clip_frames = clip_frames    # stage 1: latent frames per teacher-forced clip
  c.train.rollout_steps = rollout_steps  # stage 3: generated latent frames per student-forcing rollout
  c.train.remat = "full"               # stage-3 rollout remat policy (dit.REMAT_POLICIES)
  c.train.reps = 3
  c.train.shift = sizes.flow_shift(sizes.tokens_per_frame(height, width, c.model.patch_size))  # the rule

  c.num_devices = 1                    # devices to use (0 = all); the mesh below spans them
  c.mesh = sizes.mesh_config()         # data=-1 fills; e.g. --config.mesh.sequence=-1 --config.mesh.data=1
  c.logical_rules = sizes.logical_rules()
  return c


def validate(config) -> None:
  """Fails at start, naming the field, on values that would fail later."""
  for name in ("batch", "reps", "peer_steps", "text_len"):
    if int(config[name]) < 1:
      raise ValueError(f"config.{name}={config[name]} must be >= 1")
  if config.height % 16 or config.width % 16:
    raise ValueError(f"config.height/width={config.height}x{config.width} must be multiples of 16 "
                     "(8x VAE, then the 2x2 patch)")
  if len(config.growth_frames) != 2 or min(config.growth_frames) < 1:
    raise ValueError(f"config.growth_frames={config.growth_frames} must be two frame indices >= 1")
  if config.train.clip_frames < 2 or config.train.rollout_steps < 1:
    raise ValueError("config.train.clip_frames must be >= 2 and config.train.rollout_steps >= 1")
  if config.num_devices < 0:
    raise ValueError(f"config.num_devices={config.num_devices} must be >= 0 (0 = all)")
