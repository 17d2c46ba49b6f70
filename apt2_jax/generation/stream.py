"""The pure, jittable stream functions: the one way a generator turns weights into frames.

Every user (the live `StreamingGenerator`, the exported bundle, the evaluation, the benchmark, the
stream demo and the stages' in-training samples) calls these; none keeps a copy.

    spec  = StreamSpec(dit_config, vae_config, options, guidance, control_encoding)
    frame0, state, dcache = start(spec, vae_params, image, seed)          # encode + decode frame 0
    text_kv = text(spec, params, tokens_or_embeddings)                   # once per prompt
    latent, state = step(spec, params, state, text_kv, control)          # one latent frame
    latents, state = chunk(spec, params, state, text_kv, controls)       # L of them, one lax.scan
    video, dcache = decode(spec, vae_params, dcache, latent)             # 4 uint8 video frames

Conventions, each defined once here:
  noise    step i (generating latent frame i + 1) draws `normal(fold_in(key(seed), i), [B, 1, h, w, C])`
           (`noise`, `noise_block`): a chunked stream equals a step-by-step one.
  state    {"cache": KV cache, "recycled": [B, 1, h, w, C] float32, "seed": int32, "counter": int32};
           the matched multi-step sampler (`cache_from="matched"`) keeps one KV cache per schedule
           time, every entry stacked on a leading [K] axis (`rollout.empty_cache`).
  controls the raw per-video-frame controls of the step's 4 video frames, float32 [B, 4, D]
           (chunk: [B, L, 4, D]); they are encoded into the model's control channels inside the
           jitted step by `apt2_jax.controls.frame_group_maps` (the same code the trainer uses),
           with the model's `control_encoding`. None for a model without control.
  guidance classifier-free guidance `v = v_u + w (v_c - v_u)` (`GuidedDiT`): the KV cache and the
           text K/V hold batch 2B, [conditional | unconditional]; the unconditional prompt is the
           all-padding one (zeros), as in caption dropout.
  rebase   the cache index is kept in [0, 2N] (`rebase_index`): the read/write layout of the cache
           depends only on min(i, N + 1) and i mod N, so a stream runs forever with the numbers of
           its first minute. It applies to every cache of a stacked one alike.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from apt2_jax import controls as controls_lib
from apt2_jax.models import CausalDiT, DiTConfig
from apt2_jax.models import vae as vae_lib
from apt2_jax.rollout import RolloutOptions, empty_cache, generator_step, rollout

FRAMES_PER_STEP = vae_lib.TEMPORAL_FACTOR


@dataclasses.dataclass(frozen=True)
class StreamSpec:
  """Everything static about a stream (hashable: one compile per spec and shape).

  Attributes:
    dit_config, vae_config: the generator and the VAE (None when only latents are generated).
    options: the sampler per latent frame (`RolloutOptions`: 1 step = the AAPT generator; more =
      the diffusion baseline's Euler sampler; `recycle=False` = the no-recycling ablation).
    guidance: classifier-free guidance weight (1 = off).
    control_encoding: how raw controls become control channels (`apt2_jax.controls`); "" when the
      model takes no control.
  """
  dit_config: DiTConfig
  vae_config: Optional[vae_lib.VAEConfig]
  options: RolloutOptions = RolloutOptions()
  guidance: float = 1.0
  control_encoding: str = ""

  @property
  def guided(self) -> bool:
    return float(self.guidance) != 1.0

  @property
  def cache_batch_factor(self) -> int:
    return 2 if self.guided else 1

  @property
  def forward_passes_per_frame(self) -> int:
    return self.options.forward_passes * self.cache_batch_factor


class GuidedDiT(nn.Module):
  """CausalDiT under classifier-free guidance `v = v_u + w (v_c - v_u)`, one doubled batch.

  It exposes CausalDiT's `step` (`rollout` calls `apply(..., method=CausalDiT.step)`); its
  parameters are `{'inner': params}`; the cache and `text_kv` have batch 2B: [conditional |
  unconditional].
  """
  config: DiTConfig
  guidance: float

  @nn.compact
  def __call__(self, noise=None, recycled=None, control=None, t=None, text=None, *, mode="step",
               cache=None, text_kv=None, return_hidden=False):
    inner = CausalDiT(self.config, name="inner")
    if mode != "step":
      return inner(noise, recycled, control, t, text, mode=mode, cache=cache, text_kv=text_kv)
    two = lambda x: None if x is None else jnp.concatenate([x, x], axis=0)
    v, cache = inner(two(noise), two(recycled), two(control), two(t), None, mode="step",
                     cache=cache, text_kv=text_kv)
    v_c, v_u = jnp.split(v, 2, axis=0)
    return v_u + self.guidance * (v_c - v_u), cache


def _net(spec: StreamSpec, params):
  """(module, parameters) that `rollout` / `generator_step` run."""
  if spec.guided:
    return GuidedDiT(spec.dit_config, float(spec.guidance)), {"inner": params}
  return CausalDiT(spec.dit_config), params


# ------------------------------------------------------------------------------------------------
# Conventions: noise, pixels, cache index, controls
# ------------------------------------------------------------------------------------------------


def noise(seed, index, shape):
  """The noise of step `index` (generating latent frame `index + 1`): float32 `shape`."""
  return jax.random.normal(jax.random.fold_in(jax.random.key(seed), index), shape, jnp.float32)


def noise_block(seed, start, length: int, shape):
  """`noise` of steps `start .. start + length - 1` stacked on axis 1: `[B, length, h, w, C]` for
  `shape = [B, 1, h, w, C]`."""
  draws = jax.vmap(lambda i: noise(seed, i, shape))(start + jnp.arange(length))  # [L, B, 1, ...]
  return jnp.swapaxes(draws[:, :, 0], 0, 1)


def to_uint8(video):
  """[-1, 1] float -> uint8 [0, 255]."""
  return jnp.round((jnp.clip(video, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


def from_uint8(images):
  return images.astype(jnp.float32) / 127.5 - 1.0


def rebase_index(cache, window: int):
  """Moves the cache index back by whole windows into [N + 1, 2N] once it is past N + 1.

  The slot of frame j is (j - 1) mod N and positions depend on min(i, N + 1), so i and i - kN
  read and write the same layout: the index, hence every position, stays bounded forever. The
  index of a stacked (matched-sampler) cache is `[K]`: each is rebased alike.
  """
  index = cache["index"]
  return dict(cache, index=index - window * jnp.maximum((index - (window + 1)) // window, 0))


def control_maps(spec: StreamSpec, controls, latent_hw):
  """Raw controls `[B, ..., 4, D]` -> the model's control input `[B, ..., h, w, Cc]` (or None)."""
  if controls is None or not spec.dit_config.control_channels:
    return None
  h, w = latent_hw
  maps = controls_lib.frame_group_maps(jnp.asarray(controls, jnp.float32), h, w, spec.control_encoding)
  if maps.shape[-1] != spec.dit_config.control_channels:
    raise ValueError(f"control encoding {spec.control_encoding!r} gives {maps.shape[-1]} channels, "
                     f"the model takes model.control_channels={spec.dit_config.control_channels}")
  return maps


# ------------------------------------------------------------------------------------------------
# The stream functions
# ------------------------------------------------------------------------------------------------


def encode_image(spec: StreamSpec, vae_params, image):
  """uint8 [B, H, W, 3] -> the normalised latent frame 0, [B, 1, h, w, C] float32."""
  vae = vae_lib.VAE(spec.vae_config)
  mean, _ = vae.apply(vae_params, from_uint8(image)[:, None], method=vae_lib.VAE.encode)
  return vae_lib.normalize_latents(mean, spec.vae_config).astype(jnp.float32)


def init_state(spec: StreamSpec, latent0, seed):
  """An empty stream state continuing from latent frame 0 `[B, 1, h, w, C]`."""
  b, _, h, w, _ = latent0.shape
  return {"cache": empty_cache(spec.dit_config, spec.cache_batch_factor * b, h, w, spec.options),
          "recycled": latent0.astype(jnp.float32), "seed": jnp.asarray(seed, jnp.int32),
          "counter": jnp.zeros((), jnp.int32)}


def start(spec: StreamSpec, vae_params, image, seed):
  """Encodes the first frame, decodes it back, and builds an empty stream state.

  Args:
    image: uint8 [B, H, W, 3]; seed: int32 scalar.
  Returns:
    (frame0 uint8 [B, 1, H, W, 3], state, decode cache). The DiT sees frame 0 through its first
    step (block 0's recycled input), so no DiT parameters are needed here.
  """
  latent0 = encode_image(spec, vae_params, image)
  b, _, h, w, _ = latent0.shape
  decode_cache = vae_lib.init_decode_cache(vae_lib.VAE(spec.vae_config), b, h, w)
  frame0, decode_cache = decode(spec, vae_params, decode_cache, latent0, first=True)
  return frame0, init_state(spec, latent0, seed), decode_cache


def text(spec: StreamSpec, params, prompt):
  """Prompt (int32 tokens [B, T] or float embeddings [B, T, text_dim]) -> text K/V.

  Under guidance the K/V have batch 2B: [prompt | the empty prompt (zeros)].
  """
  if spec.guided:
    prompt = jnp.concatenate([prompt, jnp.zeros_like(prompt)], axis=0)
  return CausalDiT(spec.dit_config).apply({"params": params}, prompt, method=CausalDiT.encode_text)


def _advance(spec: StreamSpec, state, cache, last, steps: int):
  nxt = last if spec.options.recycle else jnp.zeros_like(last)
  return {"cache": rebase_index(cache, spec.dit_config.window), "recycled": nxt.astype(jnp.float32),
          "seed": state["seed"], "counter": state["counter"] + steps}


def step(spec: StreamSpec, params, state, text_kv, control=None):
  """One generator step: (latent [B, 1, h, w, C] float32, new state). `state` may be donated.

  control: raw controls of the step's 4 video frames, float32 [B, 4, D], or None.
  """
  recycled = state["recycled"]
  h, w = recycled.shape[2:4]
  maps = control_maps(spec, control, (h, w))
  maps = None if maps is None else maps[:, None]
  net, p = _net(spec, params)
  x, cache = generator_step(net, p, state["cache"], text_kv, noise(state["seed"], state["counter"], recycled.shape),
                            recycled, maps, spec.options)
  return x, _advance(spec, state, cache, x, 1)


def chunk(spec: StreamSpec, params, state, text_kv, controls=None, *, length: int):
  """`length` generator steps as one `lax.scan` (the rollout): (latents [B, L, h, w, C], state).

  Exactly `length` calls of `step` (same noise, same cache, same rebase). controls: raw
  [B, L, 4, D] or None.
  """
  recycled = state["recycled"]
  h, w = recycled.shape[2:4]
  maps = control_maps(spec, controls, (h, w))
  eps = noise_block(state["seed"], state["counter"], length, recycled.shape)
  net, p = _net(spec, params)
  frames, cache = rollout(net, p, recycled, text_kv, eps, maps, cache=state["cache"], options=spec.options)
  return frames, _advance(spec, state, cache, frames[:, -1:], length)


def decode(spec: StreamSpec, vae_params, decode_cache, latent, first: bool = False):
  """Latent frame [B, 1, h, w, C] (DiT space) -> (uint8 [B, T, H, W, 3], new decode cache).

  T = 1 for the first frame (`first=True`), 4 after it (the causal VAE's streaming decode).
  """
  vae = vae_lib.VAE(spec.vae_config)
  z = vae_lib.denormalize_latents(latent, spec.vae_config)
  video, decode_cache = vae.apply(vae_params, z, decode_cache, first, method=vae_lib.VAE.decode_step)
  return to_uint8(video), decode_cache


def generate(spec: StreamSpec, params, first_frame, prompt, controls, eps, *, control_maps_=None):
  """Latents after a given first latent frame with given noise (the stages' in-training samples).

  Args:
    first_frame: [B, 1, h, w, C]; prompt: int32 [B, T] (or embeddings); controls: raw
      [B, S, 4, D] or None; eps: [B, S, h, w, C] the noise of each generated frame.
    control_maps_: the already encoded control input [B, S, h, w, Cc] instead of `controls`
      (a trainer holds its batch's maps).
  Returns:
    frames [B, S, h, w, C].
  """
  b, _, h, w, _ = first_frame.shape
  net, p = _net(spec, params)
  cache = empty_cache(spec.dit_config, spec.cache_batch_factor * b, h, w, spec.options)
  maps = control_maps(spec, controls, (h, w)) if control_maps_ is None else control_maps_
  frames, _ = rollout(net, p, first_frame, text(spec, params, prompt), eps, maps, cache=cache,
                      options=spec.options)
  return frames


# ------------------------------------------------------------------------------------------------
# Jitted functions, shared by every stream of the same spec
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Compiled:
  """Jitted stream functions of one spec. Donations: the stream state in `step` and `chunk`,
  the decoder's feature cache in `decode`. Unsharded: they run where the parameters live."""
  spec: StreamSpec
  start: Any
  text: Any
  step: Any
  decode: Any
  encode: Any
  _chunks: dict = dataclasses.field(default_factory=dict)

  def chunk(self, length: int):
    """The jitted `chunk` of `length` steps (one compile per length)."""
    if length not in self._chunks:
      self._chunks[length] = jax.jit(functools.partial(chunk, self.spec, length=length), donate_argnums=(1,))
    return self._chunks[length]


@functools.lru_cache(maxsize=16)
def compiled(spec: StreamSpec) -> Compiled:
  """The jitted stream functions of `spec` (models differing only in parameters share them)."""
  return Compiled(
      spec=spec,
      start=jax.jit(functools.partial(start, spec)),
      text=jax.jit(functools.partial(text, spec)),
      step=jax.jit(functools.partial(step, spec), donate_argnums=(1,)),
      decode=jax.jit(functools.partial(decode, spec), static_argnames=("first",), donate_argnums=(1,)),
      encode=jax.jit(functools.partial(encode_image, spec)))

