"""Inference bundle: parameters (safetensors), configs (JSON) and the serialised stream steps.

    python -m apt2_jax.export --checkpoint=DIR --out=BUNDLE [--bf16] [--height=64 --width=64]

Bundle layout (never pickle):
  bundle.json            format version, `model` (DiTConfig fields), `vae` (VAEConfig fields),
                         control_type, height, width, batch, text (kind, shape), param dtype,
                         the files below, jax version and platforms
  generator.safetensors  EMA generator parameters, '/'-joined keys (float32, or bfloat16 with --bf16)
  vae.safetensors        VAE parameters (encoder for the first frame, decoder for the stream)
  start.jaxexport        (params, vae_params, image uint8 [B, H, W, 3], seed) -> (frame0, state, decode cache)
  text.jaxexport         (params, tokens [B, T]) -> text K/V
  dit_step.jaxexport     (params, state, text_kv, control [B, 1, h, w, Cc]) -> (latent, state)
  decode.jaxexport       (vae_params, decode cache, latent) -> (uint8 [B, 4, H, W, 3], decode cache)

The serialised functions take the flat '/'-keyed parameter dicts exactly as stored, so
`ExportedStreamer` (`load_bundle`) runs a stream with jax, numpy and safetensors only: it imports
no model code (`apt2_jax.models`, flax). `StreamingGenerator.from_bundle` reads the same bundle
into the live model (any resolution).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "apt2_jax.bundle/1"
FUNCTIONS = ("start", "text", "dit_step", "decode")


# ------------------------------------------------------------------------------------------------
# Arrays: flat '/'-keyed dicts in safetensors
# ------------------------------------------------------------------------------------------------


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


def load_arrays(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  return load_file(path)


def read_meta(directory: str) -> dict:
  path = os.path.join(directory, "bundle.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} is not an inference bundle (no bundle.json)")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
  return meta


def read_bundle_arrays(directory: str):
  """(meta, generator params (nested, as stored), VAE variables {'params': ...})."""
  meta = read_meta(directory)
  params = unflatten(load_arrays(os.path.join(directory, meta["files"]["generator"])))
  vae_params = unflatten(load_arrays(os.path.join(directory, meta["files"]["vae"])))
  return meta, params, vae_params


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------


def _bundle_functions(gen):
  """The stream's pure functions over flat '/'-keyed parameter dicts (as stored)."""
  from apt2_jax.inference import streaming
  from apt2_jax.models import CausalDiT
  from apt2_jax.models import vae as vae_lib
  model, vae = CausalDiT(gen.dit_config), vae_lib.VAE(gen.vae_config)
  live_dtype = jnp.dtype(gen.dit_config.param_dtype)

  def dit(flat):  # stored (possibly bf16) -> the model's parameter dtype
    return unflatten({k: v.astype(live_dtype) for k, v in flat.items()})

  def start(params, vae_params, image, seed):
    return streaming.start_fn(model, vae, None, unflatten(vae_params), image, seed)

  def text(params, tokens):
    return streaming.text_fn(model, dit(params), tokens)

  def dit_step(params, state, text_kv, control):
    return streaming.dit_step_fn(model, gen.options, dit(params), state, text_kv, control)

  def decode(vae_params, decode_cache, latent):
    return streaming.decode_fn(vae, unflatten(vae_params), decode_cache, latent)
  return {"start": start, "text": text, "dit_step": dit_step, "decode": decode}


