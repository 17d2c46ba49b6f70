"""Grain input pipeline: worlds (generated on the fly) or TFDS ArrayRecord -> model batches.

  ds = make_dataset(default_data_config('camera', 'tiny'), 'train', seed=0)
  it = iter(ds)                      # grain DatasetIterator: get_state() / set_state()
  batch = next(it)                   # dict of numpy arrays, see below
  global_batch = to_global_batch(batch, mesh)

Batch (per process; B = data_config.batch_size, T = data_config.num_frames):
  video        float32 [B, T, H, W, 3] in [-1, 1]
  first_frame  float32 [B, H, W, 3] in [-1, 1] (= video[:, 0])
  controls     float32 [B, T, D] raw per-frame controls (camera: relative pose, frame 0 zeros);
               the trainer encodes them into control channels (`apt2_jax.controls`)
  text_tokens  int32 [B, captions.MAX_LEN]
  caption_id   int32 [B] (-1: caption outside the fixed vocabulary)
  seed         int64 [B]

Procedural sources render example `i` of a split from seed `worlds.split_seed(split, i)`. With
`num_train` (`num_validation`, `num_test`) = 0 a split is unbounded: its whole seed range (2^28
seeds), so every example drawn is a fresh world (new seed, deterministic from the example index,
and the shuffle is a lazy permutation of that range) and no clip repeats in practice.

Pipeline: source -> per-process slice -> shuffle (reshuffled every epoch) -> repeat -> random
temporal crop -> normalise -> batch -> threaded read-ahead (-> optional worker
processes). Everything is seeded, so a restored iterator continues exactly.

Saving the iterator with orbax: add `grain.checkpoint.CheckpointSave(iterator)` to the
`ocp.args.Composite` of a `CheckpointManager.save` and `grain.checkpoint.CheckpointRestore(
iterator)` to the restore (the item's handler is `grain.checkpoint.CheckpointHandler`), see
`iterator_save_args`; or `save_iterator_state` / `restore_iterator_state` (JSON file).
"""
import json
import os
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from apt2_jax import controls as controls_lib
from apt2_jax.data import captions
from apt2_jax.data import worlds

_SIZES = {
    # height/width, stored frames, cropped frames, batch, examples per train/validation/test
    'tiny': (32, 17, 9, 2, (16, 4, 4)),
    'small': (64, 33, 17, 8, (1024, 64, 64)),
    'base': (128, 33, 33, 8, (8192, 256, 256)),
}
SOURCES = ('procedural', 'tfds')


def default_data_config(world: str = 'camera', size: str = 'tiny') -> ml_collections.ConfigDict:
  """Data config with small values for `size='tiny'` (tests) up to `base`."""
  if size not in _SIZES:
    raise ValueError(f'size={size!r}; expected one of {tuple(_SIZES)}')
  resolution, stored, frames, batch, examples = _SIZES[size]
  config = ml_collections.ConfigDict()
  config.source = 'procedural'        # 'procedural': worlds rendered on the fly; 'tfds'
  config.world = world                # camera | puppet | bouncing | panorama | local (tfds only)
  config.tfds_name = ''               # '' -> f'apt2_{world}/{size}'
  config.data_dir = ''
  config.height = resolution
  config.width = resolution
  config.stored_num_frames = stored   # procedural clip length (tfds: the records' length)
  config.num_frames = frames          # after the random temporal crop; 1 + 4k
  config.temporal_crop = 'random'     # 'random' | 'start'
  config.num_train = examples[0]      # procedural split sizes; 0: unbounded (a fresh seed each)
  config.num_validation = examples[1]
  config.num_test = examples[2]
  config.speed = 1.0
  config.world_options = ml_collections.ConfigDict()  # more WorldConfig fields (procedural)
  config.batch_size = batch           # per process
  config.shuffle = True
  config.seed = 0
  config.num_epochs = 0               # 0: repeat forever
  config.latent_downsample = 8
  config.temporal_stride = 4
  config.read_threads = 2
  config.prefetch_buffer_size = 4
  config.worker_count = 0             # > 0: grain worker processes (mp_prefetch)
  return config


