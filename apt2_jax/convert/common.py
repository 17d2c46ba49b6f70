"""Shared pieces of the diffusers <-> apt2-jax weight conversion: safetensors folders, reports."""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"


@dataclasses.dataclass
class ConversionReport:
  """What an import did, parameter by parameter (names in our '/'-joined layout).

  Attributes:
    new: our parameters absent from the source, randomly initialised (e.g. widened channels).
    dropped: source tensors that have no place in our tree (diffusers names).
    reshaped: our parameters whose shape differs from the source, `name -> (source, ours)`.
  """
  new: list[str] = dataclasses.field(default_factory=list)
  dropped: list[str] = dataclasses.field(default_factory=list)
  reshaped: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = dataclasses.field(
      default_factory=dict)

  def __str__(self) -> str:
    lines = [f"new ({len(self.new)}): " + ", ".join(self.new),
             f"dropped ({len(self.dropped)}): " + ", ".join(self.dropped),
             f"reshaped ({len(self.reshaped)}): " + ", ".join(
                 f"{k} {a}->{b}" for k, a, b in
                 ((k, *v) for k, v in sorted(self.reshaped.items())))]
    return "\n".join(lines)


def load_folder(folder: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Reads every `*.safetensors` file (shards included) and `config.json` of a diffusers folder.

  Tensors come back as float32 numpy arrays (bfloat16 and float16 files are widened).
  """
  files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"no *.safetensors file in {folder!r}")
  state = {}
  for path in files:
    # The flax reader understands bfloat16 (numpy alone does not).
    with safe_open(path, framework="flax") as f:
      for key in f.keys():
        state[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
  config = {}
  config_path = os.path.join(folder, CONFIG_NAME)
  if os.path.exists(config_path):
    with open(config_path) as f:
      config = json.load(f)
  return state, config


def save_folder(folder: str, state: Mapping[str, np.ndarray], config: Mapping[str, Any]):
  """Writes a diffusers folder: `diffusion_pytorch_model.safetensors` and `config.json`."""
  os.makedirs(folder, exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
            os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
  with open(os.path.join(folder, CONFIG_NAME), "w") as f:
    json.dump(dict(config), f, indent=2, sort_keys=True)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """`{'a': {'b': x}}` -> `{'a/b': x}`."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      out.update(flatten(value, name))
    else:
      out[name] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """`{'a/b': x}` -> `{'a': {'b': x}}`."""
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def torch_to_flax_kernel(w: np.ndarray) -> np.ndarray:
  """Torch conv/linear weight `[out, in, *window]` -> channels-last `[*window, in, out]`."""
  return np.transpose(w, tuple(range(2, w.ndim)) + (1, 0))


def flax_to_torch_kernel(k: np.ndarray) -> np.ndarray:
  """Inverse of `torch_to_flax_kernel`."""
  n = k.ndim
  return np.transpose(k, (n - 1, n - 2) + tuple(range(n - 2)))
