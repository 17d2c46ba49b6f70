r"""Sample a video from a first frame, a prompt and a controls file.

    python -m apt2_jax.inference.sample --checkpoint=DIR --image=first.png \
        --controls=controls.json --num_frames=97 --out=out.mp4 [--text="..."] [--seed=0]

Writes `out.mp4` and `out.gif` (same stem), with a progress bar. `--num_frames` is `1 + 4k`
(frame 0 is the reconstructed first image, each step adds 4). The controls file format is
documented in `apt2_jax/inference/controls.py`; without `--controls` every step has no control
(a camera holds still, a puppet holds its rest pose). Errors in the file name the bad entry and
stop before any model work.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import app, flags, logging

from apt2_jax import media, runtime
from apt2_jax.inference import controls as controls_lib


def define_flags():
  """Defines the command-line flags: only when run as a program (or by a test), so that
  importing this module next to other CLIs defines nothing; names already defined are kept."""
  def _define(fn, name, *args, **kwargs):
    if name not in flags.FLAGS:
      fn(name, *args, **kwargs)
  _define(flags.DEFINE_string, "checkpoint", None, "export bundle or training workdir")
  _define(flags.DEFINE_string, "image", None, "first frame (PNG/JPEG), resized to the model's resolution")
  _define(flags.DEFINE_string, "controls", None, "controls JSON file (see apt2_jax/inference/controls.py)")
  _define(flags.DEFINE_integer, "num_frames", 33, "video frames to write, 1 + 4k")
  _define(flags.DEFINE_string, "out", "sample.mp4", "output MP4; the GIF goes next to it")
  _define(flags.DEFINE_string, "text", "", "prompt (a controls-file step's 'text' changes it mid-video)")
  _define(flags.DEFINE_integer, "seed", 0, "noise seed")
  _define(flags.DEFINE_float, "fps", 24.0, "frame rate of the written video")
  _define(flags.DEFINE_integer, "height", 0, "override the resolution (0: the checkpoint's)")
  _define(flags.DEFINE_integer, "width", 0, "override the resolution (0: the checkpoint's)")
  _define(flags.DEFINE_string, "decoder", None, "light decoder workdir (experiments/vae.py:light_decoder) "
          "replacing the VAE's decoder")
  runtime.define_flags()
  _define(flags.DEFINE_string, "text_encoder", None, "umT5 text encoder for --text with Wan-size models: a Wan2.1 "
          "diffusers folder (text_encoder/, tokenizer/) or an encoder folder (generation.prompt)")

FLAGS = flags.FLAGS


def load_image(path: str) -> np.ndarray:
  from PIL import Image
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def sample(gen, image: np.ndarray, steps: list[dict], text: str, seed: int, out: str,
           fps: float = 24.0, progress: bool = True) -> dict:
  """Runs the stream for `len(steps)` steps and writes `out` (MP4) and its GIF.

  Returns {"mp4", "gif", "frames", "seconds", "fps"} (fps of generation, compile included).
  Both files are written under temporary names and renamed when whole: a failure (a full disk:
  `disk.DiskFullError`, one line) leaves neither a truncated video nor an older one overwritten.
  """
  from tqdm import tqdm
  from apt2_jax import disk
  gif = os.path.splitext(out)[0] + ".gif"
  t0 = time.perf_counter()
  tmp_mp4, tmp_gif = disk.temporary_name(out), disk.temporary_name(gif)
  try:
    with media.VideoWriter(tmp_mp4, fps, gif_path=tmp_gif) as writer:
      writer.write(gen.start(image, text=text, seed=seed)[0])
      # disable=None: no bar when stderr is not a terminal (a log file, a cluster job)
      bar = tqdm(steps, desc="sampling", unit="step", disable=None if progress else True, file=sys.stderr)
      for entry in bar:
        if entry.get("text"):
          gen.set_text(entry["text"])
        writer.write(gen.step(_as_user_control(entry["control"], gen.control_type))[0])
        bar.set_postfix(frames=writer.num_frames)
    os.replace(tmp_mp4, out)
    os.replace(tmp_gif, gif)
  except BaseException as e:
    disk.remove_quietly(tmp_mp4)
    disk.remove_quietly(tmp_gif)
    if disk.is_disk_full(e) and not isinstance(e, disk.DiskFullError):
      raise disk.error(os.path.dirname(os.path.abspath(out)), "sample",
                       f"{out} and {gif} were not written") from None
    raise
  seconds = time.perf_counter() - t0
  return {"mp4": out, "gif": gif, "frames": writer.num_frames, "seconds": seconds,
          "fps": writer.num_frames / seconds}


def _as_user_control(parsed, kind):
  if parsed is None:
    return None
  return {"camera": parsed} if kind == "camera" else {"keypoints": parsed}


def main(argv):
  if not FLAGS.checkpoint:
    raise app.UsageError("--checkpoint is required")
  if not FLAGS.image:
    raise app.UsageError("--image is required")
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if FLAGS.num_frames < 5 or (FLAGS.num_frames - 1) % 4:
    raise app.UsageError(f"--num_frames={FLAGS.num_frames} must be 1 + 4k with k >= 1")
  num_steps = (FLAGS.num_frames - 1) // 4
  runtime.require_local_paths("checkpoint", "image", "controls", "out")
  check_flags()
  runtime.setup()
  from apt2_jax.inference.streaming import StreamingGenerator
  kwargs = {k: getattr(FLAGS, k) for k in ("height", "width") if getattr(FLAGS, k)}
  image = read_image_flag(FLAGS.image)
  # Validate the controls before loading anything heavy... except that the control type comes
  # from the model config: read it from the bundle's JSON when there is one.
  kind = _control_type_of(FLAGS.checkpoint)
  steps = [{"control": None, "text": None}] * num_steps
  if FLAGS.controls and kind is not None:
    steps = read_controls_flag(FLAGS.controls, kind, num_steps)
  if FLAGS.text_encoder:  # caption strings -> umT5 embeddings for models that take embeddings
    from apt2_jax.generation import prompt
    prompt.set_text_encoder(FLAGS.text_encoder)
  try:  # a damaged newest checkpoint falls back to an older step (checkpointing.newest_intact)
    gen = StreamingGenerator.from_checkpoint(FLAGS.checkpoint, decoder=FLAGS.decoder, **kwargs)
  except FileNotFoundError as e:
    raise app.UsageError(f"--checkpoint={FLAGS.checkpoint}: {e}") from None
  if FLAGS.controls and kind is None:
    steps = read_controls_flag(FLAGS.controls, gen.control_type, num_steps)
  result = sample(gen, image, steps, FLAGS.text, FLAGS.seed, FLAGS.out, FLAGS.fps)
  logging.info("wrote %s and %s: %d frames in %.1f s (%.1f fps, compilation included)", result["mp4"],
               result["gif"], result["frames"], result["seconds"], result["fps"])


# ------------------------------------------------------------------------------------------------
# Bad inputs: one line naming the flag (apt2_jax.cli), before anything heavy starts
# ------------------------------------------------------------------------------------------------

VIDEO_SUFFIX = ".mp4"
SIZE_MULTIPLE = 16  # the VAE's 8x spatial stride times the DiT's 2x patch


def _os_reason(e: OSError) -> str:
  if isinstance(e, FileNotFoundError):
    return "no such file"
  if isinstance(e, IsADirectoryError):
    return "is a directory, not a file"
  if isinstance(e, PermissionError):
    return "cannot be read (permission denied)"
  return e.strerror or str(e)


def check_flags() -> None:
  """--checkpoint, --height, --width and --out, checked before any model work."""
  ckpt = FLAGS.checkpoint
  if not os.path.exists(ckpt):
    raise app.UsageError(f"--checkpoint={ckpt}: no such directory (a training workdir or an export bundle)")
  if not os.path.isdir(ckpt):
    raise app.UsageError(f"--checkpoint={ckpt}: not a directory (a training workdir or an export bundle)")
  for name in ("height", "width"):
    value = getattr(FLAGS, name)
    if value and (value < 0 or value % SIZE_MULTIPLE):
      raise app.UsageError(f"--{name}={value} must be a positive multiple of {SIZE_MULTIPLE} (the VAE's 8x "
                           f"stride times the 2x patch), or 0 for the checkpoint's")
  if os.path.splitext(FLAGS.out)[1].lower() != VIDEO_SUFFIX:
    raise app.UsageError(f"--out={FLAGS.out}: the video is written as MP4, name it *{VIDEO_SUFFIX} (the GIF "
                         "goes beside it)")
  if os.path.isdir(FLAGS.out):
    raise app.UsageError(f"--out={FLAGS.out}: is a directory")


def read_image_flag(path: str) -> np.ndarray:
  """`load_image(path)`; app.UsageError naming --image when it is not a readable image."""
  from PIL import UnidentifiedImageError
  try:
    return load_image(path)
  except UnidentifiedImageError:
    raise app.UsageError(f"--image={path}: not an image (PNG or JPEG expected)") from None
  except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
    raise app.UsageError(f"--image={path}: {_os_reason(e)}") from None
  except (OSError, SyntaxError, ValueError) as e:  # PIL on damaged files: "truncated", "broken PNG"
    raise app.UsageError(f"--image={path}: cannot be read as an image ({e})") from None


def read_controls_flag(path: str, kind: str, num_steps: int) -> list[dict]:
  """The controls file's steps for `num_steps`; app.UsageError naming --controls when it cannot be
  read or is not a valid controls file."""
  try:
    parsed = controls_lib.load_controls_file(path, kind)
    return controls_lib.controls_for_steps(parsed, num_steps, path)
  except controls_lib.ControlError as e:
    raise app.UsageError(f"bad controls file: {e}") from None
  except UnicodeDecodeError:
    raise app.UsageError(f"--controls={path}: not a text (JSON) file") from None
  except OSError as e:
    raise app.UsageError(f"--controls={path}: {_os_reason(e)}") from None


def _control_type_of(checkpoint: str):
  """The control type recorded in an export bundle, read without loading it (None otherwise)."""
  from apt2_jax.generation import bundle
  try:
    return bundle.read_meta(checkpoint)["control_type"]
  except (FileNotFoundError, ValueError, KeyError):
    return None


if __name__ == "__main__":
  from apt2_jax import cli
  define_flags()
  cli.run(main)  # bad inputs: one line and exit status 1
