"""The export bundle's file format: parameters (safetensors), configs (JSON), serialised steps.

Layout of a bundle directory (never pickle):
  bundle.json            `FORMAT`, `model` (DiTConfig fields), `vae` (VAEConfig fields), control_type,
                         control_encoding, control_dim, height, width, batch, latent_hw, text (dtype,
                         shape), sampler (num_steps, shift, guidance, recycle, cache_from), the stored
                         parameter dtype, the files below, jax version and platforms
  generator.safetensors  generator parameters, '/'-joined keys (float32, or bfloat16)
  vae.safetensors        VAE variables ('params/...': encoder for the first frame, decoder for the stream)
  start.jaxexport        (params, vae_params, image uint8 [B, H, W, 3], seed) -> (frame0, state, decode cache)
  text.jaxexport         (params, prompt [B, T]) -> text K/V
  dit_step.jaxexport     (params, state, text_kv, controls [B, 4, D]) -> (latent, state)
  decode.jaxexport       (vae_params, decode cache, latent) -> (uint8 [B, 4, H, W, 3], decode cache)

`apt2_jax.export` writes bundles; `generation.loading.load` reads one into the live model code and
`apt2_jax.export.ExportedStreamer` runs the serialised steps without it. This module needs only
numpy and safetensors.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

FORMAT = "apt2_jax.bundle/2"   # /2: dit_step takes raw controls [B, 4, D] (encoded inside the step)
FUNCTIONS = ("start", "text", "dit_step", "decode")
META = "bundle.json"


def is_bundle(path: str) -> bool:
  return os.path.isfile(os.path.join(os.fspath(path), META))


def flatten(tree, prefix: str = "") -> dict[str, Any]:
  """Nested dicts -> {'a/b/c': array}."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "/"))
    else:
      out[key] = v
  return out


def unflatten(flat: dict[str, Any]) -> dict:
  """{'a/b/c': array} -> nested dicts."""
  tree: dict = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def save_arrays(path: str, flat: dict[str, Any]) -> None:
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()}, path)
  os.chmod(path, 0o644)


def load_arrays(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  return load_file(path)


def write_meta(directory: str, meta: dict) -> None:
  path = os.path.join(directory, META)
  with open(path, "w") as f:
    json.dump(meta, f, indent=2)
  os.chmod(path, 0o644)


def read_meta(directory: str) -> dict:
  path = os.path.join(os.fspath(directory), META)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} is not an inference bundle (no {META})")
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: unreadable bundle metadata ({e})") from None
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r} (re-export the "
                     "checkpoint with this version's `python -m apt2_jax.export`)")
  return meta


def read_arrays(directory: str, meta: dict):
  """(generator params (nested, as stored), VAE variables {'params': ...})."""
  params = unflatten(load_arrays(os.path.join(directory, meta["files"]["generator"])))
  vae_params = unflatten(load_arrays(os.path.join(directory, meta["files"]["vae"])))
  return params, vae_params
