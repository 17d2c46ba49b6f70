"""Inference bundle: parameters (safetensors), configs (JSON) and the serialised stream steps.

    python -m apt2_jax.export --checkpoint=DIR --out=BUNDLE [--bf16] [--height=64 --width=64]

The file format is `apt2_jax.generation.bundle`'s. The serialised functions are
`apt2_jax.generation.stream`'s, taking the flat '/'-keyed parameter dicts exactly as stored, so
`ExportedStreamer` (`load_bundle`) runs a stream with jax, numpy and safetensors only: it imports
no model code. `StreamingGenerator.from_checkpoint(bundle)` reads the same bundle into the live
model code (any resolution).
"""
from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from apt2_jax.generation import bundle as bundle_lib
from apt2_jax.generation.bundle import FORMAT, FUNCTIONS, flatten, load_arrays, read_meta, unflatten  # noqa: F401

# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------


def _bundle_functions(gen):
  """The stream's pure functions over flat '/'-keyed parameter dicts (as stored)."""
  from apt2_jax.generation import stream
  spec = gen.spec
  live_dtype = jnp.dtype(gen.dit_config.param_dtype)

  def dit(flat):  # stored (possibly bf16) -> the model's parameter dtype
    return unflatten({k: v.astype(live_dtype) for k, v in flat.items()})

  def start(params, vae_params, image, seed):
    del params  # the DiT sees frame 0 through its first step
    return stream.start(spec, unflatten(vae_params), image, seed)

  def text(params, prompt):
    return stream.text(spec, dit(params), prompt)

  def dit_step(params, state, text_kv, controls):
    return stream.step(spec, dit(params), state, text_kv, controls)

  def decode(vae_params, decode_cache, latent):
    return stream.decode(spec, unflatten(vae_params), decode_cache, latent)
  return {"start": start, "text": text, "dit_step": dit_step, "decode": decode}


def export_bundle(gen, out_dir: str, *, bf16: bool = False, serialize: bool = True,
                  text_example=None, platforms: Optional[tuple[str, ...]] = None) -> str:
  """Writes `gen`'s parameters, configs and (with `serialize`) its jax.export-ed stream steps.

  The files are written to a temporary sibling of `out_dir` and moved in when all are whole, the
  metadata last: a failed export (a full disk: `disk.DiskFullError`, one line) leaves no
  half-written bundle that loads, and an older bundle in `out_dir` stays usable until the move.

  Args:
    gen: a `StreamingGenerator` (its batch, resolution, sampler and control type fix the
      exported shapes).
    bf16: store the generator's parameters in bfloat16 (the exported steps cast them back).
    text_example: a prompt of the shape users will give (default: a caption's tokens).
    platforms: lowering platforms for jax.export (default: the current backend).
  """
  from apt2_jax import disk
  given, out_dir = out_dir, os.path.abspath(os.fspath(out_dir))
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  tmp = disk.temporary_name(out_dir)
  try:
    _write_bundle(gen, tmp, bf16=bf16, serialize=serialize, text_example=text_example, platforms=platforms)
    _move_in(tmp, out_dir)
  except BaseException as e:
    disk.remove_quietly(tmp)
    if disk.is_disk_full(e) and not isinstance(e, disk.DiskFullError):
      raise disk.error(os.path.dirname(out_dir), "export",
                       f"the bundle {out_dir} was not written (nothing half-written was left)") from None
    raise
  return given


def _move_in(tmp: str, out_dir: str) -> None:
  """Moves the finished bundle in `tmp` to `out_dir` (renames: no space needed, nothing half-written).

  An older bundle's metadata goes first and the new one's last, so a bundle that loads
  (`read_meta`) is always whole: the old one until the swap, the new one after it.
  """
  from apt2_jax.generation.bundle import META
  os.makedirs(out_dir, exist_ok=True)
  old_meta = os.path.join(out_dir, META)
  if os.path.exists(old_meta):
    os.remove(old_meta)
  names = sorted(os.listdir(tmp), key=lambda n: n == META)
  for name in names:
    os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
  os.rmdir(tmp)


