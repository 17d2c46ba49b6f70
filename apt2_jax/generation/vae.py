"""The one VAE loader and the one VAE-config codec.

  vae_config_from_block(block)  a `config.vae`-style block (a named `size` plus any `VAEConfig`
                                field) -> VAEConfig; other keys (`checkpoint`) are not VAE fields
  vae_config_to_dict / vae_config_from_dict   VAEConfig <-> JSON-able dict (exact round trip)
  load_vae(path, decoder=None, **overrides)   (VAE, {"params": ...}) from a `vae` / `vae_distill`
                                stage workdir or a diffusers AutoencoderKLWan folder; `decoder`: a
                                `vae_distill` workdir (e.g. the light decoder) whose decoder side
                                replaces the VAE's (the streaming decode's; the encoder stays)

A VAE stage workdir holds the shared checkpoint layout (`checkpointing`): the state's `params`
(the whole VAE: encoder, decoder, quant convs) and `latent_stats` ({"mean", "std"}: float32
[z_dim], the per-channel statistics of the encoder's posterior means that `normalize_latents`
uses), and the run's config, whose `vae` block rebuilds the VAEConfig.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from apt2_jax import checkpointing
from apt2_jax.models import vae as vae_lib

VAE_STAGES = ("vae", "vae_distill")
# What a distilled decoder brings: its parameters and its config fields (the rest is the encoder's).
DECODER_PARAMS = ("post_quant_conv", "decoder")
DECODER_FIELDS = ("decoder_type", "light_dims", "light_blocks", "decoder_base_dim",
                  "decoder_dim_mult", "decoder_num_res_blocks")
_FIELDS = tuple(f.name for f in dataclasses.fields(vae_lib.VAEConfig))


def _tuples(d: dict) -> dict:
  """JSON and ConfigDicts give lists; VAEConfig's sequence fields are tuples (hashable, comparable)."""
  return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in d.items()}


def vae_config_from_block(block) -> vae_lib.VAEConfig:
  """`VAEConfig` from a `config.vae`-style block: `size` (default "tiny") plus VAEConfig fields.

  Keys that are not VAEConfig fields (a DiT stage's `checkpoint`) are ignored.
  """
  block = dict(block.to_dict() if hasattr(block, "to_dict") else block or {})
  size = block.pop("size", "tiny")
  return vae_lib.vae_config(size, **_tuples({k: v for k, v in block.items() if k in _FIELDS}))


def vae_config_to_dict(cfg: vae_lib.VAEConfig) -> dict:
  """Every VAEConfig field, JSON-able (`dtype` by name)."""
  d = dataclasses.asdict(cfg)
  d["dtype"] = jnp.dtype(cfg.dtype).name
  return d


def vae_config_from_dict(d) -> vae_lib.VAEConfig:
  """Inverse of `vae_config_to_dict`; raises ValueError naming unknown fields."""
  d = dict(d)
  unknown = sorted(set(d) - set(_FIELDS))
  if unknown:
    raise ValueError(f"unknown VAE config field(s) {unknown}; known fields: {sorted(_FIELDS)}")
  d = _tuples(d)
  if "dtype" in d:  # the scalar type (jnp.float32), as VAEConfig's default, so configs compare equal
    d["dtype"] = getattr(jnp, jnp.dtype(d["dtype"]).name)
  return vae_lib.VAEConfig(**d)


# (checkpoints directory or folder, step, its mtime, overrides) -> (VAEConfig, host params): a
# pipeline loads the same frozen VAE in every stage and in the evaluation.
_LOADED: dict = {}


def _from_workdir(path: str, overrides: dict):
  directory, newest = checkpointing.resolve(path)
  key = (os.path.abspath(path), newest, os.path.getmtime(os.path.join(directory, str(newest))),
         tuple(sorted(overrides.items())))
  if key not in _LOADED:
    config = checkpointing.load_config(path)  # the stage, before reading any array
    if config.get("stage", None) not in VAE_STAGES:
      raise ValueError(f"{path} is a {config.get('stage', None)!r} workdir, not a VAE stage's "
                       f"({' or '.join(VAE_STAGES)})")
    # params, statistics and config of one step: the newest intact one (checkpointing.newest_intact)
    entries, config, _ = checkpointing.load_entries(path, ("params", "latent_stats"))
    params, stats = entries["params"], entries["latent_stats"]
    cfg = dataclasses.replace(
        vae_config_from_block(config.vae),
        latents_mean=tuple(float(x) for x in np.asarray(stats["mean"])),
        latents_std=tuple(float(x) for x in np.asarray(stats["std"])), **overrides)
    _LOADED[key] = (cfg, {"params": params})
  return _LOADED[key]


