"""`StreamingGenerator`: the AAPT generator as an endless stream of 4-frame chunks.

    gen = StreamingGenerator.from_checkpoint("bundle_or_workdir")
    first = gen.start(image, text="a camera glides over grass", seed=0)   # [B, 1, H, W, 3] uint8
    while True:
      frames = gen.step({"keys": ["w"]})                                  # [B, 4, H, W, 3] uint8
      gen.set_text("a camera circles over sand")                          # prompt for what follows

Per step, on device and without a host round trip except handing back the frames:
  noise_i   = normal(fold_in(key(seed), i))                  (`stream_noise`, the only randomness)
  x_{i+1}   = noise_i - v(noise_i, recycled=x_i, control_i, t=1)   (`rollout.generator_step`)
  frames    = VAE.decode_step(x_{i+1})                        (4 video frames, streaming cache)
The DiT step and the decode step are each jitted once with their state donated; the KV cache and
the decoder's feature cache have fixed shapes, and the cache index is kept in [0, 2N] (the layout
of `kv_cache.read_layout` depends only on `min(i, N + 1)` and `i mod N`), so a stream can run
forever with the numbers of the first minute.

The pure functions below (`start_fn`, `text_fn`, `dit_step_fn`, `decode_fn`) are what
`apt2_jax.export` serialises; the live generator and the exported bundle run the same code.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from apt2_jax.inference import controls as controls_lib
from apt2_jax.models import CausalDiT, DiTConfig, kv_cache
from apt2_jax.models import vae as vae_lib
from apt2_jax.rollout import RolloutOptions, generator_step

FRAMES_PER_STEP = vae_lib.TEMPORAL_FACTOR


# ------------------------------------------------------------------------------------------------
# Pure functions (jitted by StreamingGenerator, serialised by apt2_jax.export)
# ------------------------------------------------------------------------------------------------


def stream_noise(seed, index, shape):
  """The noise of step `index` (generating latent frame `index + 1`): float32 `shape`."""
  return jax.random.normal(jax.random.fold_in(jax.random.key(seed), index), shape, jnp.float32)


def to_uint8(video):
  """[-1, 1] float -> uint8 [0, 255]."""
  return jnp.round((jnp.clip(video, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


def from_uint8(images):
  return images.astype(jnp.float32) / 127.5 - 1.0


def text_fn(model: CausalDiT, params, text):
  """Prompt (int32 tokens [B, T] or float embeddings [B, T, text_dim]) -> text K/V."""
  return model.apply({"params": params}, text, method=CausalDiT.encode_text)


def start_fn(model: CausalDiT, vae: vae_lib.VAE, params, vae_params, image, seed):
  """Encodes the first frame, decodes it back, and builds an empty stream state.

  Args:
    image: uint8 [B, H, W, 3]; seed: int32 scalar.
  Returns:
    (frame0 uint8 [B, 1, H, W, 3], dit_state, decode_cache). `dit_state` = {"cache": KV cache,
    "recycled": [B, 1, h, w, C] latent frame 0, "seed": int32, "counter": int32 step index}.
  """
  del params  # the DiT sees the first frame through its first step (block 0's recycled input)
  video = from_uint8(image)[:, None]
  mean, _ = vae.apply(vae_params, video, method=vae_lib.VAE.encode)
  latent0 = vae_lib.normalize_latents(mean, vae.config)
  b, _, h, w, _ = latent0.shape
  decode_cache = vae_lib.init_decode_cache(vae, b, h, w)
  frame0, decode_cache = vae.apply(vae_params, vae_lib.denormalize_latents(latent0, vae.config),
                                   decode_cache, True, method=vae_lib.VAE.decode_step)
  state = {"cache": kv_cache.init_cache(model.config, b, h, w),
           "recycled": latent0.astype(jnp.float32),
           "seed": jnp.asarray(seed, jnp.int32), "counter": jnp.zeros((), jnp.int32)}
  return to_uint8(frame0), state, decode_cache


def dit_step_fn(model: CausalDiT, options: RolloutOptions, params, state, text_kv, control):
  """One generator step: (latent x [B, 1, h, w, C] float32, new state). `state` may be donated.

  control: [B, 1, h, w, control_channels] float32, or None for a model without control.
  """
  recycled = state["recycled"]
  noise = stream_noise(state["seed"], state["counter"], recycled.shape)
  x, cache = generator_step(model, params, state["cache"], text_kv, noise, recycled, control,
                            options)
  n = model.config.window
  index = cache["index"]
  # Same read/write layout for i and i - N once i > 2N: positions and slots stay bounded forever.
  cache = dict(cache, index=jnp.where(index > 2 * n, index - n, index))
  nxt = x if options.recycle else jnp.zeros_like(x)
  return x, {"cache": cache, "recycled": nxt.astype(jnp.float32), "seed": state["seed"],
             "counter": state["counter"] + 1}


def decode_fn(vae: vae_lib.VAE, vae_params, decode_cache, latent):
  """Latent frame [B, 1, h, w, C] (DiT space) -> (uint8 [B, 4, H, W, 3], new decode cache)."""
  z = vae_lib.denormalize_latents(latent, vae.config)
  video, decode_cache = vae.apply(vae_params, z, decode_cache, False, method=vae_lib.VAE.decode_step)
  return to_uint8(video), decode_cache


# ------------------------------------------------------------------------------------------------
# The generator
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Compiled:
  """Jitted functions shared by a generator and its forks (one compile per shape)."""
  start: Any
  text: Any
  dit_step: Any
  decode: Any


@functools.lru_cache(maxsize=8)
def compiled_functions(dit_config: DiTConfig, vae_config: vae_lib.VAEConfig,
                       options: RolloutOptions) -> _Compiled:
  """The jitted stream functions for a pair of configs, shared by every generator of them.

  Unsharded: everything runs on the device holding the parameters. Donations: the DiT state
  (KV cache, recycled latent) in `dit_step`, the decoder's feature cache in `decode`.
  """
  model, vae = CausalDiT(dit_config), vae_lib.VAE(vae_config)
  return _Compiled(
      start=jax.jit(functools.partial(start_fn, model, vae)),
      text=jax.jit(functools.partial(text_fn, model)),
      dit_step=jax.jit(functools.partial(dit_step_fn, model, options), donate_argnums=(1,)),
      decode=jax.jit(functools.partial(decode_fn, vae), donate_argnums=(1,)))


def random_dit_params(config: DiTConfig, seed: int = 0):
  """Random DiT parameters drawn on the host (no `init` compile): demos and tests.

  Kernels LeCun normal, biases zero, norm scales one, modulation tables and embeddings small
  normal; the same distributions as `init_params`, in a second instead of a compile.
  """
  from apt2_jax.models import init_params
  shapes = jax.eval_shape(lambda: init_params(CausalDiT(config), jax.random.key(0)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    dtype = leaf.dtype
    if name == "bias":
      return jnp.zeros(leaf.shape, dtype)
    if name == "scale":
      return jnp.ones(leaf.shape, dtype)
    if name == "kernel":
      layered = any(str(getattr(p, "key", "")) == "blocks" for p in path)
      shape = leaf.shape[1:] if layered else leaf.shape
      fan_in = int(np.prod(shape[:-1]))
      return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), dtype)
    return jnp.asarray(rng.standard_normal(leaf.shape) * 0.02 if "embedding" in name
                       else rng.standard_normal(leaf.shape) / np.sqrt(config.dim), dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=4)
def _random_params(dit_config, vae_config, seed):
  vae_params = vae_lib.init_params(vae_lib.VAE(vae_config), jax.random.key(seed + 1), 16, 16)
  return random_dit_params(dit_config, seed), vae_params


class StreamingGenerator:
  """Streams 4 RGB frames per call from a first frame, a prompt and per-step controls.

  Attributes:
    dit_config, vae_config: the model configs. control_type: "none" | "camera" | "pose".
    height, width: pixel resolution (multiples of 16). latent_hw: (height / 8, width / 8).
    batch: streams generated together (all get the same control).
    frames_generated: video frames handed out since `start` (1 + 4 per step).
  """

  def __init__(self, dit_config: DiTConfig, dit_params, vae_config: vae_lib.VAEConfig, vae_params,
               *, control_type: Optional[str] = None, height: int = 64, width: int = 64,
               batch: int = 1, options: RolloutOptions = RolloutOptions(),
               text_len: Optional[int] = None, _compiled: Optional[_Compiled] = None):
    if isinstance(dit_config, dict):
      dit_config = DiTConfig.from_dict(dit_config)
    if height % 16 or width % 16:
      raise ValueError(f"height and width must be multiples of 16 (VAE 8x, patch 2x), got "
                       f"{height}x{width}")
    if vae_config.z_dim != dit_config.latent_channels:
      raise ValueError(f"VAE z_dim={vae_config.z_dim} != model.latent_channels="
                       f"{dit_config.latent_channels}")
    self.dit_config, self.vae_config = dit_config, vae_config
    self.model, self.vae = CausalDiT(dit_config), vae_lib.VAE(vae_config)
    self.params, self.vae_params = dit_params, vae_params
    self.control_type = controls_lib.control_type(dit_config, control_type)
    self.height, self.width, self.batch = height, width, batch
    self.latent_hw = (height // vae_lib.SPATIAL_FACTOR, width // vae_lib.SPATIAL_FACTOR)
    self.options = options
    self.text_len = text_len
    self._fns = _compiled or compiled_functions(dit_config, vae_config, options)
    self._state = self._decode_cache = self._text_kv = None
    self._last_control = None
    self.frames_generated = 0
    self.text = None

  # -- construction ------------------------------------------------------------------------------
  @classmethod
  def from_checkpoint(cls, directory: str, **kwargs) -> "StreamingGenerator":
    """From an export bundle (`apt2_jax.export`) or a training workdir (EMA parameters)."""
    if os.path.exists(os.path.join(directory, "bundle.json")):
      return cls.from_bundle(directory, **kwargs)
    return _from_training_checkpoint(cls, directory, **kwargs)

  @classmethod
  def from_bundle(cls, directory: str, **kwargs) -> "StreamingGenerator":
    """From an export bundle's parameters and configs (live model code, any shape)."""
    from apt2_jax import export
    meta, params, vae_params = export.read_bundle_arrays(directory)
    dit_config = DiTConfig.from_dict(meta["model"])
    vae_config = vae_config_from_dict(meta["vae"])
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(dit_config.param_dtype)), params)
    vae_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), vae_params)
    defaults = dict(control_type=meta.get("control_type"), height=meta["height"],
                    width=meta["width"], batch=meta["batch"])
    defaults.update(kwargs)
    return cls(dit_config, params, vae_config, vae_params, **defaults)

  @classmethod
  def random(cls, dit_config: DiTConfig, vae_config: vae_lib.VAEConfig, seed: int = 0,
             **kwargs) -> "StreamingGenerator":
    """Random weights (host-drawn, no init compile): the demo without a checkpoint, and tests."""
    params, vae_params = _random_params(dit_config, vae_config, seed)
    return cls(dit_config, params, vae_config, vae_params, **kwargs)

  def fork(self) -> "StreamingGenerator":
    """A new stream sharing this one's parameters and compiled functions (no recompilation)."""
    return StreamingGenerator(self.dit_config, self.params, self.vae_config, self.vae_params,
                              control_type=self.control_type, height=self.height,
                              width=self.width, batch=self.batch, options=self.options,
                              text_len=self.text_len, _compiled=self._fns)

  # -- streaming ---------------------------------------------------------------------------------
  def start(self, first_frame, text=None, seed: int = 0) -> np.ndarray:
    """Starts a stream from `first_frame` (uint8 [H, W, 3] or [B, H, W, 3], resized if needed).

    Returns the decoded first frame, uint8 [B, 1, H, W, 3]. `text`: a caption string (tokenised
    with `apt2_jax.data.captions.tokenize`), int32 tokens [T] / [B, T], or float embeddings
    [T, text_dim] / [B, T, text_dim]; None = the empty prompt.
    """
    image = self._prepare_image(first_frame)
    frame0, self._state, self._decode_cache = self._fns.start(
        self.params, self.vae_params, image, jnp.asarray(seed, jnp.int32))
    self.set_text(text)
    self._last_control = None
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
    frames = self.step_device(control)
    return np.asarray(frames)

  def step_device(self, control=None):
    """`step` without the transfer: the frames stay a device array (for pipelining)."""
    if self._state is None:
      raise RuntimeError("call start(first_frame, ...) before step()")
    maps = self.control_input(control)
    latent, self._state = self._fns.dit_step(self.params, self._state, self._text_kv, maps)
    frames, self._decode_cache = self._fns.decode(self.vae_params, self._decode_cache, latent)
    self.frames_generated += FRAMES_PER_STEP
    return frames

  def control_input(self, control):
    """User control -> the model's control input [B, 1, h, w, Cc] (None without control)."""
    parsed = controls_lib.parse_control(control, self.control_type)
    if parsed is None and self.control_type == "pose":
      parsed = self._last_control  # hold the last pose
    if parsed is not None:
      self._last_control = parsed
    maps = controls_lib.control_maps(self.control_type, parsed, self.latent_hw,
                                     self.dit_config.control_channels)
    if maps is None:
      return None
    return jnp.broadcast_to(jnp.asarray(maps)[None, None],
                            (self.batch, 1) + maps.shape)

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
    c = self.dit_config
    if text is None:
      text = ""
    if isinstance(text, str):
      if not c.caption_vocab_size:
        raise ValueError("this model takes text embeddings (model.caption_vocab_size == 0); pass "
                         "a float array [T, text_dim], not a string")
      from apt2_jax.data import captions
      tokens = captions.tokenize(text) if self.text_len is None else captions.tokenize(
          text, self.text_len)
      text = tokens
    arr = np.asarray(text)
    if np.issubdtype(arr.dtype, np.integer):
      if arr.ndim == 1:
        arr = arr[None]
      if arr.max(initial=0) >= max(c.caption_vocab_size, 1) or arr.min(initial=0) < 0:
        raise ValueError(f"text token ids must lie in [0, {c.caption_vocab_size})")
      arr = arr.astype(np.int32)
    else:
      if arr.ndim == 2:
        arr = arr[None]
      if arr.ndim != 3 or arr.shape[-1] != c.text_dim:
        raise ValueError(f"text embeddings must be [T, {c.text_dim}] or [B, T, {c.text_dim}], "
                         f"got {arr.shape}")
      arr = arr.astype(np.float32)
    if arr.shape[0] != self.batch:
      arr = np.repeat(arr, self.batch, axis=0)
    return jnp.asarray(arr)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


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


