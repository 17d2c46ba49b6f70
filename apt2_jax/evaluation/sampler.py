"""The models under evaluation and their streams, on `apt2_jax.generation` (no copy of it here).

    model = model_spec_from_workdir(STAGE4, vae_workdir=VAE)          # generation.load + sampler
    sampler = Sampler(model, height, width, chunk_frames=24)
    frame0 = sampler.start(oracle[0], tokens, seed)                   # uint8 [1, H, W, 3]
    for video in sampler.stream(world_controls, latent_steps):        # uint8 [4, H, W, 3] each
      ...

The DiT runs `generation.stream.compiled(spec).chunk(chunk_frames)` (one `lax.scan` of stream
steps carrying the KV cache; the last chunk is padded), the VAE decodes each latent frame with the
stream's `decode`. Noise, guidance, controls encoding and the cache-index rebase are the stream's,
so a chunked evaluation stream equals the `StreamingGenerator` step by step. Both caches have fixed
shapes: a 5-minute stream holds no more memory than a 5-second one.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from apt2_jax import generation
from apt2_jax.generation import prompt as prompt_lib
from apt2_jax.generation import stream
from apt2_jax.models import vae as vae_lib
from apt2_jax.rollout import RolloutOptions

FRAMES_PER_LATENT = stream.FRAMES_PER_STEP


@dataclasses.dataclass
class ModelSpec:
  """A generator to evaluate (`generation.Generator`) paired with its sampler settings.

  Attributes:
    generator: weights, configs, control type, resolution, prompt length (`generation.load`,
      `generation.random_generator`).
    num_steps, shift, cache_from: the per-frame Euler sampler (`RolloutOptions`); 1 step = the
      one-step AAPT generator.
    guidance: classifier-free guidance weight (1 = off).
    recycle: False for the no-recycling ablation.
    benchmark: throughput figures from `apt2_jax.benchmark`, copied into the report.
  """
  generator: generation.Generator
  num_steps: int = 1
  shift: float = 1.0
  guidance: float = 1.0
  recycle: bool = True
  cache_from: str = "matched"   # multi-step: context at each step's t, as stage 1 trained (`RolloutOptions`)
  benchmark: Optional[dict] = None

  @property
  def options(self) -> RolloutOptions:
    return RolloutOptions(num_steps=int(self.num_steps), shift=float(self.shift),
                          recycle=bool(self.recycle), cache_from=self.cache_from)

  def spec(self) -> stream.StreamSpec:
    """The `generation.stream` spec of this generator under these sampler settings."""
    return self.generator.spec(self.options, float(self.guidance))

  def with_params(self, params) -> "ModelSpec":
    """The same model and sampler with other DiT parameters (e.g. another checkpoint step)."""
    return dataclasses.replace(self, generator=dataclasses.replace(self.generator, params=params))

  dit_config = property(lambda self: self.generator.dit_config)
  params = property(lambda self: self.generator.params)
  vae_config = property(lambda self: self.generator.vae_config)
  vae_params = property(lambda self: self.generator.vae_params)
  text_len = property(lambda self: self.generator.text_len)
  height = property(lambda self: self.generator.height)
  width = property(lambda self: self.generator.width)
  source = property(lambda self: self.generator.source)

  @property
  def forward_passes_per_frame(self) -> int:
    return self.spec().forward_passes_per_frame

  def describe(self) -> dict:
    c = self.dit_config
    return {"num_steps": int(self.num_steps), "shift": float(self.shift),
            "guidance": float(self.guidance), "recycle": bool(self.recycle),
            "cache_from": self.cache_from, "forward_passes_per_frame": self.forward_passes_per_frame,
            "source": self.source, "dit": {"dim": c.dim, "num_layers": c.num_layers, "window": c.window,
                                           "control_channels": c.control_channels}}


def model_spec_from_workdir(workdir: str, *, vae_workdir: Optional[str] = None, num_steps: int = 1,
                            shift: float = 1.0, guidance: float = 1.0, recycle: bool = True,
                            key: str = "ema_params", cache_from: str = "matched") -> ModelSpec:
  """A `ModelSpec` from a training workdir (any DiT stage) or an export bundle (`generation.load`).

  `vae_workdir`: a `vae`/`vae_distill` workdir or a diffusers AutoencoderKLWan folder; None uses
  the run's `config.vae.checkpoint` (a random VAE, with a warning, when that is empty too).
  """
  generator = generation.load(workdir, vae=vae_workdir, key=key)
  return ModelSpec(generator, num_steps=num_steps, shift=shift, guidance=guidance, recycle=recycle,
                   cache_from=cache_from)


def chunk_controls(controls: Optional[np.ndarray], control_type: str, start: int,
                   stop: int) -> Optional[np.ndarray]:
  """The raw controls of latent frames `[start, stop)` (>= 1): float32 `[1, stop - start, 4, D]`.

  `controls`: a world's per-video-frame controls `[T, D]`. Latent frame j covers video frames
  4j-3 .. 4j; frames past the end of `controls` (the padded last chunk) have no motion: zeros for
  a camera, the last pose held for a puppet. None for a model without control.
  """
  if controls is None or control_type == "none":
    return None
  controls = np.asarray(controls, np.float32)
  need = FRAMES_PER_LATENT * (stop - start)
  rows = controls[FRAMES_PER_LATENT * start - 3:FRAMES_PER_LATENT * stop - 3]
  if len(rows) < need:
    fill = controls[-1:] if control_type == "pose" else np.zeros_like(controls[:1])
    rows = np.concatenate([rows, np.repeat(fill, need - len(rows), axis=0)])
  return rows.reshape(1, stop - start, FRAMES_PER_LATENT, controls.shape[1])


# (stream spec, chunk, latent size, control and prompt shapes) -> the ahead-of-time compiled DiT
# chunk and later-frame decode: models differing only in parameters compile once.
_AOT: dict = {}
_AOT_MAX = 16


class Sampler:
  """One model's compiled stream: `start(first_image, tokens, seed)`, then `chunk` / `stream`.

  Times are accumulated in `dit_time` / `decode_time` (seconds, compile excluded: the DiT chunk
  and the decode step are compiled ahead of time before the first timed call).
  """

  def __init__(self, model: ModelSpec, height: int, width: int, chunk_frames: int):
    if height % 16 or width % 16:
      raise ValueError(f"height={height} and width={width} must be multiples of 16 (VAE 8 x patch 2)")
    self.model, self.chunk_frames = model, int(chunk_frames)
    self.spec = model.spec()
    self.fns = stream.compiled(self.spec)
    self.h, self.w = height // vae_lib.SPATIAL_FACTOR, width // vae_lib.SPATIAL_FACTOR
    self.control_type = model.generator.control_type if self.spec.dit_config.control_channels else "none"
    self.dit_time = self.decode_time = 0.0
    self.dit_frames = self.decode_frames = 0
    self.state = self.decode_cache = self.text_kv = self.last_latents = None

  def encode(self, image: np.ndarray):
    """uint8 `[H, W, 3]` -> the normalised latent frame `[1, 1, h, w, C]`."""
    return self.fns.encode(self.model.vae_params, jnp.asarray(image)[None])

  def start(self, image: np.ndarray, tokens: np.ndarray, seed: int) -> np.ndarray:
    """Encodes uint8 `[H, W, 3]` frame 0 and the caption tokens; returns frame 0 decoded,
    uint8 `[1, H, W, 3]`. `seed`: the stream's noise seed (int32)."""
    g = self.model.generator
    frame0, self.state, self.decode_cache = self.fns.start(g.vae_params, jnp.asarray(image)[None],
                                                           jnp.asarray(seed, jnp.int32))
    self.text_kv = self.fns.text(g.params, self._prompt(tokens))
    return np.asarray(frame0[0])

  def _prompt(self, tokens):
    c = self.spec.dit_config  # a text-embedding model (Wan) gets the empty prompt: the worlds' captions are tokens
    text = np.asarray(tokens)[:self.model.text_len] if c.caption_vocab_size else ""
    return jnp.asarray(prompt_lib.prepare(text, c, 1, self.model.text_len))

  def controls(self, world_controls, start: int, stop: int) -> Optional[np.ndarray]:
    """`chunk_controls` of latent frames `[start, stop)` for this model (None without control)."""
    return chunk_controls(world_controls, self.control_type, start, stop)

  def _compiled(self, args):
    params, state, text_kv, controls = args
    key = (self.spec, self.chunk_frames, self.h, self.w, None if controls is None else controls.shape,
           str(jax.tree.map(lambda x: (x.shape, str(x.dtype)), text_kv)))
    if key not in _AOT:
      if len(_AOT) >= _AOT_MAX:
        _AOT.pop(next(iter(_AOT)))
      chunk = self.fns.chunk(self.chunk_frames).lower(*args).compile()
      c = self.spec.dit_config
      latent = jax.ShapeDtypeStruct((1, 1, self.h, self.w, c.latent_channels), jnp.float32)
      vae = vae_lib.VAE(self.spec.vae_config)
      cache = jax.eval_shape(lambda: vae_lib.init_decode_cache(vae, 1, self.h, self.w))
      decode = self.fns.decode.lower(self.model.vae_params, cache, latent, first=False).compile()
      _AOT[key] = (chunk, decode)
    return _AOT[key]

  def chunk(self, controls: Optional[np.ndarray], num_frames: int) -> Iterator[np.ndarray]:
    """Generates the next `chunk_frames` latent frames; yields the first `num_frames` decoded,
    each uint8 `[4, H, W, 3]`. `controls`: raw `[1, chunk_frames, 4, D]` (`controls`) or None."""
    args = (self.model.params, self.state, self.text_kv, None if controls is None else jnp.asarray(controls))
    chunk_fn, decode_fn = self._compiled(args)
    t0 = time.perf_counter()
    frames, self.state = chunk_fn(*args)
    frames.block_until_ready()
    self.dit_time += time.perf_counter() - t0
    self.dit_frames += self.chunk_frames
    self.last_latents = frames  # [1, chunk_frames, h, w, C]
    for i in range(num_frames):
      t0 = time.perf_counter()
      video, self.decode_cache = decode_fn(self.model.vae_params, self.decode_cache, frames[:, i:i + 1])
      video = np.asarray(video[0])
      self.decode_time += time.perf_counter() - t0
      self.decode_frames += 1
      yield video

  def stream(self, world_controls, latent_steps: int) -> Iterator[np.ndarray]:
    """Latent frames 1 .. `latent_steps` after `start`, decoded: uint8 `[4, H, W, 3]` each.
    `world_controls`: the world's per-video-frame controls `[T, D]` (None without control)."""
    done = 0
    while done < latent_steps:
      n = min(self.chunk_frames, latent_steps - done)
      yield from self.chunk(self.controls(world_controls, done + 1, done + 1 + self.chunk_frames), n)
      done += n

  def throughput(self) -> dict:
    dit = self.dit_time / max(self.dit_frames, 1)
    dec = self.decode_time / max(self.decode_frames, 1)
    return {"dit_step_s": dit, "decode_step_s": dec,
            "latent_frames_per_s": 1.0 / max(dit + dec, 1e-12),
            "frames_per_s": FRAMES_PER_LATENT / max(dit + dec, 1e-12),
            "dit_only_frames_per_s": FRAMES_PER_LATENT / max(dit, 1e-12),
            "batch": 1, "device": str(jax.devices()[0].device_kind), "source": "measured"}