def _from_diffusers(path: str, overrides: dict):
  key = (os.path.abspath(path), None, os.path.getmtime(path), tuple(sorted(overrides.items())))
  if key not in _LOADED:
    from apt2_jax.convert import wan_vae  # on demand: only diffusers folders need the converter
    params, cfg, _ = wan_vae.import_vae(path, **overrides)
    _LOADED[key] = (cfg, jax.tree.map(np.asarray, params))
  return _LOADED[key]


def _with_decoder(cfg, params, decoder: str, path: str):
  """The VAE at `path` with the decoder side (parameters and config fields) of the `vae_distill`
  workdir `decoder`. Raises ValueError unless that decoder was distilled behind this very encoder
  (same encoder parameters, same latent statistics): another latent space would decode to noise."""
  if not checkpointing.has_checkpoint(decoder):
    raise FileNotFoundError(f"decoder {decoder!r} is not a VAE stage workdir "
                            "(checkpoints/<step>/state), e.g. a `vae_distill` light decoder run")
  dcfg, dparams = _from_workdir(decoder, {})
  encoder = lambda p: {k: v for k, v in p["params"].items() if k not in DECODER_PARAMS}
  mine, theirs = encoder(params), encoder(dparams)
  same = (jax.tree.structure(mine) == jax.tree.structure(theirs)
          and all(np.shape(a) == np.shape(b) and np.array_equal(np.asarray(a), np.asarray(b))
                  for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs))))
  stats = lambda c: np.asarray([c.latents_mean or (0.0,) * c.z_dim,
                                c.latents_std or (1.0,) * c.z_dim], np.float64)
  if not same or cfg.z_dim != dcfg.z_dim or not np.allclose(stats(cfg), stats(dcfg), rtol=1e-6):
    raise ValueError(f"decoder {decoder!r} was not distilled behind the VAE {path!r} (its encoder "
                     "parameters or latent statistics differ); distil it with config.teacher="
                     f"{path!r}, or pass {decoder!r} as the VAE itself")
  cfg = dataclasses.replace(cfg, **{f: getattr(dcfg, f) for f in DECODER_FIELDS})
  return cfg, {"params": {**params["params"], **{k: dparams["params"][k] for k in DECODER_PARAMS}}}


def load_vae(path: str, decoder: str | None = None, **overrides):
  """(VAE module, variables `{"params": ...}` as fresh jax arrays) from `path`.

  `path`: a `vae` / `vae_distill` workdir (its latest checkpoint: params, latent statistics,
  config), a checkpoint step directory, or a diffusers `AutoencoderKLWan` folder. `decoder`: a
  `vae_distill` workdir (e.g. `experiments/vae.py:light_decoder`) distilled behind this VAE's encoder,
  whose decoder replaces the VAE's (a `vae_distill` workdir alone is a whole VAE too: its encoder
  is its teacher's). `overrides`: VAEConfig fields to replace (e.g. `remat=True`). Loads are
  cached per checkpoint step as host copies; every call returns new device arrays.
  """
  if checkpointing.has_checkpoint(path):
    cfg, params = _from_workdir(path, overrides)
  elif (os.path.isfile(os.path.join(path, "config.json"))
        and not os.path.isdir(os.path.join(path, "checkpoints"))):  # a workdir writes config.json too
    cfg, params = _from_diffusers(path, overrides)
  else:
    raise FileNotFoundError(f"{path!r} is neither a VAE stage workdir (checkpoints/<step>/state) nor "
                            "a diffusers AutoencoderKLWan folder (config.json + safetensors)")
  if decoder:
    cfg, params = _with_decoder(cfg, params, decoder, path)
    if overrides:
      cfg = dataclasses.replace(cfg, **overrides)
  return vae_lib.VAE(cfg), jax.tree.map(jnp.asarray, params)
