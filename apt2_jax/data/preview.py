"""Writes a GIF of one sample per world: python -m apt2_jax.data.preview --out_dir=docs"""
import os

from absl import app
from absl import flags
import imageio.v2 as imageio

from apt2_jax.data import worlds

_OUT_DIR = flags.DEFINE_string('out_dir', 'docs', 'Folder for data_<world>.gif.')
_SIZE = flags.DEFINE_integer('size', 128, 'Height and width.')
_FRAMES = flags.DEFINE_integer('num_frames', 33, 'Frames (1 + 4k).')
_SEED = flags.DEFINE_integer('seed', 2, 'Train-split example index.')


def main(argv):
  del argv
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  config = worlds.WorldConfig(height=_SIZE.value, width=_SIZE.value, num_frames=_FRAMES.value)
  for name in worlds.WORLD_NAMES:
    example = worlds.make_world(name, config).sample(worlds.split_seed('train', _SEED.value))
    path = os.path.join(_OUT_DIR.value, f'data_{name}.gif')
    imageio.mimsave(path, list(example['video']), duration=1000 / worlds.FPS * 2, loop=0)
    print(f'{path}: {example["caption"]!r} ({os.path.getsize(path) / 1e3:.0f} kB)')


if __name__ == '__main__':
  app.run(main)
