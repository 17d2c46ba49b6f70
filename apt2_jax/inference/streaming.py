"""`StreamingGenerator`: the AAPT generator as an endless stream of 4-frame chunks.

    gen = StreamingGenerator.from_checkpoint("bundle_or_workdir")
    first = gen.start(image, text="a camera glides over grass", seed=0)   # [B, 1, H, W, 3] uint8
    while True:
      frames = gen.step({"keys": ["w"]})                                  # [B, 4, H, W, 3] uint8
      gen.set_text("a camera circles over sand")                          # prompt for what follows

A thin, stateful wrapper: loading is `apt2_jax.generation.load`, every computation is one of the
jitted `apt2_jax.generation.stream` functions (shared by every generator of the same spec, so a
`fork` compiles nothing), and this class only validates user input (images,
prompts; `inference.controls.ControlInput`) and holds the stream state between calls.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from apt2_jax import generation
from apt2_jax.generation import prompt as prompt_lib
from apt2_jax.generation import stream
from apt2_jax.inference import controls as controls_lib
from apt2_jax.models import CausalDiT, DiTConfig
from apt2_jax.models import vae as vae_lib
from apt2_jax.rollout import RolloutOptions

FRAMES_PER_STEP = stream.FRAMES_PER_STEP
stream_noise = stream.noise   # the stream's noise convention (step i: normal(fold_in(key(seed), i)))


class StreamingGenerator:
  """Streams 4 RGB frames per call from a first frame, a prompt and per-step controls.

  Attributes:
    generator: the loaded weights and configs (`generation.Generator`).
    dit_config, vae_config, params, vae_params, control_type: the generator's.
    height, width: pixel resolution (multiples of 16). latent_hw: (height / 8, width / 8).
    batch: streams generated together (all get the same control).
    spec: the `generation.StreamSpec` (sampler, guidance, control encoding).
    frames_generated: video frames handed out since `start` (1 + 4 per step).
  """

  def __init__(self, generator: generation.Generator, *, height: Optional[int] = None,
               width: Optional[int] = None, batch: int = 1, options: Optional[RolloutOptions] = None,
               guidance: Optional[float] = None, text_len: Optional[int] = None):
    height, width = int(height or generator.height or 64), int(width or generator.width or 64)
    if height % 16 or width % 16:
      raise ValueError(f"height and width must be multiples of 16 (VAE 8x, patch 2x), got {height}x{width}")
    self.generator = generator
    self.spec = generator.spec(options, guidance)
    self.height, self.width, self.batch = height, width, int(batch)
    self.latent_hw = (height // vae_lib.SPATIAL_FACTOR, width // vae_lib.SPATIAL_FACTOR)
    self.text_len = text_len or generator.text_len
    self._fns = stream.compiled(self.spec)
    self._controls = controls_lib.ControlInput(generator.control_type, generator.control_dim, self.batch)
    self._state = self._decode_cache = self._text_kv = None
    self.frames_generated = 0
    self.text = None

  # -- construction ------------------------------------------------------------------------------
  @classmethod
  def from_checkpoint(cls, path: str, *, vae: Optional[str] = None, decoder: Optional[str] = None,
                      **kwargs) -> "StreamingGenerator":
    """From an export bundle (`apt2_jax.export`) or a training workdir (EMA parameters);
    `decoder`: a light decoder's workdir replacing the VAE's decoder (`generation.load`)."""
    return cls(generation.load(path, vae=vae, decoder=decoder), **kwargs)

  from_bundle = from_checkpoint

  @classmethod
  def random(cls, dit_config: DiTConfig, vae_config: vae_lib.VAEConfig, seed: int = 0, *,
             control_type: Optional[str] = None, control_encoding: Optional[str] = None,
             **kwargs) -> "StreamingGenerator":
    """Random weights (host-drawn, no init compile): the demo without a checkpoint, and tests."""
    if isinstance(dit_config, dict):
      dit_config = DiTConfig.from_dict(dit_config)
    gen = generation.random_generator(dit_config, vae_config, control_type=control_type or "",
                                      control_encoding=control_encoding or "", seed=seed)
    return cls(gen, **kwargs)

  def fork(self) -> "StreamingGenerator":
    """A new stream sharing this one's parameters and compiled functions (no recompilation)."""
    return StreamingGenerator(self.generator, height=self.height, width=self.width, batch=self.batch,
                              options=self.spec.options, guidance=self.spec.guidance, text_len=self.text_len)

  # -- the generator's attributes -----------------------------------------------------------------
  dit_config = property(lambda self: self.generator.dit_config)
  vae_config = property(lambda self: self.generator.vae_config)
  params = property(lambda self: self.generator.params)
  vae_params = property(lambda self: self.generator.vae_params)
  control_type = property(lambda self: self.generator.control_type)
  options = property(lambda self: self.spec.options)
  model = property(lambda self: CausalDiT(self.generator.dit_config))
  vae = property(lambda self: vae_lib.VAE(self.generator.vae_config))

  # -- streaming ---------------------------------------------------------------------------------
  def start(self, first_frame, text=None, seed: int = 0) -> np.ndarray:
    """Starts a stream from `first_frame` (uint8 [H, W, 3] or [B, H, W, 3], resized if needed).

    Returns the decoded first frame, uint8 [B, 1, H, W, 3]. `text`: a caption string (tokenised
    with `apt2_jax.data.captions.tokenize`), int32 tokens [T] / [B, T], or float embeddings
    [T, text_dim] / [B, T, text_dim]; None = the empty prompt.
    """
    image = self._prepare_image(first_frame)
    frame0, self._state, self._decode_cache = self._fns.start(self.vae_params, image, jnp.asarray(seed, jnp.int32))
    self.set_text(text)
    self._controls.reset()
    self.frames_generated = 1
    return np.asarray(frame0)

  def set_text(self, text) -> None:
    """Changes the prompt for the frames that follow: the text K/V are recomputed once; the
    visual KV cache is kept."""
    self._text_kv = self._fns.text(self.params, self._prepare_text(text))
    self.text = text if isinstance(text, str) else None

  def step(self, control=None) -> np.ndarray:
    """Generates the next latent frame and returns its 4 video frames, uint8 [B, 4, H, W, 3].

    `control`: see `apt2_jax.inference.controls` (None, {"keys": [...]}, {"camera": [...]},
    {"keypoints": [...]}); raises `ControlError` for a malformed one (the stream is unchanged).
    """
    return np.asarray(self.step_device(control))

  def step_device(self, control=None):
    """`step` without the transfer: the frames stay a device array (for pipelining)."""
    if self._state is None:
      raise RuntimeError("call start(first_frame, ...) before step()")
    raw = self._controls(control)
    latent, self._state = self._fns.step(self.params, self._state, self._text_kv,
                                         None if raw is None else jnp.asarray(raw))
    frames, self._decode_cache = self._fns.decode(self.vae_params, self._decode_cache, latent)
    self.frames_generated += FRAMES_PER_STEP
    return frames

  def generate(self, controls=None, length: Optional[int] = None):
    """Generates the next `length` latent frames in one compiled call: float32 device array
    `[B, L, h, w, C]` (decode them with `decode`).

    The same frames as `length` calls of `step` (`generation.stream.chunk`: one `lax.scan` of the
    stream step, with the same noise, KV cache and cache-index rebase). `controls`: raw
    per-video-frame controls, float32 `[B, L, 4, D]` or `[L, 4, D]` (every stream alike), already
    valid (a world's or a controls file's; `step` validates a user's); None for a model without
    control. `length` defaults to the controls' L. The evaluation streams this way (chunks of
    latent frames), so it measures what users stream.
    """
    if self._state is None:
      raise RuntimeError("call start(first_frame, ...) before generate()")
    raw = None
    if controls is None and self.dit_config.control_channels:
      raise ValueError(f"a {self.control_type!r} model needs controls [B, L, {FRAMES_PER_STEP}, "
                       f"{self.generator.control_dim}]")
    if controls is not None and self.control_type != "none":
      raw = np.asarray(controls, np.float32)
      raw = np.broadcast_to(raw, (self.batch,) + raw.shape) if raw.ndim == 3 else raw
      if raw.ndim != 4 or raw.shape[0] != self.batch or raw.shape[2:] != (FRAMES_PER_STEP, self.generator.control_dim):
        raise ValueError(f"controls must be [{self.batch}, L, {FRAMES_PER_STEP}, {self.generator.control_dim}], "
                         f"got {raw.shape}")
      length = length or raw.shape[1]
      if raw.shape[1] != length:
        raise ValueError(f"controls hold {raw.shape[1]} latent frames, length={length}")
      if self.control_type == "pose":  # a later `step` without control holds the last pose
        self._controls.last = raw[0, -1].reshape(FRAMES_PER_STEP, -1, 2)
    if not length:
      raise ValueError("generate needs length (or controls)")
    latents, self._state = self._fns.chunk(int(length))(self.params, self._state, self._text_kv,
                                                        None if raw is None else jnp.asarray(raw))
    return latents

  def decode(self, latents):
    """Latent frames `[B, L, h, w, C]` (after frame 0, in order) -> their video frames, uint8 device
    array `[B, 4 L, H, W, 3]` (the VAE's streaming decoder, one latent frame at a time)."""
    videos = []
    for i in range(latents.shape[1]):
      video, self._decode_cache = self._fns.decode(self.vae_params, self._decode_cache, latents[:, i:i + 1])
      videos.append(video)
    self.frames_generated += FRAMES_PER_STEP * latents.shape[1]
    return videos[0] if len(videos) == 1 else jnp.concatenate(videos, axis=1)

  def steps(self, controls=None, length: Optional[int] = None) -> np.ndarray:
    """`generate` then `decode`: the next `length` latent frames' video frames, uint8
    `[B, 4 L, H, W, 3]`."""
    return np.asarray(self.decode(self.generate(controls, length)))

  def control_input(self, control) -> Optional[np.ndarray]:
    """User control -> the raw controls [B, 4, D] the step takes (None without control)."""
    return self._controls(control)

  @property
  def last_latent(self):
    """The latest latent frame, [B, 1, h, w, C] float32 numpy (the next step's recycled input;
    a host copy, since the device state is donated to the next step)."""
    return None if self._state is None else np.asarray(self._state["recycled"])

  @property
  def cache_index(self) -> int:
    return int(self._state["cache"]["index"])

  def close(self) -> None:
    """Frees the stream's state (caches); the parameters and compiled functions stay."""
    self._state = self._decode_cache = self._text_kv = None

  # -- inputs ------------------------------------------------------------------------------------
  def _prepare_image(self, first_frame):
    image = np.asarray(first_frame)
    if image.ndim == 3:
      image = image[None]
    if image.ndim != 4 or image.shape[-1] != 3:
      raise ValueError(f"first_frame must be [H, W, 3] or [B, H, W, 3] RGB, got {image.shape}")
    if image.dtype != np.uint8:
      if np.issubdtype(image.dtype, np.floating) and image.min() >= -1.0 and image.max() <= 1.0:
        image = np.round((image + 1.0) * 127.5).astype(np.uint8)
      else:
        raise ValueError(f"first_frame must be uint8 or float in [-1, 1], got {image.dtype}")
    if image.shape[1:3] != (self.height, self.width):
      image = np.stack([resize_image(im, self.height, self.width) for im in image])
    if image.shape[0] != self.batch:
      if image.shape[0] != 1:
        raise ValueError(f"first_frame has batch {image.shape[0]}, the generator {self.batch}")
      image = np.repeat(image, self.batch, axis=0)
    return jnp.asarray(image)

  def _prepare_text(self, text):
    return jnp.asarray(prompt_lib.prepare(text, self.dit_config, self.batch, self.text_len))


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Centre-crops `image` (uint8 [H, W, 3]) to the target aspect and resizes it (Lanczos)."""
  from PIL import Image
  h, w = image.shape[:2]
  target = width / height
  if w / h > target:
    cw = int(round(h * target))
    x0 = (w - cw) // 2
    image = image[:, x0:x0 + cw]
  elif w / h < target:
    ch = int(round(w / target))
    y0 = (h - ch) // 2
    image = image[y0:y0 + ch]
  return np.asarray(Image.fromarray(image).resize((width, height), Image.LANCZOS))
