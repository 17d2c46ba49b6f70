"""TFDS builders writing ArrayRecord: one per synthetic world, and one over a folder of videos.

Build from Python (no TensorFlow needed):

  builder = Apt2Camera(config='tiny', data_dir=DIR, file_format='array_record')
  builder.download_and_prepare()
  source = tfds.data_source('apt2_camera/tiny', data_dir=DIR)   # random access, for grain

or with `python -m apt2_jax.data.build --world=camera --config=tiny --data_dir=DIR`. The `tfds build`
CLI also works (`tfds build apt2_camera --imports=apt2_jax.data.builders --config=tiny
--data_dir=DIR --file_format=array_record`) but, in tfds 4.9.10, the CLI itself imports
TensorFlow; building from Python and reading with `tfds.data_source` do not.

World splits: `train` and `validation` draw seeds from disjoint ranges of the train pools;
`test` draws from the held-out pools (textures, trajectory types, shapes), see `worlds.py`.

Record features (all worlds): video uint8 [T, H, W, 3] (zlib), controls float32 [T, D],
first_frame uint8 [H, W, 3], caption, caption_id, text_tokens int32 [MAX_LEN], seed, textures,
trajectory; camera and panorama add poses float32 [T, 13]. Optional `latents` when the config has an
`encode_fn` (pre-encoding into VAE latents; the VAE arrives in a later change).
"""
import dataclasses
import hashlib
import logging
import os
from typing import Any, Callable

import numpy as np
import tensorflow_datasets as tfds

from apt2_jax.data import captions
from apt2_jax.data import worlds

VIDEO_EXTENSIONS = ('.mp4', '.webm', '.mov', '.mkv', '.avi')
EncodeFn = Callable[[np.ndarray], np.ndarray]


def _video_feature(shape):
  return tfds.features.Tensor(shape=shape, dtype=np.uint8,
                              encoding=tfds.features.Encoding.ZLIB)


@dataclasses.dataclass
class WorldBuilderConfig(tfds.core.BuilderConfig):
  """Resolution, clip length and split sizes of a world dataset.

  encode_fn: optional `uint8 [T, H, W, 3] -> float32 latent_shape` (VAE pre-encoding hook).
  """
  height: int = 64
  width: int = 64
  num_frames: int = 33
  speed: float = 1.0
  num_train: int = 256
  num_validation: int = 32
  num_test: int = 32
  encode_fn: EncodeFn | None = None
  latent_shape: tuple[int, ...] | None = None

  def world_config(self) -> worlds.WorldConfig:
    return worlds.WorldConfig(height=self.height, width=self.width, num_frames=self.num_frames,
                              speed=self.speed)


WORLD_BUILDER_CONFIGS = [
    WorldBuilderConfig(name='tiny', description='32x32, 17 frames, 8/4/4 examples: tests.',
                       height=32, width=32, num_frames=17, num_train=8, num_validation=4,
                       num_test=4),
    WorldBuilderConfig(name='small', description='64x64, 33 frames, 1024/64/64 examples.',
                       height=64, width=64, num_frames=33, num_train=1024, num_validation=64,
                       num_test=64),
    WorldBuilderConfig(name='base', description='128x128, 33 frames, 8192/256/256 examples.',
                       height=128, width=128, num_frames=33, num_train=8192,
                       num_validation=256, num_test=256),
]