def export_bundle(gen, out_dir: str, *, bf16: bool = False, serialize: bool = True,
                  text_example=None, platforms: Optional[tuple[str, ...]] = None) -> str:
  """Writes `gen`'s parameters, configs and (with `serialize`) its jax.export-ed stream steps.

  Args:
    gen: a `StreamingGenerator` (its batch, resolution and control type fix the exported shapes).
    bf16: store the generator's parameters in bfloat16 (the exported steps cast them back).
    text_example: a prompt of the shape users will give (default: a caption's tokens).
    platforms: lowering platforms for jax.export (default: the current backend).
  """
  from apt2_jax.inference import streaming
  os.makedirs(out_dir, exist_ok=True)
  store_dtype = jnp.bfloat16 if bf16 else jnp.dtype(gen.dit_config.param_dtype)
  params = {k: np.asarray(jnp.asarray(v, store_dtype)) for k, v in flatten(gen.params).items()}
  vae_params = {k: np.asarray(v) for k, v in flatten(gen.vae_params).items()}
  save_arrays(os.path.join(out_dir, "generator.safetensors"), params)
  save_arrays(os.path.join(out_dir, "vae.safetensors"), vae_params)
  text = gen._prepare_text(text_example)
  meta = {
      "format": FORMAT,
      "model": streaming.dit_config_to_dict(gen.dit_config),
      "vae": streaming.vae_config_to_dict(gen.vae_config),
      "control_type": gen.control_type,
      "height": gen.height, "width": gen.width, "batch": gen.batch,
      "latent_hw": list(gen.latent_hw),
      "text": {"dtype": str(text.dtype), "shape": list(text.shape)},
      "stored_param_dtype": jnp.dtype(store_dtype).name,
      "files": {"generator": "generator.safetensors", "vae": "vae.safetensors"},
      "jax_version": jax.__version__,
  }
  if serialize:
    fns = _bundle_functions(gen)
    spec = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
    image = jax.ShapeDtypeStruct((gen.batch, gen.height, gen.width, 3), jnp.uint8)
    seed = jax.ShapeDtypeStruct((), jnp.int32)
    p, vp = spec(params), spec(vae_params)
    _, state, dcache = jax.eval_shape(fns["start"], p, vp, image, seed)
    text_kv = jax.eval_shape(fns["text"], p, spec(text))
    c = gen.dit_config.control_channels
    control = (jax.ShapeDtypeStruct((gen.batch, 1) + tuple(gen.latent_hw) + (c,), jnp.float32)
               if c else None)
    latent, _ = jax.eval_shape(fns["dit_step"], p, state, text_kv, control)
    args = {"start": (p, vp, image, seed), "text": (p, spec(text)),
            "dit_step": (p, state, text_kv, control), "decode": (vp, dcache, latent)}
    kw = {} if platforms is None else {"platforms": tuple(platforms)}
    for name in FUNCTIONS:
      exported = jax.export.export(jax.jit(fns[name]), **kw)(*args[name])
      with open(os.path.join(out_dir, f"{name}.jaxexport"), "wb") as f:
        f.write(exported.serialize())
      meta["files"][name] = f"{name}.jaxexport"
    meta["platforms"] = list(exported.platforms)
  with open(os.path.join(out_dir, "bundle.json"), "w") as f:
    json.dump(meta, f, indent=2)
  return out_dir


# ------------------------------------------------------------------------------------------------
# Loader (no model code)
# ------------------------------------------------------------------------------------------------


