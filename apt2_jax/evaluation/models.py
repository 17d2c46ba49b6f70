"""The models under evaluation and their streams: a `StreamingGenerator` each, nothing of its own.

    model = model_spec_from_workdir(STAGE4, vae_workdir=VAE)       # generation.load + sampler settings
    stream = ModelStream(model, height, width, chunk_frames=24)    # a StreamingGenerator, timed
    frame0 = stream.start(oracle[0], tokens, seed)                 # uint8 [1, H, W, 3]
    for video in stream.stream(world_controls, latent_steps):      # uint8 [4 n, H, W, 3] per chunk
      ...

`ModelSpec` is a generator and its sampler settings (a spec, no code path); `ModelStream` runs it
through `inference.StreamingGenerator` (`generate` `chunk_frames` latent frames per compiled call,
then `decode` each): the one path from weights to frames that users stream, so the evaluation
measures what they get. The last chunk of a rollout is padded to `chunk_frames` (one compile per
model spec) and only its first latent frames are decoded. Both caches have fixed shapes: a 5-minute
stream holds no more memory than a 5-second one.

Throughput: the DiT chunks and the per-latent-frame decodes are timed with `block_until_ready` on
one stream (batch 1), the decode including the copy of its 4 frames to the host; the first call of
each (which compiles) is left out.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Iterator, Optional

import jax
import numpy as np

from apt2_jax import generation
from apt2_jax.generation import stream
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

  def streamer(self, height: Optional[int] = None, width: Optional[int] = None):
    """A `StreamingGenerator` of this generator under these sampler settings."""
    from apt2_jax.inference.streaming import StreamingGenerator
    return StreamingGenerator(self.generator, height=height, width=width, options=self.options,
                              guidance=float(self.guidance))

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
  def control_type(self) -> str:
    """The controls the model takes ("none" when it has no control channels)."""
    return self.generator.control_type if self.dit_config.control_channels else "none"

  @property
  def forward_passes_per_frame(self) -> int:
    return self.spec().forward_passes_per_frame

  def describe(self) -> dict:
    c = self.dit_config
    return {"num_steps": int(self.num_steps), "shift": float(self.shift),
            "guidance": float(self.guidance), "recycle": bool(self.recycle),
            "cache_from": self.cache_from, "forward_passes_per_frame": self.forward_passes_per_frame,
            "source": self.source, "benchmark": self.benchmark,
            "dit": {"dim": c.dim, "num_layers": c.num_layers, "window": c.window,
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


class ModelStream:
  """One model's evaluation stream: its `StreamingGenerator`, `chunk_frames` latent frames per call.

  `start(first_image, tokens, seed)`, then `stream(world_controls, latent_steps)`. Times (seconds,
  the first, compiling call of each function left out) accumulate in `dit_time` / `decode_time`.
  """

  def __init__(self, model: ModelSpec, height: int, width: int, chunk_frames: int):
    if height % 16 or width % 16:
      raise ValueError(f"height={height} and width={width} must be multiples of 16 (VAE 8 x patch 2)")
    self.model, self.chunk_frames = model, int(chunk_frames)
    self.generator = model.streamer(height, width)
    self.spec = self.generator.spec
    self.control_type = model.control_type
    self.dit_time = self.decode_time = 0.0
    self.dit_frames = self.decode_frames = 0
    self._warm = set()
    self.last_latents = None

  def start(self, image: np.ndarray, tokens: np.ndarray, seed: int) -> np.ndarray:
    """Starts the stream from uint8 `[H, W, 3]` frame 0 with the caption tokens; returns frame 0
    decoded, uint8 `[1, H, W, 3]`. `seed`: the stream's noise seed (int32). A text-embedding model
    (Wan) gets the empty prompt: the worlds' captions are tokens."""
    text = np.asarray(tokens)[:self.model.text_len] if self.spec.dit_config.caption_vocab_size else None
    return self.generator.start(image, text=text, seed=int(seed))[0]

  def _timed(self, name: str, fn, *args):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    if name in self._warm:
      return out, time.perf_counter() - t0
    self._warm.add(name)
    return out, None

  def chunk(self, controls: Optional[np.ndarray], num_frames: int) -> Iterator[np.ndarray]:
    """Generates the next `chunk_frames` latent frames; yields the first `num_frames` decoded,
    each uint8 `[4, H, W, 3]`. `controls`: raw `[1, chunk_frames, 4, D]` or None."""
    latents, dt = self._timed("dit", self.generator.generate, controls, self.chunk_frames)
    if dt is not None:
      self.dit_time += dt
      self.dit_frames += self.chunk_frames
    self.last_latents = latents  # [1, chunk_frames, h, w, C]
    for i in range(num_frames):
      video, dt = self._timed("decode", lambda x: np.asarray(self.generator.decode(x)), latents[:, i:i + 1])
      if dt is not None:
        self.decode_time += dt
        self.decode_frames += 1
      yield video[0]

  def stream(self, world_controls, latent_steps: int) -> Iterator[np.ndarray]:
    """Latent frames 1 .. `latent_steps` after `start`, decoded: uint8 `[4, H, W, 3]` each.
    `world_controls`: the world's per-video-frame controls `[T, D]` (None without control)."""
    done = 0
    while done < latent_steps:
      n = min(self.chunk_frames, latent_steps - done)
      controls = chunk_controls(world_controls, self.control_type, done + 1, done + 1 + self.chunk_frames)
      yield from self.chunk(controls, n)
      done += n

  def throughput(self) -> dict:
    """Seconds per latent frame of the DiT and of the decode, frames per second (None before a
    timed call of each)."""
    dit = self.dit_time / self.dit_frames if self.dit_frames else None
    dec = self.decode_time / self.decode_frames if self.decode_frames else None
    both = None if dit is None or dec is None else dit + dec
    rate = lambda s, n=1: None if not s else n / s
    return {"dit_step_s": dit, "decode_step_s": dec, "latent_frames_per_s": rate(both),
            "frames_per_s": rate(both, FRAMES_PER_LATENT), "dit_only_frames_per_s": rate(dit, FRAMES_PER_LATENT),
            "timed_dit_frames": self.dit_frames, "timed_decodes": self.decode_frames,
            "batch": 1, "device": str(jax.devices()[0].device_kind), "source": "measured"}
