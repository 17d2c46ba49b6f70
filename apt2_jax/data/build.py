"""Builds a TFDS ArrayRecord dataset of a synthetic world or of a local folder of videos.

  python -m apt2_jax.data.build --world=camera --config=tiny --data_dir=DIR
  python -m apt2_jax.data.build --world=local --folder=VIDEOS --data_dir=DIR --config=mine \\
      --num_frames=81 --height=480 --width=832 [--vae=WAN/vae] [--store_video=false]

Local folders: clips of `--num_frames` frames every `--clip_stride` frames, resized and
center-cropped; captions from `name.txt`, caption embeddings from `name.npy` sidecars
(`apt2_jax.tools.embed_captions`; their shape is found automatically). With `--vae` (a `vae`
workdir or a diffusers AutoencoderKLWan folder, e.g. Wan2.1's `vae/`) every clip is also
pre-encoded into normalised latents (`latents`), so training runs no VAE encoder; without it the
stages encode the video on the fly with `config.vae.checkpoint`. The dataset is
`apt2_local_videos/<--config>` in `--data_dir`; train on it with `--config.data.source=tfds
--config.data.tfds_name=apt2_local_videos/<--config> --config.data.data_dir=DIR`.
"""
from absl import app
from absl import flags

from apt2_jax.data import builders

FLAGS = flags.FLAGS


def define_flags():
  """The command's flags, defined only when it runs as a program (importing `build_local` from a
  test or a library defines nothing, so no other command meets a required `--data_dir`)."""
  flags.DEFINE_enum('world', 'camera', ['camera', 'puppet', 'bouncing', 'panorama', 'torus', 'local'],
                    'World to build, or `local` for a folder of videos.')
  flags.DEFINE_string('config', 'tiny', 'Builder config: tiny | small | base (worlds); the '
                      "dataset's name for `local` ('tiny' -> 'default').")
  flags.DEFINE_string('data_dir', None, 'TFDS data_dir.', required=True)
  flags.DEFINE_string('folder', '', 'local: folder of videos.')
  flags.DEFINE_integer('num_frames', 17, 'local: frames per clip (1 + 4k).')
  flags.DEFINE_integer('clip_stride', 8, 'local: frames between clip starts.')
  flags.DEFINE_integer('frame_step', 1, 'local: take every n-th frame.')
  flags.DEFINE_integer('size', 64, 'local: clip height and width (when --height/--width are 0).')
  flags.DEFINE_integer('height', 0, 'local: clip height (multiple of 16; 0: --size).')
  flags.DEFINE_integer('width', 0, 'local: clip width (multiple of 16; 0: --size).')
  flags.DEFINE_float('validation_fraction', 0.0, 'local: fraction of files (by name hash) in the validation split.')
  flags.DEFINE_string('vae', '', 'local: pre-encode latents with this VAE (workdir or diffusers '
                      'AutoencoderKLWan folder); empty: video only.')
  flags.DEFINE_bool('store_video', True, 'local: keep the pixels (with --vae, false '
                    'stores latents and the first frame only).')


def vae_encoder(vae: str, num_frames: int, height: int, width: int):
  """(encode_fn, latent_shape): uint8 clip [T, H, W, 3] -> normalised latents (posterior mean,
  `normalize_latents`, as the stages' `LatentInputs.encode`), encoded chunk by chunk."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from apt2_jax.generation.vae import load_vae  # pylint: disable=g-import-not-at-top
  from apt2_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  model, params = load_vae(vae)

  @jax.jit
  def encode(params, video):
    video = video.astype(np.float32) / 127.5 - 1.0
    mean, _ = vae_lib.encode_chunked(model, params, video[None])
    return vae_lib.normalize_latents(mean, model.config)[0]

  shape = (vae_lib.latent_frames(num_frames), height // vae_lib.SPATIAL_FACTOR,
           width // vae_lib.SPATIAL_FACTOR, model.config.z_dim)
  return (lambda clip: np.asarray(encode(params, clip), np.float32)), shape


def build_local(folder: str, data_dir: str, name: str = 'default', *, num_frames: int = 17,
                height: int = 64, width: int = 64, vae: str = '', **config):
  """`builders.build_local_videos` with optional VAE pre-encoding (`vae_encoder`)."""
  if vae:
    config['encode_fn'], config['latent_shape'] = vae_encoder(vae, num_frames, height, width)
  return builders.build_local_videos(folder, data_dir, name, num_frames=num_frames, height=height,
                                     width=width, **config)


def main(argv):
  del argv
  f = FLAGS
  if f.world == 'local':
    builder = build_local(
        f.folder, f.data_dir, f.config if f.config != 'tiny' else 'default',
        num_frames=f.num_frames, clip_stride=f.clip_stride, frame_step=f.frame_step,
        height=f.height or f.size, width=f.width or f.size,
        validation_fraction=f.validation_fraction, vae=f.vae, store_video=f.store_video)
    features = sorted(builder.info.features.keys())
    print(f'skipped {len(builder.skipped_files)} unreadable files; features: {features}')
  else:
    builder = builders.build_world(f.world, f.config, f.data_dir)
  print(f'built {builder.name}/{builder.builder_config.name} in {builder.data_dir}:',
        {split: info.num_examples for split, info in builder.info.splits.items()})


if __name__ == '__main__':
  define_flags()
  app.run(main)
