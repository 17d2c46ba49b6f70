"""Wan2.1 DiT: diffusers `WanTransformer3DModel` (safetensors folder) <-> `CausalDiT` parameters.

Names map one to one once list indices are folded: `blocks.7.attn1.to_out.0.weight` is row 7 of
`blocks/attn1/to_out/kernel` (blocks are stacked by `nn.scan` along a leading layer axis),
`ffn.net.0.proj` is `ffn_net_0_proj`, `condition_embedder.time_embedder.linear_1` is
`condition_embedder/time_embedder_linear_1`. Linear weights are transposed (`[out, in]` ->
`[in, out]`), the patch embedding goes channels-last (`[dim, in, 1, 2, 2]` -> `[1, 2, 2, in, dim]`),
norm weights become `scale`.

The AAPT generator's input is `[noise | recycled | control]`, so the patch embedding is wider than
Wan's (16 channels of noise): on import, the source's input channels fill the first slots and the
new ones (recycled, control) are drawn at random (LeCun normal over the widened fan-in; not zero,
as the paper does for its new channels). The `ConversionReport` names every parameter that was
new, dropped or reshaped. Export writes our full width (`in_channels = 2 * 16 + control`), which
stock diffusers loads; PyTorch users feed it the same channel concatenation.

  config = wan_dit.config_from_diffusers(json.load(open(folder + "/config.json")))
  params, config, report = wan_dit.import_dit(folder, jax.random.key(0), control_channels=6)
  print(report)
  wan_dit.export_dit(params, config, "/tmp/exported_dit")

Sources: a `transformer` folder or a whole diffusers pipeline folder (`resolve_folder`); shards are
read through their index, other `*.safetensors` files ignored (`common.weight_files`). The
source's input channels are placed by name (`source_input_layout`): a Wan T2V model's are noise
only; our own export records its `[noise | recycled | control]` widths in `config.json`
(`apt2_input_channels`). Variants whose input or conditioning has no place here (I2V and FLF2V:
mask and image-latent channels plus CLIP image cross-attention; VACE and other model classes) are
refused with a ValueError that says why, never silently misplaced.
`import_for_config` is what `config.init_from=<Wan folder>` runs: it also checks that the
folder's architecture is the run's `config.model`.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Mapping, Optional

import jax
import numpy as np

from apt2_jax.convert import common
from apt2_jax.models import dit as dit_lib

# diffusers sub-names that are folded into one of our module names (applied in this order).
_RENAMES = (
    ("to_out.0.", "to_out."),
    ("ffn.net.0.proj.", "ffn_net_0_proj."),
    ("ffn.net.2.", "ffn_net_2."),
    ("time_embedder.linear_", "time_embedder_linear_"),
    ("text_embedder.linear_", "text_embedder_linear_"),
)
_PATCH_KERNEL = "patch_embedding/kernel"


def config_from_diffusers(cfg: Mapping[str, Any], control_channels: int = 0,
                          **overrides) -> dit_lib.DiTConfig:
  """`WanTransformer3DModel` config.json -> `DiTConfig` (AAPT input widths come from our side).

  Wan's `in_channels` (16 for T2V) describe its input only; ours is `2 * latent_channels +
  control_channels`, so the source width is not copied.
  """
  if not cfg.get("cross_attn_norm", True):
    raise ValueError("WanTransformer3DModel with cross_attn_norm=False is not supported")
  if cfg.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
    raise ValueError(f"qk_norm={cfg.get('qk_norm')!r} is not supported")
  heads = cfg.get("num_attention_heads", 40)
  head_dim = cfg.get("attention_head_dim", 128)
  fields = dict(
      latent_channels=cfg.get("out_channels") or cfg.get("in_channels", 16),
      control_channels=control_channels,
      dim=heads * head_dim,
      ffn_dim=cfg.get("ffn_dim", 13824),
      num_heads=heads,
      num_layers=cfg.get("num_layers", 40),
      text_dim=cfg.get("text_dim", 4096),
      freq_dim=cfg.get("freq_dim", 256),
      patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
      eps=cfg.get("eps", 1e-6),
  )
  fields.update(overrides)
  return dit_lib.DiTConfig(**fields)


def config_to_diffusers(config: dit_lib.DiTConfig) -> dict[str, Any]:
  """`DiTConfig` -> `WanTransformer3DModel` config.json (input: our full channel concatenation)."""
  return {
      "_class_name": "WanTransformer3DModel",
      "patch_size": list(config.patch_size),
      "num_attention_heads": config.num_heads,
      "attention_head_dim": config.head_dim,
      "in_channels": config.in_channels,
      "out_channels": config.latent_channels,
      "text_dim": config.text_dim,
      "freq_dim": config.freq_dim,
      "ffn_dim": config.ffn_dim,
      "num_layers": config.num_layers,
      "cross_attn_norm": True,
      "qk_norm": "rms_norm_across_heads",
      "eps": config.eps,
      "image_dim": None,
      "added_kv_proj_dim": None,
      "rope_max_seq_len": 1024,
      # Ours (diffusers ignores unknown keys): how the input channels are laid out.
      LAYOUT_KEY: {"noise": config.latent_channels,
                   "recycled": config.latent_channels if config.recycled_channels else 0,
                   "control": config.control_channels},
  }


LAYOUT_KEY = "apt2_input_channels"
CLASS_NAME = "WanTransformer3DModel"
_PARTS = ("noise", "recycled", "control")


def input_layout(config: dit_lib.DiTConfig) -> dict[str, tuple[int, int]]:
  """Our patch embedding's input channel ranges: noise, recycled (when present), control."""
  widths = {"noise": config.latent_channels,
            "recycled": config.latent_channels if config.recycled_channels else 0,
            "control": config.control_channels}
  return _ranges(widths)


def _ranges(widths: Mapping[str, int]) -> dict[str, tuple[int, int]]:
  out, start = {}, 0
  for part in _PARTS:
    width = int(widths.get(part, 0) or 0)
    if width:
      out[part] = (start, start + width)
      start += width
  return out


def source_input_layout(cfg: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
  """The input channel ranges of a diffusers transformer config; refuses what cannot be mapped.

  Wan2.1/2.2 text-to-video (`in_channels == out_channels`): noise only. Our export: the layout it
  records under `apt2_input_channels`. Raises ValueError, saying why, for any other model class
  and for variants with other inputs: image-to-video and first-last-frame (`image_dim`,
  `added_kv_proj_dim`: CLIP image tokens in the cross-attention; `in_channels` 36 = 16 noise +
  4 mask + 16 image latents) and any other `in_channels`.
  """
  name = cfg.get("_class_name", CLASS_NAME)
  if name != CLASS_NAME:
    raise ValueError(f"a diffusers {name} is not supported: only {CLASS_NAME} (Wan2.1 text-to-video) "
                     "maps onto this model")
  image = {k: cfg.get(k) for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len") if cfg.get(k)}
  if image:
    raise ValueError(
        f"this is an image-conditioned Wan transformer (I2V / FLF2V: {image}, in_channels="
        f"{cfg.get('in_channels')}): its input holds mask and image-latent channels after the noise and "
        "its cross-attention reads CLIP image embeddings, which this model has no place for (AAPT "
        "conditions on the first frame through the recycled channels). Start from a text-to-video "
        "checkpoint (e.g. Wan2.1-T2V-1.3B-Diffusers)")
  latent = int(cfg.get("out_channels") or cfg.get("in_channels", 16))
  in_channels = int(cfg.get("in_channels", 16))
  if LAYOUT_KEY in cfg:
    layout = _ranges(cfg[LAYOUT_KEY])
    width = max((b for _, b in layout.values()), default=0)
    if width != in_channels or layout.get("noise", (0, 0))[1] != latent:
      raise ValueError(f"config.json: {LAYOUT_KEY}={cfg[LAYOUT_KEY]} does not add up to in_channels="
                       f"{in_channels} with out_channels={latent}")
    return layout
  if in_channels != latent:
    raise ValueError(
        f"in_channels={in_channels} with out_channels={latent}: the input holds channels besides the "
        "noise (an image- or video-conditioned Wan variant?) whose meaning is unknown here, so they "
        "cannot be placed; start from a text-to-video checkpoint")
  return {"noise": (0, latent)}


def torch_name_to_ours(key: str, ndim: int) -> tuple[str, Optional[int]]:
  """`blocks.7.attn1.to_out.0.weight` (2-D) -> (`blocks/attn1/to_out/kernel`, 7).

  Returns the layer index for block parameters (None elsewhere). `ndim` tells a linear or conv
  `weight` (-> `kernel`) from a norm's (-> `scale`).
  """
  layer = None
  match = re.match(r"blocks\.(\d+)\.(.*)", key)
  if match:
    layer, key = int(match.group(1)), "blocks." + match.group(2)
  for old, new in _RENAMES:
    key = key.replace(old, new)
  parts = key.split(".")
  if parts[-1] == "weight":
    parts[-1] = "kernel" if ndim >= 2 else "scale"
  return "/".join(parts), layer


def our_name_to_torch(name: str, layer: Optional[int] = None) -> str:
  """Inverse of `torch_name_to_ours`."""
  key = name.replace("/", ".")
  if key.endswith(".kernel") or key.endswith(".scale"):
    key = key.rsplit(".", 1)[0] + ".weight"
  for old, new in _RENAMES:
    key = key.replace(new, old)
  if layer is not None:
    key = key.replace("blocks.", f"blocks.{layer}.", 1)
  return key


def _to_ours(value: np.ndarray, name: str) -> np.ndarray:
  return common.torch_to_flax_kernel(value) if name.endswith("kernel") else value


def _to_torch(value: np.ndarray, name: str) -> np.ndarray:
  return common.flax_to_torch_kernel(value) if name.endswith("kernel") else value


def state_dict_to_params(state: Mapping[str, np.ndarray], config: dit_lib.DiTConfig,
                         rng: jax.Array, source_layout: Optional[Mapping[str, tuple[int, int]]] = None
                         ) -> tuple[dict[str, Any], common.ConversionReport]:
  """diffusers tensors -> our parameter tree (numpy float32) and a `ConversionReport`.

  Parameters of ours that the source lacks are drawn with `rng` (the widened input channels
  of the patch embedding; the caption encoder when `caption_vocab_size > 0`). `source_layout`:
  the source's input channel ranges (`source_input_layout`); None = noise only (Wan T2V).
  """
  model = dit_lib.CausalDiT(config)
  shapes = common.flatten(jax.eval_shape(lambda: dit_lib.init_params(model, jax.random.key(0))))
  report = common.ConversionReport()
  layers: dict[str, dict[int, np.ndarray]] = {}
  flat: dict[str, np.ndarray] = {}
  for key, value in state.items():
    name, layer = torch_name_to_ours(key, value.ndim)
    if name not in shapes or (layer is not None and layer >= config.num_layers):
      report.dropped.append(key)
      continue
    value = _to_ours(np.asarray(value, np.float32), name)
    if layer is None:
      flat[name] = value
    else:
      layers.setdefault(name, {})[layer] = value
  for name, rows in layers.items():
    missing = sorted(set(range(config.num_layers)) - set(rows))
    if missing:
      raise ValueError(f"{name}: the source has no layers {missing} (model.num_layers="
                       f"{config.num_layers})")
    flat[name] = np.stack([rows[i] for i in range(config.num_layers)])

  rng_widen, rng_init = jax.random.split(rng)
  if _PATCH_KERNEL in flat:
    source = dict(source_layout) if source_layout else {"noise": (0, flat[_PATCH_KERNEL].shape[3])}
    target = input_layout(config)
    if source != target or flat[_PATCH_KERNEL].shape != shapes[_PATCH_KERNEL].shape:
      flat[_PATCH_KERNEL] = _map_patch_kernel(flat[_PATCH_KERNEL], shapes[_PATCH_KERNEL].shape,
                                              source, target, rng_widen, report)
  for name, value in flat.items():
    if value.shape != shapes[name].shape:
      raise ValueError(f"{name}: source shape {value.shape} (our layout) does not fit "
                       f"{shapes[name].shape}; wrong model config?")
  new = sorted(set(shapes) - set(flat))
  if new:  # e.g. the caption encoder: take a fresh initialisation of ours.
    fresh = common.flatten(dit_lib.init_params(model, rng_init))
    for name in new:
      flat[name] = np.asarray(fresh[name], np.float32)
    report.new.extend(new)
  return common.unflatten(flat), report


def _map_patch_kernel(kernel: np.ndarray, shape: tuple[int, ...], source: Mapping[str, tuple[int, int]],
                      target: Mapping[str, tuple[int, int]], rng: jax.Array,
                      report: common.ConversionReport) -> np.ndarray:
  """Source `[1, 2, 2, Cs, dim]` -> ours `[1, 2, 2, C, dim]`, input channels placed by name:
  a part both sides have at the same width (noise; recycled and control from our own export) is
  copied; ours alone are random (LeCun normal over our fan-in, not zero: the paper's choice for
  new channels); the source's alone are dropped. Every change goes into `report`."""
  if kernel.shape[:3] != tuple(shape[:3]) or kernel.shape[-1] != shape[-1]:
    raise ValueError(f"{_PATCH_KERNEL}: source {kernel.shape} does not fit {shape}")
  if max(b for _, b in source.values()) != kernel.shape[3]:
    raise ValueError(f"{_PATCH_KERNEL}: the source's input layout {dict(source)} does not match its "
                     f"{kernel.shape[3]} input channels")
  fan_in = int(np.prod(shape[:-1]))
  out = np.asarray(jax.random.normal(rng, tuple(shape), np.float32)) / np.float32(np.sqrt(fan_in))
  new_parts = []
  for part, (a, b) in target.items():
    src = source.get(part)
    if src is not None and src[1] - src[0] == b - a:
      out[..., a:b, :] = kernel[..., src[0]:src[1], :]
    else:
      new_parts.append((part, a, b))
  for part, (a, b) in source.items():
    tgt = target.get(part)
    if tgt is None or tgt[1] - tgt[0] != b - a:
      report.dropped.append(f"patch_embedding.weight[:, {a}:{b}] ({part} input channels)")
  report.reshaped[_PATCH_KERNEL] = (tuple(kernel.shape), tuple(shape))
  runs: list[list] = []  # contiguous runs of new channels
  for part, a, b in new_parts:
    if runs and runs[-1][1] == a:
      runs[-1][1] = b
      runs[-1][2].append(part)
    else:
      runs.append([a, b, [part]])
  for a, b, parts in runs:
    report.new.append(f"{_PATCH_KERNEL}[..., {a}:{b}, :] (new input channels: {', '.join(parts)})")
  return out


def params_to_state_dict(params: Mapping[str, Any],
                         config: dit_lib.DiTConfig) -> dict[str, np.ndarray]:
  """Our parameters -> diffusers tensors (float32 numpy, torch layouts, one entry per layer).

  The caption encoder (ours only) has no diffusers counterpart and is left out, with a warning.
  """
  state = {}
  skipped = []
  for name, value in common.flatten(params).items():
    value = np.asarray(value, np.float32)
    if name.startswith("caption_encoder/"):
      skipped.append(name)
    elif name.startswith("blocks/"):
      for layer in range(config.num_layers):
        state[our_name_to_torch(name, layer)] = _to_torch(value[layer], name)
    else:
      state[our_name_to_torch(name)] = _to_torch(value, name)
  if skipped:
    logging.warning("export: %d caption encoder parameters have no diffusers counterpart and were "
                    "not written", len(skipped))
  return state


def resolve_folder(path: str) -> str:
  """A `WanTransformer3DModel` folder: `path`, or its `transformer/` when `path` is a pipeline."""
  return common.pipeline_component(path, "transformer")


def is_diffusers_dit(path: str) -> bool:
  """Whether `path` is a diffusers transformer folder (or a pipeline folder holding one): a
  `config.json` naming a diffusers class, not a training workdir's config."""
  config_path = os.path.join(resolve_folder(path), common.CONFIG_NAME)
  if not os.path.isfile(config_path) or os.path.isdir(os.path.join(path, "checkpoints")):
    return False
  try:
    with open(config_path) as f:
      cfg = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(cfg, dict) and "_class_name" in cfg


def import_dit(folder: str, rng: jax.Array, config: Optional[dit_lib.DiTConfig] = None,
               control_channels: int = 0, **config_overrides):
  """Loads a diffusers `WanTransformer3DModel` folder.

  Args:
    folder: holds `config.json` and `*.safetensors` (shards through their index), or is a
      pipeline folder with `transformer/`.
    rng: draws the parameters the source lacks.
    config: our model config; None derives it from `config.json`, `control_channels` and
      `config_overrides` (e.g. `window=30`).
  Returns:
    (params, DiTConfig, ConversionReport).
  Raises ValueError for variants that cannot be mapped (`source_input_layout`).
  """
  folder = resolve_folder(folder)
  state, cfg = common.load_folder(folder)
  layout = source_input_layout(cfg)
  if config is None:
    config = config_from_diffusers(cfg, control_channels, **config_overrides)
  params, report = state_dict_to_params(state, config, rng, layout)
  return params, config, report


# The architecture fields a source must share with the run's model (the rest: input widths, window,
# dtypes, remat, the caption encoder, are ours to choose).
_ARCHITECTURE = ("latent_channels", "dim", "ffn_dim", "num_heads", "num_layers", "text_dim", "freq_dim",
                 "patch_size")


def import_for_config(folder: str, config: dit_lib.DiTConfig, rng: jax.Array):
  """`import_dit` into the run's model `config`, after checking that the folder's architecture is
  that model's (ValueError naming every differing `config.model` field otherwise).

  Returns (params numpy float32 with `config`'s shapes, ConversionReport).
  """
  folder = resolve_folder(folder)
  with open(os.path.join(folder, common.CONFIG_NAME)) as f:
    cfg = json.load(f)
  layout = source_input_layout(cfg)  # refuses unmappable variants before reading any weights
  source = config_from_diffusers(cfg)
  diff = [f"model.{k}={getattr(config, k)!r} but the folder has {getattr(source, k)!r}"
          for k in _ARCHITECTURE if tuple(np.atleast_1d(getattr(config, k))) != tuple(np.atleast_1d(getattr(source, k)))]
  if diff:
    raise ValueError(f"{folder}: the Wan transformer's architecture differs from config.model: "
                     + "; ".join(diff) + " (e.g. the `wan_1_3b` size is Wan2.1-T2V-1.3B)")
  state, _ = common.load_folder(folder)
  return state_dict_to_params(state, config, rng, layout)


def export_dit(params: Mapping[str, Any], config: dit_lib.DiTConfig, folder: str) -> None:
  """Writes our generator as a diffusers `WanTransformer3DModel` folder (safetensors + config)."""
  common.save_folder(folder, params_to_state_dict(params, config), config_to_diffusers(config))
