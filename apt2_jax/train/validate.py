"""Config validation at start, and the defaults of the fields some stage configs leave out.

`validate_config(config)` fails at start, naming the field, for the errors that would otherwise
surface much later (a mesh that does not fit, a batch the data axes cannot split, a missing
checkpoint), and returns the config the loop runs: the caller's, or for a stage with defaults
(`STAGE_DEFAULTS`) a copy with the missing fields filled in, so that the saved config is complete.
"""
from __future__ import annotations

import copy
import math
import os

import jax
import ml_collections
from absl import logging

from apt2_jax import checkpointing, sharding
from apt2_jax.train import registry

VAE_STAGES = ("vae", "vae_distill")


class ConfigError(ValueError):
  """A config the run cannot use; the message names the field (`config.<field>`)."""

# The VAE configs predate the shared loop: these are the fields it (and the VAE stage) reads that
# a VAE config may lack. A config's own values always win.
_VAE_DEFAULTS = {
    # Data parallel with replicated parameters: the VAE is small next to its activations.
    "mesh": {"data": -1, "fsdp": 1, "tensor": 1, "sequence": 1},
    "optimizer.name": "adamw",
    "optimizer.schedule": "cosine",
    "optimizer.b1": 0.9,
    "optimizer.b2": 0.99,
    "measure_latent_stats": True,
    "stats_batches": 16,          # batches averaged plainly before the running statistics turn EMA
    "latent_stats_decay": 0.98,   # EMA decay of the latent statistics after that
    "eval_at_end": False,         # the reconstruction eval costs a compile; opt in
}
STAGE_DEFAULTS = {"vae": _VAE_DEFAULTS, "vae_distill": _VAE_DEFAULTS}
_PURE_DATA_MESH = {"data": -1, "fsdp": 1, "tensor": 1, "sequence": 1}


def with_defaults(config):
  """`config`, or a copy with `STAGE_DEFAULTS[config.stage]` filled in where fields are absent.

  VAE stages with `num_devices=0` on a pure data-parallel mesh and one process use the largest
  number of devices that divides the batch (the VAE configs' documented meaning of 0).
  """
  defaults = STAGE_DEFAULTS.get(config.get("stage", None))
  if not defaults:
    return config
  config = copy.deepcopy(config)  # the caller's (possibly locked) config stays as it was given
  with config.unlocked():
    for key, value in defaults.items():
      *path, last = key.split(".")
      node = config
      for name in path:
        node = node[name]
      if last not in node:
        node[last] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    if (not int(config.get("num_devices", 0) or 0) and jax.process_count() == 1
        and {a: int(config.mesh.get(a, 1)) for a in _PURE_DATA_MESH} == _PURE_DATA_MESH):
      config.num_devices = math.gcd(int(config.batch_size), jax.device_count())
  return config


def _is_weights_dir(path: str, stage: str) -> bool:
  """A checkpoint of this project, or a diffusers folder (VAE stages: AutoencoderKLWan; the DiT
  stages: a Wan transformer or pipeline folder, `stages.common.load_pretrained_params`)."""
  if checkpointing.has_checkpoint(path) or (stage in VAE_STAGES and os.path.isdir(path)):
    return True
  from apt2_jax.convert import wan_dit  # pylint: disable=g-import-not-at-top
  return os.path.isdir(path) and wan_dit.is_diffusers_dit(path)


def validate_config(config, num_devices: int | None = None, process_count: int | None = None):
  """Checks `config` for `train_and_evaluate`; returns it with the stage's defaults filled in.

  Raises ConfigError (a ValueError) naming the field.
  """
  try:
    return _validate(config, num_devices, process_count)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _validate(config, num_devices, process_count):
  registry.check(config.get("stage", None), registry.LOOP_STAGES)
  config = with_defaults(config)
  stage = config.stage
  num_devices = len(sharding.config_devices(config)) if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices)))
  sharding.rules_from_config(config)  # config.logical_rules: known names, mesh axes
  _check_model_axes(config, stage, shape)
  batch_ways = shape["data"] * shape["fsdp"]
  micro = int(config.get("microbatches", 1))
  if micro < 1:
    raise ValueError(f"config.microbatches={micro} must be >= 1")
  if config.batch_size % (batch_ways * micro):
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the data axes "
                     f"(mesh data x fsdp = {batch_ways}) times config.microbatches={micro}")
  if config.batch_size % process_count:
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the "
                     f"{process_count} processes")
  for name in ("init_from", "teacher"):
    path = config.get(name, "")
    if path and not _is_weights_dir(path, stage):
      raise ValueError(f"config.{name}={path!r} holds no checkpoint")
  for name in ("num_steps", "log_every", "checkpoint_every"):
    if int(config.get(name, 1)) < 1:
      raise ValueError(f"config.{name}={config.get(name)} must be >= 1")
  if not 0.0 <= float(config.get("ema_decay", 0.0)) < 1.0:
    raise ValueError(f"config.ema_decay={config.ema_decay} must be in [0, 1)")
  vae_ckpt = config.get("vae", {}).get("checkpoint", "") if config.get("vae", None) else ""
  if vae_ckpt and not os.path.isdir(vae_ckpt):
    raise ValueError(f"config.vae.checkpoint={vae_ckpt!r} is not a directory (a `vae` stage workdir "
                     "or a diffusers AutoencoderKLWan folder)")
  return config


def _check_model_axes(config, stage: str, shape: dict) -> None:
  """Mesh axes the model cannot use: an error for the VAE stages (data parallel only: the VAE has
  no tensor or sequence sharding, its convolutions split the batch alone); a warning where the
  DiT's heads or a frame's tokens do not divide evenly (correct, padded, slower)."""
  if stage in VAE_STAGES:
    extra = {a: shape[a] for a in ("tensor", "sequence") if shape[a] > 1}
    if extra:
      raise ConfigError(f"config.mesh: {', '.join(f'{a}={n}' for a, n in extra.items())} is not supported by "
                        f"stage {stage!r}: the VAE stages are data parallel (set config.mesh.tensor and "
                        "config.mesh.sequence to 1; data and fsdp split the batch)")
    return
  model, data = config.get("model", None), config.get("data", None)
  if not model or not data or not data.get("height") or not data.get("width"):
    return
  heads, (_, ph, pw) = int(model.get("num_heads", 1)), tuple(model.get("patch_size", (1, 2, 2)))
  tokens = (int(data.height) // 8 // ph) * (int(data.width) // 8 // pw)
  if heads % shape["tensor"]:
    logging.warning("config.mesh.tensor=%d does not divide model.num_heads=%d: heads are padded "
                    "(correct, but some devices idle)", shape["tensor"], heads)
  if tokens % shape["sequence"]:
    logging.warning("config.mesh.sequence=%d does not divide the %d tokens of a latent frame: tokens are "
                    "padded (correct, but some devices idle)", shape["sequence"], tokens)