class _WorldBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base builder: `WORLD` names the world; examples are `World.sample(split_seed(...))`."""
  WORLD = ''
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = WORLD_BUILDER_CONFIGS

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    t, h, w = cfg.num_frames, cfg.height, cfg.width
    dim = worlds.make_world(self.WORLD).control_dim
    features = {
        'video': _video_feature((t, h, w, 3)),
        'controls': tfds.features.Tensor(shape=(t, dim), dtype=np.float32),
        'first_frame': _video_feature((h, w, 3)),
        'caption': tfds.features.Text(),
        'caption_id': np.int32,
        'text_tokens': tfds.features.Tensor(shape=(captions.MAX_LEN,), dtype=np.int32),
        'seed': np.int64,
        'textures': tfds.features.Text(),
        'trajectory': tfds.features.Text(),
    }
    if self.WORLD in ('camera', 'panorama', 'torus'):
      features['poses'] = tfds.features.Tensor(shape=(t, 13), dtype=np.float32)
    if cfg.encode_fn is not None:
      features['latents'] = tfds.features.Tensor(shape=cfg.latent_shape, dtype=np.float32)
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict(features),
        description=f'apt2-jax synthetic {self.WORLD} world with oracle ground truth.',
        homepage='https://arxiv.org/abs/2506.09350')

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    sizes = {'train': cfg.num_train, 'validation': cfg.num_validation, 'test': cfg.num_test}
    return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

  def _generate_examples(self, split: str, num_examples: int):
    cfg = self.builder_config
    world = worlds.make_world(self.WORLD, cfg.world_config())
    for index in range(num_examples):
      seed = worlds.split_seed(split, index)
      example = world.sample(seed, cfg.num_frames)
      if cfg.encode_fn is not None:
        example['latents'] = np.asarray(cfg.encode_fn(example['video']), np.float32)
      yield seed, example


class Apt2Camera(_WorldBuilder):
  """Camera flying over a layered 2.5D scene; controls = relative camera pose per frame."""
  WORLD = 'camera'


class Apt2Puppet(_WorldBuilder):
  """Articulated 2D figure driven by per-frame keypoints."""
  WORLD = 'puppet'


class Apt2Bouncing(_WorldBuilder):
  """Bouncing shapes with gravity and occlusion; no controls."""
  WORLD = 'bouncing'


class Apt2Panorama(_WorldBuilder):
  """Camera panning and tilting inside a procedural spherical panorama (the testbed world)."""
  WORLD = 'panorama'


class Apt2Torus(_WorldBuilder):
  """A view panning over content whose period is the frame (the testbed world)."""
  WORLD = 'torus'


WORLD_BUILDERS = {'camera': Apt2Camera, 'puppet': Apt2Puppet, 'bouncing': Apt2Bouncing,
                  'panorama': Apt2Panorama, 'torus': Apt2Torus}


# =============================================================================================
# Local folder of videos
# =============================================================================================

@dataclasses.dataclass
class LocalVideosConfig(tfds.core.BuilderConfig):
  """Clips from a folder of videos (searched recursively).

  folder: the folder. Sidecars next to `name.mp4`: `name.txt` (caption), `name.npy` (text
  embedding, float32 `text_embedding_shape`, zeros when missing: the empty prompt), as
  `apt2_jax.tools.embed_captions` writes them (`text_embedding_shape_of` finds the shape).
  num_frames: clip length (1 + 4k); clip_stride: frames between clip starts; frame_step: take
  every n-th frame. Frames are resized (shorter side) and center-cropped to height x width.
  validation_fraction: files whose name hashes below it go to `validation`.
  max_frames: frames read per file at most (guards against huge files).
  encode_fn, latent_shape: pre-encoding into VAE latents (`latents`, float32 `latent_shape`), e.g.
  `apt2_jax.data.build.vae_encoder`. store_video: False leaves the pixels out (`first_frame`
  stays); only with `encode_fn`.
  """
  folder: str = ''
  num_frames: int = 17
  clip_stride: int = 8
  frame_step: int = 1
  height: int = 64
  width: int = 64
  validation_fraction: float = 0.0
  text_embedding_shape: tuple[int, ...] | None = None
  max_frames: int = 10_000
  encode_fn: EncodeFn | None = None
  latent_shape: tuple[int, ...] | None = None
  store_video: bool = True


def text_embedding_shape_of(folder: str) -> tuple[int, ...] | None:
  """The shape of the folder's `.npy` caption embeddings (None when it has none); raises
  ValueError when they disagree."""
  shapes = {}
  for root, _, names in os.walk(folder):
    stems = {os.path.splitext(n)[0] for n in names if n.lower().endswith(VIDEO_EXTENSIONS)}
    for name in names:
      if name.endswith('.npy') and name[:-4] in stems:  # a video's sidecar, nothing else
        path = os.path.join(root, name)
        shapes.setdefault(tuple(np.load(path, mmap_mode='r').shape), path)
  if len(shapes) > 1:
    raise ValueError(f'caption embeddings of different shapes in {folder}: '
                     + ', '.join(f'{s} ({p})' for s, p in shapes.items()))
  return next(iter(shapes), None)


def read_video(path: str, max_frames: int = 10_000) -> np.ndarray:
  """All frames of a video file, uint8 `[T, H, W, 3]`, via imageio-ffmpeg.

  Raises an exception (any type) on an unreadable or corrupt file.
  """
  import imageio_ffmpeg  # pylint: disable=g-import-not-at-top
  reader = imageio_ffmpeg.read_frames(path)
  try:
    meta = next(reader)
    width, height = meta['size']
    frames = []
    for frame in reader:
      frames.append(np.frombuffer(frame, np.uint8).reshape(height, width, 3))
      if len(frames) >= max_frames:
        break
  finally:
    reader.close()
  if not frames:
    raise ValueError(f'no frames decoded from {path}')
  return np.stack(frames)


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """Resizes uint8 `[T, H, W, 3]` so that it covers height x width, then center-crops."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w = frames.shape[1:3]
  scale = max(height / h, width / w)
  new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
  top, left = (new_h - height) // 2, (new_w - width) // 2
  out = np.empty((len(frames), height, width, 3), np.uint8)
  for i, frame in enumerate(frames):
    image = Image.fromarray(frame).resize((new_w, new_h), Image.BILINEAR, reducing_gap=2.0)
    out[i] = np.asarray(image)[top:top + height, left:left + width]
  return out