def _write_bundle(gen, out_dir: str, *, bf16: bool, serialize: bool, text_example, platforms) -> None:
  """`export_bundle`'s files, written into `out_dir` (a fresh temporary directory)."""
  from apt2_jax.generation.vae import vae_config_to_dict
  os.makedirs(out_dir, exist_ok=True)
  store_dtype = jnp.bfloat16 if bf16 else jnp.dtype(gen.dit_config.param_dtype)
  params = {k: np.asarray(jnp.asarray(v, store_dtype)) for k, v in flatten(gen.params).items()}
  vae_params = {k: np.asarray(v) for k, v in flatten(gen.vae_params).items()}
  bundle_lib.save_arrays(os.path.join(out_dir, "generator.safetensors"), params)
  bundle_lib.save_arrays(os.path.join(out_dir, "vae.safetensors"), vae_params)
  text = gen._prepare_text(text_example)
  o = gen.spec.options
  g = gen.generator
  meta = {
      "format": FORMAT,
      "model": gen.dit_config.to_dict(),
      "vae": vae_config_to_dict(gen.vae_config),
      "control_type": g.control_type, "control_encoding": g.control_encoding, "control_dim": g.control_dim,
      "height": gen.height, "width": gen.width, "batch": gen.batch,
      "latent_hw": list(gen.latent_hw),
      "text": {"dtype": str(text.dtype), "shape": list(text.shape)},
      "sampler": {"num_steps": o.num_steps, "shift": o.shift, "recycle": o.recycle,
                  "cache_from": o.cache_from, "guidance": gen.spec.guidance},
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
    controls = (jax.ShapeDtypeStruct((gen.batch, 4, g.control_dim), jnp.float32) if g.control_dim else None)
    latent, _ = jax.eval_shape(fns["dit_step"], p, state, text_kv, controls)
    args = {"start": (p, vp, image, seed), "text": (p, spec(text)),
            "dit_step": (p, state, text_kv, controls), "decode": (vp, dcache, latent)}
    kw = {} if platforms is None else {"platforms": tuple(platforms)}
    for name in FUNCTIONS:
      exported = jax.export.export(jax.jit(fns[name]), **kw)(*args[name])
      path = os.path.join(out_dir, f"{name}.jaxexport")
      with open(path, "wb") as f:
        f.write(exported.serialize())
      os.chmod(path, 0o644)
      meta["files"][name] = f"{name}.jaxexport"
    meta["platforms"] = list(exported.platforms)
  bundle_lib.write_meta(out_dir, meta)


# ------------------------------------------------------------------------------------------------
# Loader (no model code)
# ------------------------------------------------------------------------------------------------


class ExportedStreamer:
  """Runs a bundle's serialised stream steps; the same calls as `StreamingGenerator`.

  `start(image uint8 [B, H, W, 3], text, seed) -> uint8 [B, 1, H, W, 3]`, `set_text(text)`,
  `step(control) -> uint8 [B, 4, H, W, 3]`. Text: tokens (or a caption string, tokenised with
  `apt2_jax.data.captions`); control: a user control (`apt2_jax.inference.controls`) or the raw
  controls [B, 4, D] as an array.
  """

  def __init__(self, directory: str):
    from apt2_jax.inference.controls import ControlInput
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
    self._controls = ControlInput(self.control_type, meta["control_dim"], self.batch)
    self._state = self._dcache = self._text_kv = None

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
    self._controls.reset()
    return np.asarray(frame0)

  def set_text(self, text) -> None:
    spec = self.meta["text"]
    if isinstance(text, str) and text and not spec["dtype"].startswith("int"):
      raise ValueError("this bundle takes text embeddings (float), not a caption string")
    if text is None or isinstance(text, str):
      if spec["dtype"].startswith("int"):
        from apt2_jax.data import captions
        text = captions.tokenize(text or "", spec["shape"][-1])
      else:
        text = np.zeros(spec["shape"], spec["dtype"])
    arr = np.asarray(text, spec["dtype"])
    arr = np.broadcast_to(arr, spec["shape"]) if arr.ndim < len(spec["shape"]) else arr
    self._text_kv = self._text(self.params, jnp.asarray(arr))

  def step(self, control=None) -> np.ndarray:
    if self._state is None:
      raise RuntimeError("call start(...) before step()")
    if isinstance(control, (np.ndarray, jax.Array)) and np.ndim(control) == 3:
      raw = np.asarray(control, np.float32)
    else:
      raw = self._controls(control)
    latent, self._state = self._dit_step(self.params, self._state, self._text_kv,
                                         None if raw is None else jnp.asarray(raw))
    frames, self._dcache = self._decode(self.vae_params, self._dcache, latent)
    return np.asarray(frames)


def load_bundle(directory: str) -> ExportedStreamer:
  """The serialised stream of an export bundle, runnable without the model code."""
  return ExportedStreamer(directory)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def main(argv):
  from absl import app, flags
  from apt2_jax.inference import streaming
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from apt2_jax import runtime
  runtime.require_local_paths("checkpoint", "out")
  runtime.setup()
  if not os.path.isdir(FLAGS.checkpoint):
    raise app.UsageError(f"--checkpoint={FLAGS.checkpoint}: no such directory (a training workdir or an "
                         "export bundle)")
  for name in ("height", "width"):
    value = getattr(FLAGS, name)
    if value and (value < 0 or value % 16):
      raise app.UsageError(f"--{name}={value} must be a positive multiple of 16 (the VAE's 8x stride times "
                           f"the 2x patch), or 0 for the checkpoint's")
  kwargs = {k: getattr(FLAGS, k) for k in ("height", "width", "batch") if getattr(FLAGS, k)}
  try:  # a damaged newest checkpoint falls back to an older step (checkpointing.newest_intact)
    gen = streaming.StreamingGenerator.from_checkpoint(FLAGS.checkpoint, decoder=FLAGS.decoder, **kwargs)
  except FileNotFoundError as e:
    raise app.UsageError(f"--checkpoint={FLAGS.checkpoint}: {e}") from None
  platforms = tuple(FLAGS.platforms.split(",")) if FLAGS.platforms else None
  export_bundle(gen, FLAGS.out, bf16=FLAGS.bf16, serialize=FLAGS.serialize, platforms=platforms)
  from absl import logging
  logging.info("wrote %s: %s", os.path.abspath(FLAGS.out), sorted(os.listdir(FLAGS.out)))


def _define_flags():
  from absl import flags
  from apt2_jax import runtime
  runtime.define_flags()
  flags.DEFINE_string("checkpoint", None, "training workdir or export bundle", required=True)
  flags.DEFINE_string("out", None, "output directory", required=True)
  flags.DEFINE_bool("bf16", False, "store the generator's parameters in bfloat16")
  flags.DEFINE_bool("serialize", True, "write jax.export serialisations of the stream steps")
  flags.DEFINE_integer("height", 0, "pixel height of the exported steps (0: the checkpoint's)")
  flags.DEFINE_integer("width", 0, "pixel width of the exported steps (0: the checkpoint's)")
  flags.DEFINE_integer("batch", 0, "batch of the exported steps (0: the checkpoint's, or 1)")
  flags.DEFINE_string("platforms", "", "comma-separated lowering platforms (default: current)")
  flags.DEFINE_string("decoder", None, "light decoder workdir (experiments/vae.py:light_decoder) replacing "
                      "the VAE's decoder in the bundle")


if __name__ == "__main__":
  from apt2_jax import cli
  _define_flags()
  cli.run(main)  # bad inputs: one line and exit status 1
