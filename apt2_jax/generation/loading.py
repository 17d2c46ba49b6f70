"""One loader from a stage workdir or an export bundle to a generator ready to stream.

    gen = load("runs/pipeline/long_video")        # any DiT stage's workdir (EMA parameters)
    gen = load("bundle/")                          # an `apt2_jax.export` bundle
    gen = random_generator(dit_config, vae_config, control_type="camera")   # demos, tests
    spec = gen.spec()                              # -> generation.stream functions

A workdir's run config gives the model (`config.model`), the VAE (`config.vae.checkpoint`, a `vae`
stage workdir or a diffusers AutoencoderKLWan folder, through `generation.vae.load_vae`; an empty
one gives a random VAE with a warning, as the trainer's smoke runs do), the resolution
(`config.data.height/width`), the prompt length, and the control type and encoding
(`config.data.world`, `config.data.control_encoding`). A light streaming decoder distilled behind
that VAE's encoder (`experiments/vae.py:light_decoder`) replaces its decoder when given as `decoder=`
or `config.vae.decoder_checkpoint` (`generation.vae.load_vae(path, decoder=...)`).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from apt2_jax import controls as controls_lib
from apt2_jax.generation import bundle as bundle_lib
from apt2_jax.generation.stream import StreamSpec
from apt2_jax.models import CausalDiT, DiTConfig, init_params
from apt2_jax.models import vae as vae_lib
from apt2_jax.rollout import RolloutOptions

log = logging.getLogger(__name__)

# Stages whose model is a multi-step sampler (diffusion), not a one-step generator.
MULTI_STEP_STAGES = ("pretrain", "adapt")


@dataclasses.dataclass
class Generator:
  """A generator's weights and everything needed to stream it.

  Attributes:
    dit_config, params: the causal DiT and its parameters (a plain pytree, no 'params' wrapper).
    vae_config, vae_params: the VAE (`vae_params = {'params': ...}`).
    control_type: "none" | "camera" | "pose"; control_encoding: `apt2_jax.controls` encoding
      ("" without control); control_dim: D of the raw per-video-frame controls (0 without).
    height, width: the training resolution (pixels), or None.
    text_len: prompt length in tokens the model was trained with.
    stage: the training stage that produced it ("bundle" for an export bundle, "random").
    sampler: the bundle's recorded sampler (`RolloutOptions` fields + guidance), or {}.
    source: where it came from.
  """
  dit_config: DiTConfig
  params: Any
  vae_config: vae_lib.VAEConfig
  vae_params: Any
  control_type: str = "none"
  control_encoding: str = ""
  control_dim: int = 0
  height: Optional[int] = None
  width: Optional[int] = None
  text_len: int = 16
  stage: str = ""
  sampler: dict = dataclasses.field(default_factory=dict)
  source: str = ""

  def spec(self, options: Optional[RolloutOptions] = None, guidance: Optional[float] = None) -> StreamSpec:
    """The stream spec; `options`/`guidance` default to the bundle's sampler (else 1 step)."""
    rec = dict(self.sampler)
    if options is None:
      options = RolloutOptions(**{k: rec[k] for k in ("num_steps", "shift", "recycle", "cache_from") if k in rec})
    if guidance is None:
      guidance = float(rec.get("guidance", 1.0))
    if self.stage in MULTI_STEP_STAGES and options.num_steps == 1:
      log.warning("%s is a %r (multi-step diffusion) checkpoint streamed as a one-step generator; its frames "
                  "will be poor (use a stage-2/3 checkpoint, or num_steps > 1)", self.source, self.stage)
    return StreamSpec(self.dit_config, self.vae_config, options, float(guidance), self.control_encoding)

  @property
  def latent_hw(self) -> Optional[tuple[int, int]]:
    if not self.height or not self.width:
      return None
    return self.height // vae_lib.SPATIAL_FACTOR, self.width // vae_lib.SPATIAL_FACTOR


def load(path: str, *, vae: Optional[str] = None, decoder: Optional[str] = None, key: str = "ema_params",
         step: Optional[int] = None) -> Generator:
  """A `Generator` from an export bundle or a training workdir (any DiT stage).

  Args:
    path: bundle directory (with bundle.json) or stage workdir (checkpoints/<step>/state).
    vae: a VAE workdir or diffusers folder to use instead of the run's `config.vae.checkpoint`.
    decoder: a `vae_distill` workdir (the light decoder) whose decoder replaces the VAE's, instead
      of the run's `config.vae.decoder_checkpoint` (workdirs only; export a bundle with it).
    key: the train-state entry ("ema_params" falls back to "params" when the run kept no EMA).
    step: a saved step (default: the latest).
  Raises FileNotFoundError naming `path` when it holds neither.
  """
  path = os.path.abspath(os.fspath(path))
  if bundle_lib.is_bundle(path):
    if decoder:
      raise ValueError(f"{path} is an export bundle: its decoder is fixed; export the run with "
                       "--decoder instead")
    return _from_bundle(path)
  from apt2_jax import checkpointing
  if not checkpointing.has_checkpoint(path):
    raise FileNotFoundError(f"{path} holds neither an export bundle (bundle.json) nor a training "
                            f"checkpoint (checkpoints/<step>/state)")
  params, config = checkpointing.load_params(path, key=key, step=step)
  if "model" not in config:
    raise ValueError(f"{path} is a {config.get('stage')!r} run, not a generator (no config.model)")
  dit_config = DiTConfig.from_dict(dict(config.model))
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(dit_config.param_dtype)), params)
  vae_config, vae_params = _run_vae(config, vae, path, decoder)
  if vae_config.z_dim != dit_config.latent_channels:
    raise ValueError(f"{path}: the VAE has {vae_config.z_dim} latent channels, the DiT "
                     f"{dit_config.latent_channels} (config.vae / --vae)")
  data = config.get("data") or {}
  kind, encoding, dim = _control_of(dit_config, data)
  return Generator(dit_config, params, vae_config, vae_params, control_type=kind, control_encoding=encoding,
                   control_dim=dim, height=int(data["height"]) if data.get("height") else None,
                   width=int(data["width"]) if data.get("width") else None,
                   text_len=int(data.get("text_len", 16) or 16), stage=str(config.get("stage", "")), source=path)


