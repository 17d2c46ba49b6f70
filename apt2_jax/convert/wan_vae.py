"""Wan2.1 VAE: diffusers `AutoencoderKLWan` (safetensors folder) <-> `apt2_jax.models.vae.VAE`.

Names map one to one: `encoder.down_blocks.3.conv1.weight` <-> `encoder/down_blocks_3/conv1/kernel`
(list indices join their parent with `_`; `resample.1` (the conv after nn.Upsample / ZeroPad2d)
is our `resample`; `gamma` is our `scale`). Convolution weights are transposed to channels-last
(`[out, in, kt, kh, kw]` -> `[kt, kh, kw, in, out]`); RMS-norm gammas lose their broadcast axes.

  params, config, report = import_vae("/path/to/Wan2.1-T2V-1.3B-Diffusers/vae")
  export_vae(params, config, "/tmp/exported_vae")   # loads with AutoencoderKLWan.from_pretrained
"""
from __future__ import annotations

import logging
import re
from typing import Any, Mapping

import jax
import numpy as np

from apt2_jax.convert import common
from apt2_jax.models import vae as vae_lib



def config_from_diffusers(cfg: Mapping[str, Any], **overrides) -> vae_lib.VAEConfig:
  """`AutoencoderKLWan` config.json -> `VAEConfig` (unknown or absent keys take Wan defaults)."""
  # Wan2.2's residual up/down blocks, patchified input and attention at other scales are not
  # implemented.
  unsupported = {"is_residual": bool(cfg.get("is_residual")),
                 "patch_size": cfg.get("patch_size") is not None,
                 "attn_scales": bool(cfg.get("attn_scales")),
                 "in_channels": cfg.get("in_channels", 3) != 3,
                 "out_channels": cfg.get("out_channels", 3) != 3}
  for key, bad in unsupported.items():
    if bad:
      raise ValueError(f"AutoencoderKLWan config {key}={cfg[key]!r} is not supported")
  wan = vae_lib.vae_config("wan")
  fields = dict(
      base_dim=cfg.get("base_dim", wan.base_dim),
      decoder_base_dim=cfg.get("decoder_base_dim"),
      z_dim=cfg.get("z_dim", wan.z_dim),
      dim_mult=tuple(cfg.get("dim_mult", wan.dim_mult)),
      num_res_blocks=cfg.get("num_res_blocks", wan.num_res_blocks),
      temperal_downsample=tuple(cfg.get("temperal_downsample", wan.temperal_downsample)),
      latents_mean=tuple(cfg.get("latents_mean", wan.latents_mean)),
      latents_std=tuple(cfg.get("latents_std", wan.latents_std)),
      # Our extension (the slim decoder); absent from stock diffusers configs.
      decoder_dim_mult=cfg.get("decoder_dim_mult"),
      decoder_num_res_blocks=cfg.get("decoder_num_res_blocks"),
  )
  if fields["decoder_dim_mult"] is not None:
    fields["decoder_dim_mult"] = tuple(fields["decoder_dim_mult"])
  fields.update(overrides)
  return vae_lib.VAEConfig(**fields)


def config_to_diffusers(config: vae_lib.VAEConfig) -> dict[str, Any]:
  """`VAEConfig` -> `AutoencoderKLWan` config.json (slim decoder keys only when non-standard)."""
  out = {
      "_class_name": "AutoencoderKLWan",
      "base_dim": config.base_dim,
      "decoder_base_dim": config.decoder_base_dim,
      "z_dim": config.z_dim,
      "dim_mult": list(config.dim_mult),
      "num_res_blocks": config.num_res_blocks,
      "attn_scales": [],
      "temperal_downsample": list(config.temperal_downsample),
      "dropout": config.dropout,
      "latents_mean": list(config.latents_mean or (0.0,) * config.z_dim),
      "latents_std": list(config.latents_std or (1.0,) * config.z_dim),
  }
  if config.dec_dim_mult != config.dim_mult or config.dec_num_res_blocks != config.num_res_blocks:
    logging.warning("VAE decoder sizes differ from the encoder's: stock AutoencoderKLWan cannot "
                    "load this folder; the weights keep diffusers' names.")
    out["decoder_dim_mult"] = list(config.dec_dim_mult)
    out["decoder_num_res_blocks"] = config.dec_num_res_blocks
  return out


