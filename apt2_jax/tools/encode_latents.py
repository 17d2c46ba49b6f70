"""Pre-encode a TFDS video dataset into latents, so that the DiT stages read latents, not pixels.

  python -m apt2_jax.tools.encode_latents --vae=/tmp/vae_small \
      --dataset=apt2_worlds/camera --data_dir=~/tensorflow_datasets \
      --out_dir=~/tensorflow_datasets --out_name=apt2_worlds_latents/camera_small

`--vae` is a `vae` stage workdir or a diffusers `AutoencoderKLWan` folder (Wan2.1's VAE). Every
example keeps its other features (controls, caption, tokens, first frame, seed, ...); its video
(uint8 `[T, H, W, 3]`, cut to the longest `1 + 4k` prefix) is replaced by

  latents:  float32 `[1 + k, H/8, W/8, z_dim]`, the posterior mean, normalised per channel
            (`normalize_latents`, the VAE's latent statistics), i.e. what the DiT consumes.

The encode is chunked (`encode_chunked`: frame 0, then 4 frames at a time), so long clips fit.

Output formats (`--format`):
  tfds          a TFDS dataset in ArrayRecord files (`tfds.data_source(out_name, data_dir=...)`);
                TFDS's writer needs `tensorflow` installed where this tool runs.
  array_record  ArrayRecord files of msgpack records (`read_records`), no tensorflow needed.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator, Mapping

from absl import app
from absl import flags
from absl import logging
import flax.serialization
import jax
import numpy as np

from apt2_jax.models import vae as vae_lib

FLAGS = flags.FLAGS


def define_flags():
  """Defines the command-line flags (only when run as a program), keeping names already defined."""
  def _define(fn, name, *args, **kwargs):
    if name not in flags.FLAGS:
      fn(name, *args, **kwargs)
  _define(flags.DEFINE_string, "vae", None, "VAE workdir or diffusers AutoencoderKLWan folder.")
  _define(flags.DEFINE_string, "dataset", None, "Source TFDS name (e.g. apt2_worlds/camera).")
  _define(flags.DEFINE_string, "data_dir", None, "Source TFDS data_dir.")
  _define(flags.DEFINE_list, "splits", ["train", "validation", "test"], "Splits to encode.")
  _define(flags.DEFINE_string, "video_key", "video", "Feature holding uint8 video.")
  _define(flags.DEFINE_string, "out_dir", None, "Output data_dir.")
  _define(flags.DEFINE_string, "out_name", None, "Output dataset name (TFDS name[/config]).")
  _define(flags.DEFINE_enum, "format", "tfds", ["tfds", "array_record"], "Output format.")
  _define(flags.DEFINE_integer, "batch_size", 4, "Clips encoded together (same shapes).")
  _define(flags.DEFINE_integer, "max_examples", 0, "Per split; 0 = all.")


def to_model_frames(video: np.ndarray) -> np.ndarray:
  """uint8 `[T, H, W, 3]` -> float32 in [-1, 1], cut to the longest `1 + 4k` frames."""
  t = 1 + (video.shape[0] - 1) // vae_lib.TEMPORAL_FACTOR * vae_lib.TEMPORAL_FACTOR
  video = np.asarray(video[:t])
  if video.dtype == np.uint8:
    return video.astype(np.float32) / 127.5 - 1.0
  return video.astype(np.float32)


def encode_examples(model: vae_lib.VAE, params: Any, examples: Iterable[Mapping[str, Any]],
                    batch_size: int = 4, video_key: str = "video") -> Iterator[dict[str, Any]]:
  """Replaces each example's video by its normalised latents (see the module docstring).

  Consecutive examples are encoded together when their videos have the same shape.
  """
  def flush(pending):
    videos = np.stack([to_model_frames(e[video_key]) for e in pending])
    mean, _ = vae_lib.encode_chunked(model, params, videos)
    latents = np.asarray(vae_lib.normalize_latents(mean, model.config), np.float32)
    for example, z in zip(pending, latents):
      out = {k: v for k, v in example.items() if k != video_key}
      out["latents"] = z
      yield out

  pending = []
  for example in examples:
    if pending and (len(pending) == batch_size or
                    np.shape(example[video_key]) != np.shape(pending[0][video_key])):
      yield from flush(pending)
      pending = []
    pending.append(example)
  if pending:
    yield from flush(pending)


# ------------------------------------------------------------------------------------------------
# ArrayRecord of msgpack records (no tensorflow)
# ------------------------------------------------------------------------------------------------


def _plain(value):
  if isinstance(value, (bytes, str, int, float, bool)):
    return value.decode() if isinstance(value, bytes) else value
  return np.asarray(value)


def write_records(path: str, examples: Iterable[Mapping[str, Any]]) -> int:
  """Writes examples (dicts of arrays / strings / numbers) as msgpack records; returns count."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  n = 0
  for example in examples:
    writer.write(flax.serialization.msgpack_serialize(
        {k: _plain(v) for k, v in example.items()}))
    n += 1
  writer.close()
  return n


def read_records(path: str) -> list[dict[str, Any]]:
  """Reads what `write_records` wrote (random access: `ArrayRecordDataSource` over `path`)."""
  from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
  source = array_record_data_source.ArrayRecordDataSource([path])
  return [flax.serialization.msgpack_restore(source[i]) for i in range(len(source))]


# ------------------------------------------------------------------------------------------------
# TFDS
# ------------------------------------------------------------------------------------------------


def _latent_features(source_features, video_key: str, latent_shape):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = {k: v for k, v in source_features.items() if k != video_key}
  features["latents"] = tfds.features.Tensor(shape=tuple(latent_shape), dtype=np.float32)
  return tfds.features.FeaturesDict(features)


def main(argv):
  del argv
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from apt2_jax.generation.vae import load_vae  # pylint: disable=g-import-not-at-top
  model, params = load_vae(FLAGS.vae)
  params = jax.device_put(params)
  builder = tfds.builder(FLAGS.dataset, data_dir=FLAGS.data_dir)
  encoded = {}
  for split in FLAGS.splits:
    if split not in builder.info.splits:
      continue
    source = builder.as_data_source(split=split)
    n = len(source) if not FLAGS.max_examples else min(len(source), FLAGS.max_examples)
    examples = (source[i] for i in range(n))
    encoded[split] = list(encode_examples(model, params, examples, FLAGS.batch_size, FLAGS.video_key))
    logging.info("%s: encoded %d clips", split, n)
  metadata = {"vae": FLAGS.vae, "vae_config": {
      k: v for k, v in model.config.__dict__.items() if k != "dtype"}}
  if FLAGS.format == "array_record":
    out = os.path.join(FLAGS.out_dir, FLAGS.out_name.replace("/", "_"))
    for split, examples in encoded.items():
      write_records(os.path.join(out, f"{split}.array_record"), examples)
    with open(os.path.join(out, "metadata.json"), "w") as f:
      json.dump(metadata, f, indent=2, default=list)
    return
  first = next(iter(encoded.values()))[0]
  name, _, config = FLAGS.out_name.partition("/")
  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, config=config or None, version="1.0.0", data_dir=FLAGS.out_dir,
      features=_latent_features(builder.info.features, FLAGS.video_key, first["latents"].shape),
      split_datasets=encoded, file_format="array_record",
      description=f"Latents of {FLAGS.dataset}: {json.dumps(metadata, default=list)}")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["vae", "dataset", "out_dir", "out_name"])
  app.run(main)