def _in_validation(relative_path: str, fraction: float) -> bool:
  digest = hashlib.sha256(relative_path.encode()).digest()
  return int.from_bytes(digest[:8], 'little') / 2 ** 64 < fraction


class Apt2LocalVideos(tfds.core.GeneratorBasedBuilder):
  """Clips of a local folder of videos; corrupt files are skipped, counted and reported.

  Usage: `Apt2LocalVideos(config=LocalVideosConfig(name='mine', folder=DIR), data_dir=OUT,
  file_format='array_record').download_and_prepare()`; afterwards `skipped_files` lists
  `(path, error)` of every file that could not be read.
  """
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [LocalVideosConfig(name='default')]

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.skipped_files: list[tuple[str, str]] = []
    self.num_files_read = 0

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    worlds.check_num_frames(cfg.num_frames)
    if not cfg.store_video and cfg.encode_fn is None:
      raise ValueError('LocalVideosConfig.store_video=False needs encode_fn (latents instead)')
    features = {
        'video': _video_feature((cfg.num_frames, cfg.height, cfg.width, 3)),
        'controls': tfds.features.Tensor(shape=(cfg.num_frames, 0), dtype=np.float32),
        'first_frame': _video_feature((cfg.height, cfg.width, 3)),
        'caption': tfds.features.Text(),
        'caption_id': np.int32,
        'text_tokens': tfds.features.Tensor(shape=(captions.MAX_LEN,), dtype=np.int32),
        'seed': np.int64,
        'source': tfds.features.Text(),
        'clip_start': np.int32,
    }
    if not cfg.store_video:
      del features['video']
    if cfg.text_embedding_shape is not None:
      # zlib: Wan's embeddings are zero after the caption's tokens (most of the 512).
      features['text_embedding'] = tfds.features.Tensor(
          shape=tuple(cfg.text_embedding_shape), dtype=np.float32,
          encoding=tfds.features.Encoding.ZLIB)
    if cfg.encode_fn is not None:
      features['latents'] = tfds.features.Tensor(shape=tuple(cfg.latent_shape), dtype=np.float32)
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                 description='Clips of a local folder of videos.')

  def _video_files(self) -> list[str]:
    folder = self.builder_config.folder
    if not folder or not os.path.isdir(folder):
      raise ValueError(f'LocalVideosConfig.folder={folder!r} is not a folder')
    files = []
    for root, _, names in os.walk(folder):
      files += [os.path.relpath(os.path.join(root, n), folder) for n in names
                if n.lower().endswith(VIDEO_EXTENSIONS)]
    return sorted(files)

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    files = self._video_files()
    splits = {'train': [f for f in files if not _in_validation(f, cfg.validation_fraction)]}
    if cfg.validation_fraction > 0:
      splits['validation'] = [f for f in files if _in_validation(f, cfg.validation_fraction)]
    return {split: self._generate_examples(names) for split, names in splits.items()}

  def _generate_examples(self, relative_paths: list[str]):
    cfg = self.builder_config
    span = (cfg.num_frames - 1) * cfg.frame_step + 1
    skipped = []
    for relative_path in relative_paths:
      path = os.path.join(cfg.folder, relative_path)
      try:
        frames = read_video(path, cfg.max_frames)
        frames = resize_center_crop(frames, cfg.height, cfg.width)
        stem = os.path.splitext(path)[0]
        caption = ''
        if os.path.exists(stem + '.txt'):
          with open(stem + '.txt') as f:
            caption = f.read().strip()
        embedding = None
        if cfg.text_embedding_shape is not None:
          embedding = np.zeros(cfg.text_embedding_shape, np.float32)
          if os.path.exists(stem + '.npy'):
            embedding = np.load(stem + '.npy').astype(np.float32).reshape(
                cfg.text_embedding_shape)
      except Exception as e:  # pylint: disable=broad-except
        # A bad file must never end the build: count it and go on.
        skipped.append((relative_path, f'{type(e).__name__}: {e}'.splitlines()[0][:200]))
        logging.warning('skipping unreadable video %s: %s', path, skipped[-1][1])
        continue
      self.num_files_read += 1
      file_seed = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:4], 'little')
      for start in range(0, len(frames) - span + 1, cfg.clip_stride):
        clip = frames[start:start + span:cfg.frame_step]
        example = {
            'video': clip,
            'controls': np.zeros((cfg.num_frames, 0), np.float32),
            'first_frame': clip[0],
            'caption': caption,
            'caption_id': captions.CAPTIONS.index(caption) if caption in captions.CAPTIONS
                          else -1,
            'text_tokens': captions.tokenize(caption),
            'seed': file_seed,
            'source': relative_path,
            'clip_start': start,
        }
        if embedding is not None:
          example['text_embedding'] = embedding
        if cfg.encode_fn is not None:
          example['latents'] = np.asarray(cfg.encode_fn(clip), np.float32)
        if not cfg.store_video:
          del example['video']
        yield f'{relative_path}:{start}', example
    self.skipped_files += skipped
    message = (f'local videos: read {len(relative_paths) - len(skipped)} of '
               f'{len(relative_paths)} files, skipped {len(skipped)} unreadable')
    logging.warning('%s%s', message, ''.join(f'\n  {p}: {e}' for p, e in skipped))
    print(message + ''.join(f'\n  {p}: {e}' for p, e in skipped))


