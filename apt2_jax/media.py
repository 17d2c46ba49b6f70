"""Writing videos: MP4 (H.264 through imageio-ffmpeg's bundled ffmpeg) and GIF (pillow).

Frames are uint8 `[frames, height, width, 3]` (or an iterable of `[height, width, 3]` chunks).
`VideoWriter` appends frames as they are produced, so long streams never sit in memory.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable, Optional

import numpy as np


@contextlib.contextmanager
def _plain_spawn():
  """Starts ffmpeg without a Python `preexec_fn`.

  imageio-ffmpeg puts ffmpeg in its own process group (`preexec_fn=os.setpgrp`, so that Ctrl-C
  does not kill it mid-write). A `preexec_fn` is Python code run between fork and exec, which
  runs the interpreter's fork hooks: JAX's then warns on every MP4 that `os.fork()` in a
  multithreaded process may deadlock (the child would run Python while JAX's threads hold their
  locks). Without it the child only execs (`_posixsubprocess` runs no Python, no hooks): no
  warning and no risk; ffmpeg then receives a Ctrl-C with us and ends its file itself.
  `IMAGEIO_FFMPEG_NO_PREVENT_SIGINT` is imageio-ffmpeg's switch for exactly this.
  """
  key = "IMAGEIO_FFMPEG_NO_PREVENT_SIGINT"
  previous = os.environ.get(key)
  os.environ[key] = "1"
  try:
    yield
  finally:
    if previous is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = previous


def _check(frames: np.ndarray) -> np.ndarray:
  frames = np.asarray(frames)
  if frames.ndim == 3:
    frames = frames[None]
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"frames must be uint8 [frames, height, width, 3], got {frames.dtype} "
                     f"{frames.shape}")
  return frames


class VideoWriter:
  """Streams frames into an MP4 (and optionally keeps them for a GIF).

      with VideoWriter("out.mp4", fps=24, gif_path="out.gif") as w:
        w.write(frames)             # uint8 [T, H, W, 3], any number of calls
  """

  def __init__(self, path: str, fps: float = 24.0, gif_path: Optional[str] = None,
               gif_max_frames: int = 240, quality: int = 8):
    self.path, self.fps, self.gif_path = path, float(fps), gif_path
    self.gif_max_frames, self.quality = gif_max_frames, quality
    self._writer = None
    self._gif_frames: list[np.ndarray] = []
    self.num_frames = 0

  def write(self, frames) -> None:
    frames = _check(frames)
    if self._writer is None:
      import imageio_ffmpeg
      h, w = frames.shape[1:3]
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      # yuv420p needs even sizes; macro_block_size=1 keeps the exact size (no rescale).
      self._writer = imageio_ffmpeg.write_frames(
          self.path, (w, h), fps=self.fps, codec="libx264", pix_fmt_out="yuv420p",
          quality=self.quality, macro_block_size=1, ffmpeg_log_level="error",
          output_params=["-movflags", "+faststart"])
      with _plain_spawn():
        self._writer.send(None)  # starts ffmpeg
    for frame in frames:
      self._writer.send(np.ascontiguousarray(frame))
      if self.gif_path and len(self._gif_frames) < self.gif_max_frames:
        self._gif_frames.append(frame)
    self.num_frames += len(frames)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    if self.gif_path and self._gif_frames:
      write_gif(self.gif_path, np.stack(self._gif_frames), self.fps)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def write_mp4(path: str, frames, fps: float = 24.0) -> str:
  """Writes uint8 `[T, H, W, 3]` frames as an H.264 MP4 (even height and width)."""
  frames = _check(frames)
  if frames.shape[1] % 2 or frames.shape[2] % 2:
    raise ValueError(f"MP4 (yuv420p) needs even height and width, got {frames.shape[1:3]}")
  with VideoWriter(path, fps) as w:
    w.write(frames)
  return path


def write_gif(path: str, frames, fps: float = 24.0, loop: int = 0) -> str:
  """Writes uint8 `[T, H, W, 3]` frames as an animated GIF (pillow, adaptive palette)."""
  from PIL import Image
  frames = _check(frames)
  images = [Image.fromarray(f) for f in frames]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  images[0].save(path, save_all=True, append_images=images[1:], loop=loop,
                 duration=max(int(round(1000.0 / fps)), 20), optimize=False)
  return path


def read_video(path: str) -> np.ndarray:
  """Reads a video (MP4 or GIF) back as uint8 `[T, H, W, 3]` (for tests and tools)."""
  import imageio.v3 as iio
  with _plain_spawn():  # MP4s are read through ffmpeg too
    frames = iio.imread(path, index=None)
  frames = np.asarray(frames)
  if frames.ndim == 3:
    frames = frames[None]
  return frames[..., :3]


def encode_jpeg(frame: np.ndarray, quality: int = 85) -> bytes:
  """One uint8 `[H, W, 3]` frame -> JPEG bytes."""
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.asarray(frame, np.uint8)).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def iter_frames(chunks: Iterable[np.ndarray]):
  for chunk in chunks:
    yield from _check(chunk)