def torch_name_to_ours(key: str) -> tuple[str, str]:
  """`decoder.up_blocks.0.upsamplers.0.resample.1.weight` -> (`decoder/up_blocks_0/upsamplers_0/
  resample/kernel`, kind) with kind one of `kernel`, `bias`, `scale`."""
  key = key.replace("resample.1.", "resample.")
  parts: list[str] = []
  for token in key.split("."):
    if token.isdigit():
      parts[-1] = f"{parts[-1]}_{token}"
    else:
      parts.append(token)
  leaf = {"weight": "kernel", "gamma": "scale", "bias": "bias"}[parts[-1]]
  return "/".join(parts[:-1] + [leaf]), leaf


def our_name_to_torch(name: str) -> str:
  """Inverse of `torch_name_to_ours`."""
  parts = []
  for token in name.split("/"):
    match = re.fullmatch(r"(.+)_(\d+)", token)
    if match:
      parts.extend(match.groups())
    else:
      parts.append(token)
  parts[-1] = {"kernel": "weight", "scale": "gamma", "bias": "bias"}[parts[-1]]
  key = ".".join(parts)
  return key.replace("resample.", "resample.1.")


def state_dict_to_params(state: Mapping[str, np.ndarray], config: vae_lib.VAEConfig,
                         strict: bool = True):
  """diffusers tensors -> our `{'params': ...}` (numpy float32) and a `ConversionReport`."""
  model = vae_lib.VAE(config)
  shapes = common.flatten(jax.eval_shape(
      lambda: vae_lib.init_params(model, jax.random.key(0), 16, 16))["params"])
  report = common.ConversionReport()
  flat = {}
  for key, value in state.items():
    name, kind = torch_name_to_ours(key)
    if name not in shapes:
      report.dropped.append(key)
      continue
    if kind == "kernel":
      value = common.torch_to_flax_kernel(value)
    elif kind == "scale":
      value = value.reshape(-1)
    if value.shape != shapes[name].shape:
      raise ValueError(f"{key}: shape {value.shape} (channels-last) does not fit {name} "
                       f"{shapes[name].shape}; wrong VAE config?")
    flat[name] = np.asarray(value, np.float32)
  report.new = sorted(set(shapes) - set(flat))
  if strict and (report.new or report.dropped):
    raise ValueError(f"VAE weights do not match the config:\n{report}")
  return {"params": common.unflatten(flat)}, report


def params_to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our `{'params': ...}` -> diffusers tensors (float32 numpy, torch layouts)."""
  state = {}
  for name, value in common.flatten(params["params"]).items():
    value = np.asarray(value, np.float32)
    leaf = name.rsplit("/", 1)[-1]
    if leaf == "kernel":
      value = common.flax_to_torch_kernel(value)
    elif leaf == "scale":
      # WanRMS_norm keeps gamma broadcastable: [C, 1, 1] over images, [C, 1, 1, 1] over videos.
      value = value.reshape((-1, 1, 1) if "/attentions_" in name else (-1, 1, 1, 1))
    state[our_name_to_torch(name)] = value
  return state


def import_vae(folder: str, strict: bool = True, **config_overrides):
  """Loads a diffusers `AutoencoderKLWan` folder -> (params, VAEConfig, ConversionReport)."""
  state, cfg = common.load_folder(folder)
  config = config_from_diffusers(cfg, **config_overrides)
  params, report = state_dict_to_params(state, config, strict)
  return params, config, report


def export_vae(params: Mapping[str, Any], config: vae_lib.VAEConfig, folder: str) -> None:
  """Writes our VAE as a diffusers `AutoencoderKLWan` folder (safetensors + config.json)."""
  common.save_folder(folder, params_to_state_dict(params), config_to_diffusers(config))