def build_world(world: str, config: str | WorldBuilderConfig = 'tiny', data_dir: str = '',
                **kwargs: Any) -> tfds.core.DatasetBuilder:
  """Builds (or reuses) the ArrayRecord dataset of `world`; returns the builder."""
  builder = WORLD_BUILDERS[world](config=config, data_dir=data_dir or None,
                                  file_format='array_record', **kwargs)
  builder.download_and_prepare()
  return builder


def build_local_videos(folder: str, data_dir: str, name: str = 'default', *,
                       text_embedding_shape: tuple[int, ...] | None | str = 'auto',
                       **config: Any) -> 'Apt2LocalVideos':
  """Builds (or reuses) the ArrayRecord dataset `apt2_local_videos/<name>` of a video folder.

  `text_embedding_shape='auto'`: the shape of the folder's `.npy` caption embeddings
  (`text_embedding_shape_of`), none when there are none. `config`: more `LocalVideosConfig`
  fields. Read it back with `tfds.data_source('apt2_local_videos/<name>', data_dir=data_dir)`
  (training: `config.data.source='tfds'`, `apt2_jax.train.data`).
  """
  if text_embedding_shape == 'auto':
    text_embedding_shape = text_embedding_shape_of(folder)
  builder = Apt2LocalVideos(
      config=LocalVideosConfig(name=name, folder=folder, text_embedding_shape=text_embedding_shape,
                               **config),
      data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()
  return builder