def vae_config_to_dict(config: vae_lib.VAEConfig) -> dict:
  d = dataclasses.asdict(config)
  d["dtype"] = jnp.dtype(config.dtype).name
  return d


def vae_config_from_dict(d) -> vae_lib.VAEConfig:
  d = dict(d)
  known = {f.name for f in dataclasses.fields(vae_lib.VAEConfig)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"unknown VAE config field(s) {unknown}; known fields: {sorted(known)}")
  for k, v in list(d.items()):
    if isinstance(v, list):
      d[k] = tuple(v)
  if "dtype" in d:  # the scalar type (jnp.float32), as VAEConfig's default, so configs compare equal
    d["dtype"] = getattr(jnp, jnp.dtype(d["dtype"]).name)
  return vae_lib.VAEConfig(**d)


def dit_config_to_dict(config: DiTConfig) -> dict:
  d = dataclasses.asdict(config)
  d["patch_size"] = list(d["patch_size"])
  return d


def _from_training_checkpoint(cls, directory, **kwargs):
  """EMA generator of a training workdir (`checkpointing.load_params`) with its VAE.

  The run's config gives the model (`config.model`), the VAE (`config.vae.checkpoint`, a `vae`
  stage workdir; empty: a random VAE, with a warning, as the trainer's smoke runs do), the
  resolution (`config.data.height/width`) and the control type (`config.data.world`).
  """
  import logging
  from apt2_jax import checkpointing
  from apt2_jax.stages.common import vae_config_from
  if not checkpointing.has_checkpoint(directory):
    raise FileNotFoundError(f"{directory} holds neither an export bundle (bundle.json) nor a "
                            f"training checkpoint")
  params, config = checkpointing.load_params(directory, key="ema_params")
  dit_config = DiTConfig.from_dict(dict(config.model))
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(dit_config.param_dtype)), params)
  vae_block = config.get("vae") or {}
  vae_dir = vae_block.get("checkpoint", "")
  if vae_dir:
    vae_params, saved = checkpointing.load_params(vae_dir, key="ema_params")
    vae_config = vae_config_from(saved.get("vae", {}))
    vae_params = jax.tree.map(jnp.asarray, vae_params)
  else:
    logging.warning("%s: config.vae.checkpoint is empty; decoding with a RANDOM %r VAE",
                    directory, vae_block.get("size", "tiny"))
    vae_config = vae_config_from(vae_block)
    vae_params = vae_lib.init_params(vae_lib.VAE(vae_config), jax.random.key(0), 16, 16)
  if "params" not in vae_params:
    vae_params = {"params": vae_params}
  defaults = {}
  data = config.get("data") or {}
  for k in ("height", "width"):
    if data.get(k):
      defaults[k] = int(data.get(k))
  if data.get("world") in controls_lib.WORLD_CONTROL_TYPES:
    defaults["control_type"] = controls_lib.WORLD_CONTROL_TYPES[data.get("world")]
  defaults.update(kwargs)
  return cls(dit_config, params, vae_config, vae_params, **defaults)