class ExportedStreamer:
  """Runs a bundle's serialised stream steps; the same calls as `StreamingGenerator`.

  `start(image uint8 [B, H, W, 3], text, seed) -> uint8 [B, 1, H, W, 3]`, `set_text(text)`,
  `step(control) -> uint8 [B, 4, H, W, 3]`. Text: tokens (or a caption string, tokenised with
  `apt2_jax.data.captions`); control: a user control (`apt2_jax.inference.controls`) or the
  model's control input [B, 1, h, w, Cc] as an array.
  """

  def __init__(self, directory: str):
    self.meta = meta = read_meta(directory)
    missing = [n for n in FUNCTIONS if n not in meta["files"]]
    if missing:
      raise ValueError(f"{directory}: exported without serialised steps ({missing}); "
                       f"re-export without --noserialize")
    self.params = {k: jnp.asarray(v) for k, v in
                   load_arrays(os.path.join(directory, meta["files"]["generator"])).items()}
    self.vae_params = {k: jnp.asarray(v) for k, v in
                       load_arrays(os.path.join(directory, meta["files"]["vae"])).items()}
    self.exported = {}
    for name in FUNCTIONS:
      with open(os.path.join(directory, meta["files"][name]), "rb") as f:
        self.exported[name] = jax.export.deserialize(bytearray(f.read()))
    self._start = jax.jit(self.exported["start"].call)
    self._text = jax.jit(self.exported["text"].call)
    self._dit_step = jax.jit(self.exported["dit_step"].call, donate_argnums=(1,))
    self._decode = jax.jit(self.exported["decode"].call, donate_argnums=(1,))
    self.control_type = meta["control_type"]
    self.height, self.width, self.batch = meta["height"], meta["width"], meta["batch"]
    self.latent_hw = tuple(meta["latent_hw"])
    self._state = self._dcache = self._text_kv = None
    self._last_control = None

  def start(self, image, text=None, seed: int = 0) -> np.ndarray:
    image = np.asarray(image, np.uint8)
    if image.ndim == 3:
      image = np.repeat(image[None], self.batch, axis=0)
    expected = (self.batch, self.height, self.width, 3)
    if image.shape != expected:
      raise ValueError(f"image must be {expected} uint8 (the exported shape), got {image.shape}")
    frame0, self._state, self._dcache = self._start(self.params, self.vae_params,
                                                    jnp.asarray(image), jnp.int32(seed))
    self.set_text(text)
    return np.asarray(frame0)

  def set_text(self, text) -> None:
    spec = self.meta["text"]
    if isinstance(text, str) and not spec["dtype"].startswith("int"):
      raise ValueError("this bundle takes text embeddings (float), not a caption string")
    if text is None or isinstance(text, str):
      from apt2_jax.data import captions
      text = captions.tokenize(text or "", spec["shape"][-1])
    arr = np.asarray(text, spec["dtype"])
    arr = np.broadcast_to(arr, spec["shape"]) if arr.ndim < len(spec["shape"]) else arr
    self._text_kv = self._text(self.params, jnp.asarray(arr))

  def step(self, control=None) -> np.ndarray:
    if self._state is None:
      raise RuntimeError("call start(...) before step()")
    maps = self._control_input(control)
    latent, self._state = self._dit_step(self.params, self._state, self._text_kv, maps)
    frames, self._dcache = self._decode(self.vae_params, self._dcache, latent)
    return np.asarray(frames)

  def _control_input(self, control):
    if self.control_type == "none":
      return None
    channels = self.meta["model"]["control_channels"]
    if isinstance(control, (np.ndarray, jax.Array)) and np.ndim(control) == 5:
      return jnp.asarray(control, jnp.float32)
    from apt2_jax.inference import controls as controls_lib
    parsed = controls_lib.parse_control(control, self.control_type)
    if parsed is None and self.control_type == "pose":
      parsed = self._last_control
    if parsed is not None:
      self._last_control = parsed
    maps = controls_lib.control_maps(self.control_type, parsed, self.latent_hw, channels)
    return jnp.broadcast_to(jnp.asarray(maps)[None, None], (self.batch, 1) + maps.shape)


def load_bundle(directory: str) -> ExportedStreamer:
  """The serialised stream of an export bundle, runnable without the model code."""
  return ExportedStreamer(directory)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def main(argv):
  from absl import flags
  from apt2_jax.inference import streaming
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  kwargs = {k: getattr(FLAGS, k) for k in ("height", "width", "batch") if getattr(FLAGS, k)}
  gen = streaming.StreamingGenerator.from_checkpoint(FLAGS.checkpoint, **kwargs)
  platforms = tuple(FLAGS.platforms.split(",")) if FLAGS.platforms else None
  export_bundle(gen, FLAGS.out, bf16=FLAGS.bf16, serialize=FLAGS.serialize, platforms=platforms)
  print(f"wrote {FLAGS.out}: {sorted(os.listdir(FLAGS.out))}")


def _define_flags():
  from absl import flags
  flags.DEFINE_string("checkpoint", None, "training workdir or export bundle", required=True)
  flags.DEFINE_string("out", None, "output directory", required=True)
  flags.DEFINE_bool("bf16", False, "store the generator's parameters in bfloat16")
  flags.DEFINE_bool("serialize", True, "write jax.export serialisations of the stream steps")
  flags.DEFINE_integer("height", 0, "pixel height of the exported steps (0: the checkpoint's)")
  flags.DEFINE_integer("width", 0, "pixel width of the exported steps (0: the checkpoint's)")
  flags.DEFINE_integer("batch", 0, "batch of the exported steps (0: the checkpoint's, or 1)")
  flags.DEFINE_string("platforms", "", "comma-separated lowering platforms (default: current)")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
