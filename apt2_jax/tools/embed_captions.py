r"""Embed the captions of a folder of videos with Wan2.1's umT5 text encoder.

    python -m apt2_jax.tools.embed_captions --text_encoder=/path/to/Wan2.1-T2V-1.3B-Diffusers \
        --folder=/path/to/videos [--max_length=512] [--batch_size=8] [--overwrite]

For every video `name.mp4` (any of `apt2_jax.data.builders.VIDEO_EXTENSIONS`, searched
recursively) with a caption file `name.txt`, writes `name.npy`: float32 `[max_length, d_model]`,
the caption's umT5 embedding as Wan's pipeline computes it (`generation.prompt.TextEncoder`: zeros
after the caption's tokens). `python -m apt2_jax.data.build --world=local` then stores each clip's
embedding in the dataset (`text_embedding`), which the DiT stages read as their text input. A video
without a caption gets no sidecar: the builder gives it the empty prompt (zeros).

`--text_encoder`: a diffusers Wan2.1 folder (its `text_encoder/` and `tokenizer/` are used) or a
folder holding a umT5 encoder and its tokenizer (`--tokenizer` names another tokenizer folder).
Nothing is downloaded. Existing sidecars are kept unless `--overwrite` (a rerun resumes), and
`text_embeddings.json` in the folder records the encoder, length and width.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from absl import app
from absl import flags

FLAGS = flags.FLAGS
MANIFEST = "text_embeddings.json"


def define_flags():
  def _define(fn, name, *args, **kwargs):
    if name not in flags.FLAGS:
      fn(name, *args, **kwargs)
  _define(flags.DEFINE_string, "text_encoder", None, "Wan2.1 diffusers folder or umT5 encoder folder")
  _define(flags.DEFINE_string, "tokenizer", None, "tokenizer folder (default: beside the encoder)")
  _define(flags.DEFINE_string, "folder", None, "folder of videos with `name.txt` captions")
  _define(flags.DEFINE_integer, "max_length", 512, "tokens per caption (Wan2.1: 512)")
  _define(flags.DEFINE_integer, "batch_size", 8, "captions encoded together")
  _define(flags.DEFINE_bool, "overwrite", False, "recompute existing `.npy` sidecars")
  _define(flags.DEFINE_string, "device", None, "torch device (default: cuda when available, else cpu)")
  _define(flags.DEFINE_string, "dtype", "float32", "torch dtype of the encoder (bfloat16 on GPUs)")


def captioned_videos(folder: str) -> list[tuple[str, str]]:
  """(video stem path, caption) of every video under `folder` that has a `.txt` caption."""
  from apt2_jax.data import builders  # pylint: disable=g-import-not-at-top
  out = []
  for root, _, names in os.walk(folder):
    for name in sorted(names):
      if not name.lower().endswith(builders.VIDEO_EXTENSIONS):
        continue
      stem = os.path.join(root, os.path.splitext(name)[0])
      if os.path.isfile(stem + ".txt"):
        with open(stem + ".txt") as f:
          out.append((stem, f.read().strip()))
  return sorted(out)


def embed_folder(folder: str, encoder, *, batch_size: int = 8, overwrite: bool = False,
                 progress: bool = True) -> dict:
  """Writes `stem.npy` for every captioned video of `folder` (see the module docstring).

  `encoder`: a `generation.prompt.TextEncoder`. Returns the manifest it writes:
  {"text_encoder", "max_length", "dim", "shape", "embedded", "kept", "uncaptioned"}.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from apt2_jax.data import builders  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"--folder={folder!r} is not a folder")
  shape = [encoder.max_length, encoder.dim]
  items = captioned_videos(folder)
  todo = []
  for stem, caption in items:
    path = stem + ".npy"
    if not overwrite and os.path.exists(path):
      old = np.load(path, mmap_mode="r")
      if list(old.shape) == shape:
        continue
    todo.append((stem, caption))
  for start, embeddings in encoder.encode_batched([c for _, c in todo], batch_size, progress):
    for (stem, _), embedding in zip(todo[start:start + len(embeddings)], embeddings):
      tmp = stem + ".npy.tmp"
      with open(tmp, "wb") as f:
        np.save(f, embedding.astype(np.float32))
      os.replace(tmp, stem + ".npy")
  videos = sum(n.lower().endswith(builders.VIDEO_EXTENSIONS) for _, _, ns in os.walk(folder) for n in ns)
  manifest = {"text_encoder": os.path.abspath(encoder.path), "max_length": encoder.max_length,
              "dim": encoder.dim, "shape": shape, "embedded": len(todo), "kept": len(items) - len(todo),
              "uncaptioned": videos - len(items)}
  with open(os.path.join(folder, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2)
  return manifest


def read_manifest(folder: str) -> Optional[dict]:
  """The manifest `embed_folder` wrote in `folder` (None when there is none)."""
  path = os.path.join(folder, MANIFEST)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.text_encoder or not FLAGS.folder:
    raise app.UsageError("--text_encoder and --folder are required")
  from apt2_jax.generation import prompt  # pylint: disable=g-import-not-at-top
  encoder = prompt.TextEncoder(FLAGS.text_encoder, tokenizer=FLAGS.tokenizer, max_length=FLAGS.max_length,
                               device=FLAGS.device, dtype=FLAGS.dtype)
  manifest = embed_folder(FLAGS.folder, encoder, batch_size=FLAGS.batch_size, overwrite=FLAGS.overwrite)
  print(f"embedded {manifest['embedded']} captions ({manifest['kept']} kept, {manifest['uncaptioned']} "
        f"videos without a caption) as float32 {tuple(manifest['shape'])} sidecars in {FLAGS.folder}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
