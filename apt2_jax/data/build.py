"""Builds a TFDS ArrayRecord dataset of a synthetic world or of a local folder of videos.

  python -m apt2_jax.data.build --world=camera --config=tiny --data_dir=DIR
  python -m apt2_jax.data.build --world=local --folder=VIDEOS --data_dir=DIR --num_frames=17
"""
from absl import app
from absl import flags

from apt2_jax.data import builders

_WORLD = flags.DEFINE_enum('world', 'camera', ['camera', 'puppet', 'bouncing', 'local'],
                           'World to build, or `local` for a folder of videos.')
_CONFIG = flags.DEFINE_string('config', 'tiny', 'Builder config: tiny | small | base (worlds).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data_dir.', required=True)
_FOLDER = flags.DEFINE_string('folder', '', 'local: folder of videos.')
_NUM_FRAMES = flags.DEFINE_integer('num_frames', 17, 'local: frames per clip (1 + 4k).')
_CLIP_STRIDE = flags.DEFINE_integer('clip_stride', 8, 'local: frames between clip starts.')
_SIZE = flags.DEFINE_integer('size', 64, 'local: clip height and width.')


def main(argv):
  del argv
  if _WORLD.value == 'local':
    config = builders.LocalVideosConfig(
        name=_CONFIG.value if _CONFIG.value != 'tiny' else 'default', folder=_FOLDER.value,
        num_frames=_NUM_FRAMES.value, clip_stride=_CLIP_STRIDE.value, height=_SIZE.value,
        width=_SIZE.value)
    builder = builders.Apt2LocalVideos(config=config, data_dir=_DATA_DIR.value,
                                       file_format='array_record')
    builder.download_and_prepare()
    print(f'skipped {len(builder.skipped_files)} unreadable files')
  else:
    builder = builders.build_world(_WORLD.value, _CONFIG.value, _DATA_DIR.value)
  print(f'built {builder.name}/{builder.builder_config.name} in {builder.data_dir}:',
        {split: info.num_examples for split, info in builder.info.splits.items()})


if __name__ == '__main__':
  app.run(main)
