"""Model sizes, mesh and logical rules: the shared pieces of every config.

Sizes (the `<size>` of `get_config("<size>")` in every stage file):
  tiny      tests: 2 blocks, width 48, 4 latent channels; compiles in seconds on CPU
  toy       `make demo`'s pipeline: 4 blocks, width 128
  small     the toy pipeline and CPU streaming: 12 blocks, width 384 (~30M parameters)
  wan_1_3b  Wan2.1 1.3B dimensions (30 blocks, width 1536): starts from public Wan2.1 weights
  apt2_8b   the paper's scale: 36 blocks, about 8B parameters

The timestep shift rule (`flow_shift`): the paper's s = 24 is for its 736x416 frames, 1196 tokens
per latent frame (8x VAE, 2x2 patches: 46 x 26), Wan's 480p being 1560; fewer tokens per frame
carry less redundancy, so less shift. SD3-style square-root scaling in tokens per frame:

    shift = max(1, 24 * sqrt(tokens_per_frame / 1196))

  4 tokens (32x32 px, `tiny`): 1.39; 16 (64x64, the toy pipeline): 2.78; 256 (256x256): 11.1;
  1196 (736x416, `wan_1_3b` / `apt2_8b` stage configs): 24; 1560 (832x480): 27.4.
Every config builder takes stage 0/1's `flow.shift`, the distillation schedule's shift and the
eval samplers' shift from it (`diffusion.apply_shift`).
"""
from __future__ import annotations

import math

import ml_collections

VAE_SPATIAL_STRIDE = 8          # apt2_jax.models.vae.SPATIAL_FACTOR (a test checks they agree)
PAPER_SHIFT = 24.0              # the paper's time shift ...
PAPER_TOKENS_PER_FRAME = (416 // 16) * (736 // 16)  # ... at its 736x416 frames: 1196 tokens

SIZES = ("tiny", "toy", "small", "wan_1_3b", "apt2_8b")

_MODEL_SIZES = {
    "tiny": dict(latent_channels=4, dim=48, ffn_dim=96, num_heads=2, num_layers=2, text_dim=32,
                 freq_dim=32, window=3, caption_vocab_size=128, caption_dim=32, caption_layers=1),
    # The `make demo` pipeline: trains every stage on a CPU in minutes (~3M parameters).
    "toy": dict(latent_channels=16, dim=128, ffn_dim=512, num_heads=2, num_layers=4, text_dim=64,
                freq_dim=64, window=6, caption_vocab_size=128, caption_dim=64, caption_layers=1),
    "small": dict(latent_channels=16, dim=384, ffn_dim=1536, num_heads=6, num_layers=12, text_dim=256,
                  freq_dim=256, window=8, caption_vocab_size=128, caption_dim=128, caption_layers=2),
    # Wan2.1 T2V 1.3B: text from precomputed 4096-d umT5 embeddings. N = 30 latent frames (5 s).
    "wan_1_3b": dict(latent_channels=16, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30,
                     text_dim=4096, freq_dim=256, window=30, caption_vocab_size=0, key_chunk=1),
    # The paper's 8B: 36 blocks; width 3584 with 28 heads of 128 channels.
    "apt2_8b": dict(latent_channels=16, dim=3584, ffn_dim=16384, num_heads=28, num_layers=36,
                    text_dim=4096, freq_dim=256, window=30, caption_vocab_size=0, dtype="bfloat16",
                    remat_policy="full", key_chunk=1),
}


def model_config(size: str, **overrides) -> ml_collections.ConfigDict:
  """The `config.model` block for a size; fields are those of `apt2_jax.models.DiTConfig`.

  `key_chunk` (key frames per chunk of the chunked attention kernels, `models/attention.py`): 0 at
  the small sizes, whose frames of 4-256 tokens take `CHUNK_TOKENS` (1024) keys per chunk (where
  the chunked kernel runs at all: their clips mostly take the dense or gathered ones); one latent
  frame at `wan_1_3b` and `apt2_8b`, 1196-3600 keys at 736x416-1280x720, at any resolution: one
  chunk's float32 logits are heads x (frame tokens / sequence) x frame tokens (20 MB per device at
  `apt2_8b`, 736x416, 8-way context parallelism), and the backward pass keeps one chunk's.
  """
  if size not in _MODEL_SIZES:
    raise ValueError(f"unknown model size {size!r}; choose one of {SIZES}")
  d = dict(control_channels=0, recycled_channels=True, patch_size=(1, 2, 2), eps=1e-6, rope_theta=10000.0, dtype="float32",
           param_dtype="float32", remat_policy="none", attention_impl=None, query_chunk=0, key_chunk=0, scan_unroll=1,
           caption_dim=128, caption_layers=2, caption_max_len=32)
  d.update(_MODEL_SIZES[size])
  d.update(overrides)
  return ml_collections.ConfigDict(d)


def mesh_config(data=-1, fsdp=1, tensor=1, sequence=1) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, sequence=sequence))


def logical_rules(over_sequence: bool = False):
  """The logical-axis table (see `apt2_jax/sharding.py`), copied into each config; with
  `over_sequence`, parameters and optimiser state are sharded over the context-parallel devices
  too (`sharding.ZERO_OVER_SEQUENCE`: FSDP over every device, the paper's recipe)."""
  from apt2_jax import sharding  # imports JAX: only when a config is built
  rules = tuple(sharding.LOGICAL_RULES)
  return sharding.override_rules(rules, sharding.ZERO_OVER_SEQUENCE) if over_sequence else rules


def tokens_per_frame(height: int, width: int, patch_size=(1, 2, 2)) -> int:
  """DiT tokens per latent frame of `height` x `width` pixel video (8x VAE, then the patch)."""
  _, ph, pw = tuple(patch_size)
  return (int(height) // VAE_SPATIAL_STRIDE // ph) * (int(width) // VAE_SPATIAL_STRIDE // pw)


def flow_shift(tokens: int) -> float:
  """The time shift `s` for `tokens` DiT tokens per latent frame (module docstring):
  `max(1, 24 * sqrt(tokens / 1196))`."""
  return max(1.0, PAPER_SHIFT * math.sqrt(float(tokens) / PAPER_TOKENS_PER_FRAME))