def _run_vae(config, override: Optional[str], source: str, decoder: Optional[str] = None):
  from apt2_jax.generation.vae import load_vae, vae_config_from_block
  block = config.get("vae") or {}
  path = override or block.get("checkpoint", "")
  decoder = decoder or block.get("decoder_checkpoint", "")
  if decoder and not path:  # a distilled decoder's workdir holds its teacher's encoder too
    path, decoder = decoder, None
  if path:
    model, variables = load_vae(path, decoder=decoder or None)
    return model.config, variables
  cfg = vae_config_from_block(block)
  if cfg.codec == "learned":  # the lossless pixel codec has no parameters
    log.warning("%s: config.vae.checkpoint is empty; decoding with a RANDOM %r VAE", source, block.get("size", "tiny"))
  return cfg, jax.tree.map(jnp.asarray, _random_vae_params(cfg))


@functools.lru_cache(maxsize=4)
def _random_vae_params(cfg: vae_lib.VAEConfig):
  """Host copies of a random VAE's parameters (its init compiles once per config, not per load)."""
  return jax.device_get(vae_lib.init_params(vae_lib.VAE(cfg), jax.random.key(0), 16, 16))


def _control_of(dit_config: DiTConfig, data) -> tuple[str, str, int]:
  """(control type, encoding, raw control dim) of a run's `config.data`."""
  if not dit_config.control_channels:
    return "none", "", 0
  dim = int(data.get("control_dim", 0) or 0)
  kind = controls_lib.WORLD_CONTROL_TYPES.get(data.get("world", ""), "")
  if not kind:
    kind = {controls_lib.CONTROL_DIM["camera"]: "camera", controls_lib.CONTROL_DIM["pose"]: "pose"}.get(dim, "")
  if not kind:
    raise ValueError(f"cannot tell the control type of config.data (world={data.get('world')!r}, "
                     f"control_dim={dim})")
  dim = dim or controls_lib.CONTROL_DIM[kind]
  encoding = (data.get("control_encoding", "")
              or controls_lib.encoding_from_channels(dit_config.control_channels, kind)[1])
  want = controls_lib.control_channels(encoding, dim)
  if want != dit_config.control_channels:
    raise ValueError(f"config.data.control_encoding={encoding!r} with control_dim={dim} gives {want} channels, "
                     f"the model has model.control_channels={dit_config.control_channels}")
  return kind, encoding, dim


def _from_bundle(directory: str) -> Generator:
  from apt2_jax.generation.vae import vae_config_from_dict
  meta = bundle_lib.read_meta(directory)
  params, vae_params = bundle_lib.read_arrays(directory, meta)
  dit_config = DiTConfig.from_dict(meta["model"])
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(dit_config.param_dtype)), params)
  vae_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), vae_params)
  return Generator(dit_config, params, vae_config_from_dict(meta["vae"]), vae_params,
                   control_type=meta["control_type"], control_encoding=meta["control_encoding"],
                   control_dim=int(meta["control_dim"]), height=meta["height"], width=meta["width"],
                   text_len=int(meta["text"]["shape"][-1]) if meta["text"]["dtype"].startswith("int") else 16,
                   stage="bundle", sampler=dict(meta.get("sampler", {})), source=directory)


# ------------------------------------------------------------------------------------------------
# Random weights (demos, tests, the benchmark)
# ------------------------------------------------------------------------------------------------


def random_dit_params(config: DiTConfig, seed: int = 0):
  """Random DiT parameters drawn on the host (no `init` compile).

  Kernels LeCun normal, biases zero, norm scales one, modulation tables and embeddings small
  normal; the same distributions as `init_params`, in a second instead of a compile.
  """
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
def _random_params(dit_config: DiTConfig, vae_config: vae_lib.VAEConfig, seed: int):
  vae_params = vae_lib.init_params(vae_lib.VAE(vae_config), jax.random.key(seed + 1), 16, 16)
  return random_dit_params(dit_config, seed), vae_params


def random_generator(dit_config: DiTConfig, vae_config: vae_lib.VAEConfig, *, control_type: str = "",
                     control_encoding: str = "", seed: int = 0, height: Optional[int] = None,
                     width: Optional[int] = None, text_len: int = 16) -> Generator:
  """Random weights for `dit_config` (host-drawn): the demo without a checkpoint, and tests.

  The control type and encoding default to what `dit_config.control_channels` fits
  (`apt2_jax.controls.encoding_from_channels`).
  """
  if vae_config.z_dim != dit_config.latent_channels and vae_config.codec == "learned":
    vae_config = dataclasses.replace(vae_config, z_dim=dit_config.latent_channels)
  params, vae_params = _random_params(dit_config, vae_config, seed)
  kind, encoding = controls_lib.encoding_from_channels(dit_config.control_channels, control_type or None)
  if control_encoding and control_encoding != encoding:
    raise ValueError(f"control_encoding={control_encoding!r} does not fit model.control_channels="
                     f"{dit_config.control_channels} ({encoding or 'no control'})")
  dim = controls_lib.CONTROL_DIM[kind]
  return Generator(dit_config, params, vae_config, vae_params, control_type=kind, control_encoding=encoding,
                   control_dim=dim, height=height, width=width, text_len=text_len, stage="random",
                   source="random")