def validate_data_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, naming the field, on a value that would break the pipeline later."""
  def fail(field, why):
    raise ValueError(f'data_config.{field}={config.get(field)!r}: {why}')
  if config.source not in SOURCES:
    fail('source', f'expected one of {SOURCES}')
  allowed = worlds.WORLD_NAMES + (('local',) if config.source == 'tfds' else ())
  if config.world not in allowed:
    fail('world', f'expected one of {allowed}')
  for field in ('num_frames', 'stored_num_frames'):
    if (config[field] - 1) % config.temporal_stride or config[field] < 1:
      fail(field, f'frame counts must be 1 + {config.temporal_stride}k')
  if config.num_frames > config.stored_num_frames:
    fail('num_frames', f'longer than stored_num_frames={config.stored_num_frames}')
  for field in ('height', 'width'):
    if config[field] % config.latent_downsample:
      fail(field, f'must be a multiple of latent_downsample={config.latent_downsample}')
  if config.batch_size < 1:
    fail('batch_size', 'must be positive')
  if config.temporal_crop not in ('random', 'start'):
    fail('temporal_crop', "expected 'random' or 'start'")
  for field in ('num_train', 'num_validation', 'num_test'):
    if config.source == 'procedural' and not 0 <= config[field] <= worlds.SPLIT_SIZE:
      fail(field, f'must be in [0, {worlds.SPLIT_SIZE}] (0: unbounded)')


class ProceduralSource:
  """Random-access source rendering world examples on the fly (same records as the TFDS)."""

  def __init__(self, world: str, world_config: worlds.WorldConfig, split: str,
               num_examples: int):
    self.world = worlds.make_world(world, world_config)
    self.split = split
    self.num_examples = num_examples

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.world.sample(worlds.split_seed(self.split, int(index)))

  def __repr__(self) -> str:
    return f'ProceduralSource({self.world.name}, {self.split}, {self.num_examples})'


def make_source(config: ml_collections.ConfigDict, split: str):
  """The random-access source of `split` (a grain RandomAccessDataSource)."""
  if config.source == 'procedural':
    options = {k: tuple(v) if isinstance(v, (list, tuple)) else v
               for k, v in dict(config.get('world_options') or {}).items()}
    world_config = worlds.WorldConfig(height=config.height, width=config.width,
                                      num_frames=config.stored_num_frames, speed=config.speed,
                                      **options)
    sizes = {'train': config.num_train, 'validation': config.num_validation,
             'test': config.num_test}
    return ProceduralSource(config.world, world_config, split,
                            sizes[split] or worlds.SPLIT_SIZE)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from apt2_jax.data import builders  # pylint: disable=g-import-not-at-top,unused-import
  name = config.tfds_name or f'apt2_{config.world}/tiny'
  return tfds.data_source(name, split=split, data_dir=config.data_dir or None)


class _TemporalCrop(grain.transforms.RandomMap):
  """Crops `num_frames` consecutive frames; a camera-controlled world's first relative control
  becomes zero (its previous frame lies outside the clip)."""

  def __init__(self, num_frames: int, world: str, random: bool):
    self.num_frames, self.world, self.random = num_frames, world, random

  def random_map(self, record, rng: np.random.Generator):
    total = record['video'].shape[0]
    start = int(rng.integers(0, total - self.num_frames + 1)) if self.random else 0
    window = slice(start, start + self.num_frames)
    out = dict(record)
    out['video'] = record['video'][window]
    out['controls'] = np.array(record['controls'][window], np.float32)
    if controls_lib.WORLD_CONTROL_TYPES.get(self.world) == 'camera':
      out['controls'][0] = 0.0
    if 'poses' in record:
      out['poses'] = record['poses'][window]
    return out


class _ToModelInputs(grain.transforms.Map):
  """Normalises frames to [-1, 1], drops strings."""

  def map(self, record):
    video = np.asarray(record['video'], np.float32) / 127.5 - 1.0
    controls = np.asarray(record['controls'], np.float32)
    out = {
        'video': video,
        'first_frame': video[0],
        'controls': controls,
        'text_tokens': np.asarray(record['text_tokens'], np.int32),
        'caption_id': np.int32(record['caption_id']),
        'seed': np.int64(record['seed']),
    }
    return out


def make_dataset(data_config: ml_collections.ConfigDict, split: str = 'train', *,
                 seed: int | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
  """The grain pipeline of `split`; `iter()` of it yields batches (see module docstring).

  Args:
    data_config: see `default_data_config`.
    split: 'train', 'validation' or 'test'.
    seed: overrides `data_config.seed` (shuffle order and temporal crops).
    process_index, process_count: this host's slice (defaults: `jax.process_index()`,
      `jax.process_count()`); each process reads every process_count-th example.
  """
  validate_data_config(data_config)
  seed = data_config.seed if seed is None else seed
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  source = make_source(data_config, split)
  ds = grain.MapDataset.source(source).seed(seed)
  ds = ds[process_index::process_count]
  if data_config.shuffle:
    ds = ds.shuffle()
  ds = ds.repeat(data_config.num_epochs or None)
  ds = ds.random_map(_TemporalCrop(data_config.num_frames, data_config.world,
                                   data_config.temporal_crop == 'random'))
  ds = ds.map(_ToModelInputs())
  ds = ds.batch(data_config.batch_size, drop_remainder=True)
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=data_config.read_threads,
      prefetch_buffer_size=data_config.prefetch_buffer_size))
  if data_config.worker_count > 0:
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_config.worker_count))
  return iter_ds


def to_global_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
                    sharding: Any = None) -> dict[str, jax.Array]:
  """Assembles each process's batch into global arrays sharded along the batch axis.

  `sharding`: None (batch axis over the mesh's `data` and `fsdp` axes, whichever exist), a
  `PartitionSpec`, a `Sharding`, or a dict of those per key. Global batch = batch_size x
  process_count.
  """
  def resolve(spec):
    if spec is None:
      axes = tuple(a for a in ('data', 'fsdp') if a in mesh.axis_names)
      spec = jax.sharding.PartitionSpec(axes or None)
    if isinstance(spec, jax.sharding.PartitionSpec):
      spec = jax.sharding.NamedSharding(mesh, spec)
    return spec

  out = {}
  for key, value in batch.items():
    spec = sharding.get(key) if isinstance(sharding, dict) else sharding
    out[key] = jax.make_array_from_process_local_data(resolve(spec), np.asarray(value))
  return out


# ---------------------------------------------------------------------------------------------
# Iterator state
# ---------------------------------------------------------------------------------------------

def iterator_save_args(iterator: grain.DatasetIterator):
  """orbax args saving `iterator`'s state, for `ocp.args.Composite(data=...)`."""
  return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator: grain.DatasetIterator):
  """orbax args restoring into `iterator` (in place), for `ocp.args.Composite(data=...)`."""
  return grain.checkpoint.CheckpointRestore(iterator)


def save_iterator_state(iterator: grain.DatasetIterator, path: str) -> None:
  """Writes `iterator.get_state()` as JSON to `path` (one file per process)."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w') as f:
    json.dump(iterator.get_state(), f)


def restore_iterator_state(iterator: grain.DatasetIterator, path: str) -> None:
  with open(path) as f:
    iterator.set_state(json.load(f))


def caption_vocab_size() -> int:
  return captions.VOCAB_SIZE
