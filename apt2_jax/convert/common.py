"""Shared pieces of the diffusers <-> apt2-jax weight conversion: safetensors folders, reports."""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
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


INDEX_SUFFIX = ".safetensors.index.json"


def weight_files(folder: str) -> list[str]:
  """The safetensors files that hold a diffusers folder's weights.

  With an index (`*.safetensors.index.json`, sharded checkpoints) exactly the shards its
  `weight_map` names; other `*.safetensors` files in the folder (a stray copy, an fp16 variant)
  are ignored and listed in the log. Without one, `diffusion_pytorch_model.safetensors` when
  present (again ignoring the rest), else the folder's only `*.safetensors` file.
  Raises FileNotFoundError when there is none, a shard the index names is missing, or several
  unindexed files leave it ambiguous.
  """
  present = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.safetensors")))
  indexes = sorted(glob.glob(os.path.join(folder, "*" + INDEX_SUFFIX)))
  if indexes:
    # diffusers' own index first (`diffusion_pytorch_model.safetensors.index.json`; a text encoder
    # has `model.safetensors.index.json`), any other only when it is the one there.
    own = [p for p in indexes if os.path.basename(p) == WEIGHTS_NAME + ".index.json"]
    if not own and len(indexes) > 1:
      raise FileNotFoundError(f"{folder!r} holds several safetensors indexes "
                              f"{[os.path.basename(p) for p in indexes]}; keep one")
    index = (own or indexes)[0]
    with open(index) as f:
      weight_map = json.load(f).get("weight_map", {})
    chosen = sorted(set(weight_map.values()))
    missing = [name for name in chosen if name not in present]
    if missing or not chosen:
      raise FileNotFoundError(f"{index}: shards {missing or '(none)'} named by the index are not in "
                              f"{folder!r}")
  elif WEIGHTS_NAME in present:
    chosen = [WEIGHTS_NAME]
  elif len(present) == 1:
    chosen = present
  elif not present:
    raise FileNotFoundError(f"no *.safetensors file in {folder!r}")
  else:
    raise FileNotFoundError(f"{folder!r} holds several *.safetensors files {present} and no "
                            f"{WEIGHTS_NAME} or *{INDEX_SUFFIX} telling which are the weights")
  ignored = sorted(set(present) - set(chosen))
  if ignored:
    logging.warning("%s: ignoring %s (not among the weights %s)", folder, ignored, chosen)
  return [os.path.join(folder, name) for name in chosen]


def load_folder(folder: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Reads the weights (`weight_files`: shards through their index) and `config.json` of a
  diffusers folder.

  Tensors come back as float32 numpy arrays (bfloat16 and float16 files are widened).
  """
  state = {}
  for path in weight_files(folder):
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


def pipeline_component(path: str, component: str) -> str:
  """`path` itself, or its `component` subfolder when `path` is a diffusers pipeline folder
  (`model_index.json` beside `transformer/`, `vae/`, `text_encoder/`, `tokenizer/`)."""
  sub = os.path.join(path, component)
  if os.path.isfile(os.path.join(path, "model_index.json")) and os.path.isdir(sub):
    return sub
  return path


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
