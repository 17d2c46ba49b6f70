"""Streaming demo: one first frame in, a long stream of generated frames out, timed.

    python -m apt2_jax.demo [--size=small] [--frames=120] [--height=256 --width=256]

Builds the generator (`small`: ~30M parameters) and the streaming VAE decoder with random weights
(no download), encodes a first frame, then streams `--frames` latent frames (4 video frames each)
through the KV-cached 1-NFE step and the streaming VAE decode, each jitted once with the caches
donated. Logs per-step latency and frames per second, and writes the stream as MP4/GIF and a
JSON of the timings into `--out_dir` (the log names the files). Random weights draw noise-like frames: this measures the
real computation; `make demo`'s toy pipeline trains the weights.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging

import jax
import jax.numpy as jnp
import numpy as np

from apt2_jax import runtime

FLAGS = flags.FLAGS
flags.DEFINE_string("size", "small", "model size (apt2_jax/configs/sizes.py)")
flags.DEFINE_integer("frames", 120, "latent frames to stream (4 video frames each)")
flags.DEFINE_integer("height", 256, "pixels")
flags.DEFINE_integer("width", 256, "pixels")
flags.DEFINE_string("vae_size", None, "VAE size (default: tiny for the tiny model, else small)")
flags.DEFINE_string("out_dir", "demo_out/stream", "where the MP4/GIF and timings JSON go")
flags.DEFINE_integer("seed", 0, "noise seed")
runtime.define_flags()


def first_frame_image(height: int, width: int) -> np.ndarray:
  """A deterministic first frame: a photograph from scikit-image, resized, uint8 [H, W, 3]."""
  from PIL import Image
  try:
    from skimage import data as skdata
    img = skdata.astronaut()
  except Exception:  # pragma: no cover - scikit-image is a dependency; keep the demo running
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 127 // (width + height)], -1)
  return np.asarray(Image.fromarray(img.astype(np.uint8)).resize((width, height)))


def stream(size="small", frames=120, height=256, width=256, vae_size=None, seed=0, out_dir=None,
           log=logging.info):
  """Runs the stream; returns a dict of timings (and writes media when `out_dir` is set).

  The computation is `apt2_jax.generation.stream`'s jitted `step` and `decode` (the functions
  every generator uses), timed separately with `block_until_ready`.
  """
  from apt2_jax import generation
  from apt2_jax.configs import sizes
  from apt2_jax.generation import stream as stream_lib
  from apt2_jax.models import DiTConfig
  from apt2_jax.models import vae as vae_lib

  dit_config = DiTConfig.from_dict(sizes.model_config(size))
  vae_config = vae_lib.vae_config(vae_size or ("tiny" if size == "tiny" else "small"),
                                  z_dim=dit_config.latent_channels)
  if height % 16 or width % 16:
    raise ValueError(f"height and width must be multiples of 16, got {height}x{width}")
  h, w = height // 8, width // 8
  t0 = time.perf_counter()
  gen = generation.random_generator(dit_config, vae_config, seed=seed)
  fns = stream_lib.compiled(gen.spec())
  log(f"[demo] {size} generator: {sum(x.size for x in jax.tree.leaves(gen.params)) / 1e6:.1f}M parameters, "
      f"VAE {vae_config.base_dim}-base; {height}x{width} pixels -> {h}x{w} latent, "
      f"window N={dit_config.window}; init {time.perf_counter() - t0:.1f}s")

  image = jnp.asarray(first_frame_image(height, width))[None]
  prompt = jnp.asarray([[3, 5, 7, 0, 0, 0, 0, 0]], jnp.int32) if dit_config.caption_vocab_size else \
      jnp.zeros((1, 8, dit_config.text_dim))
  # Frame 0: encode and decode the user's frame itself (1 video frame); then 4 video frames per step.
  t0 = time.perf_counter()
  frame0, state, dcache = fns.start(gen.vae_params, image, jnp.int32(seed))
  frame0.block_until_ready()
  first_latency = time.perf_counter() - t0
  text_kv = fns.text(gen.params, prompt)

  video, step_ms, decode_ms = [np.asarray(frame0[0])], [], []
  for i in range(frames):
    t0 = time.perf_counter()
    x, state = fns.step(gen.params, state, text_kv, None)
    x.block_until_ready()
    t1 = time.perf_counter()
    rgb, dcache = fns.decode(gen.vae_params, dcache, x)
    rgb = np.asarray(rgb[0])
    t2 = time.perf_counter()
    step_ms.append((t1 - t0) * 1e3)
    decode_ms.append((t2 - t1) * 1e3)
    video.append(rgb)
    if i == 0 or (i + 1) % 20 == 0 or i + 1 == frames:
      done = i + 1
      med = np.median(step_ms[1:] or step_ms) + np.median(decode_ms[1:] or decode_ms)
      log(f"[demo] latent frame {done}/{frames}: step {step_ms[-1]:.1f} ms, decode {decode_ms[-1]:.1f} ms, "
          f"{4000.0 / med:.1f} fps, ETA {(frames - done) * med / 1e3:.1f}s")
  steady = slice(1, None) if frames > 1 else slice(None)  # the first call compiles
  result = {
      "size": size, "resolution": [height, width], "latent": [h, w], "latent_frames": frames,
      "video_frames": 1 + 4 * frames, "window": dit_config.window,
      "step_latency_ms": float(np.median(step_ms[steady])),
      "decode_latency_ms": float(np.median(decode_ms[steady])),
      "first_step_ms_with_compile": float(step_ms[0]),
      "first_frame_ms_with_compile": first_latency * 1e3,
      "device": jax.devices()[0].device_kind, "jax": jax.__version__,
  }
  result["fps"] = 4000.0 / (result["step_latency_ms"] + result["decode_latency_ms"])
  result["dit_fps"] = 4000.0 / result["step_latency_ms"]
  frames_u8 = np.concatenate(video, 0)
  assert frames_u8.shape[0] == 1 + 4 * frames
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "stream.json"), "w") as f:
      json.dump(result, f, indent=2)
    from apt2_jax import media
    media.write_mp4(os.path.join(out_dir, "stream.mp4"), frames_u8, fps=24)
    media.write_gif(os.path.join(out_dir, "stream.gif"), frames_u8[:97], fps=24)
    out_dir = os.path.abspath(out_dir)
    result["files"] = [os.path.join(out_dir, n) for n in ("stream.mp4", "stream.gif", "stream.json")]
    log(f"[demo] wrote {', '.join(result['files'])}")
  log(f"[demo] {frames} latent frames ({1 + 4 * frames} video frames): DiT step "
      f"{result['step_latency_ms']:.1f} ms, VAE decode {result['decode_latency_ms']:.1f} ms per latent frame "
      f"-> {result['fps']:.1f} fps (DiT alone {result['dit_fps']:.1f} fps)")
  return result


def main(argv):
  del argv
  runtime.setup()
  stream(FLAGS.size, FLAGS.frames, FLAGS.height, FLAGS.width, FLAGS.vae_size, FLAGS.seed, FLAGS.out_dir)


if __name__ == "__main__":
  app.run(main)
