"""Data benchmark: samples/s and MB/s of the grain pipeline, written as one JSON object.

  python -m apt2_jax.data.benchmark --json_out=/tmp/data_benchmark.json [--size=small]

Measures, per world, (a) the procedural source (worlds rendered on the fly) and (b) reading a
TFDS ArrayRecord dataset built into a temporary folder first (build time reported too). MB/s
counts the bytes of the float32 batches the pipeline yields.
"""
import json
import os
import platform
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
import tqdm

from apt2_jax.data import builders
from apt2_jax.data import pipeline

_JSON_OUT = flags.DEFINE_string('json_out', None, 'Where to write the JSON.', required=True)
_SIZE = flags.DEFINE_enum('size', 'small', ['tiny', 'small', 'base'], 'Pipeline size preset.')
_WORLDS = flags.DEFINE_list('worlds', ['camera', 'puppet', 'bouncing'], 'Worlds to measure.')
_BATCHES = flags.DEFINE_integer('batches', 8, 'Batches timed per measurement.')
_NUM_EXAMPLES = flags.DEFINE_integer('num_examples', 64, 'Train examples built for TFDS.')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'TFDS data_dir (default: a temporary folder).')


def _measure(config, batches: int, label: str) -> dict:
  iterator = iter(pipeline.make_dataset(config, 'train', seed=0))
  next(iterator)  # warm up: thread pool, first reads
  nbytes, samples = 0, 0
  start = time.perf_counter()
  for _ in tqdm.trange(batches, desc=label, leave=False):
    batch = next(iterator)
    nbytes += sum(v.nbytes for v in batch.values())
    samples += batch['video'].shape[0]
  seconds = time.perf_counter() - start
  return {'samples_per_s': samples / seconds, 'mb_per_s': nbytes / seconds / 1e6,
          'batch_mb': nbytes / batches / 1e6, 'seconds': seconds}


def main(argv):
  del argv
  data_dir = _DATA_DIR.value or tempfile.mkdtemp(prefix='apt2_data_bench_')
  results = {'machine': {'cpus': os.cpu_count(), 'platform': platform.platform(),
                         'load_avg_1m': os.getloadavg()[0]},
             'size': _SIZE.value, 'worlds': {}}
  for world in _WORLDS.value:
    config = pipeline.default_data_config(world, _SIZE.value)
    entry = {'height': config.height, 'width': config.width, 'num_frames': config.num_frames,
             'batch_size': config.batch_size}
    entry['procedural'] = _measure(config, _BATCHES.value, f'{world} procedural')
    build_config = builders.WorldBuilderConfig(
        name=f'bench_{_SIZE.value}', height=config.height, width=config.width,
        num_frames=config.stored_num_frames, num_train=_NUM_EXAMPLES.value,
        num_validation=0, num_test=0)
    start = time.perf_counter()
    builders.build_world(world, build_config, data_dir)
    entry['tfds_build_examples_per_s'] = _NUM_EXAMPLES.value / (time.perf_counter() - start)
    config.source = 'tfds'
    config.data_dir = data_dir
    config.tfds_name = f'apt2_{world}/bench_{_SIZE.value}'
    entry['tfds'] = _measure(config, _BATCHES.value, f'{world} tfds')
    results['worlds'][world] = entry
    print(world, json.dumps(entry))
  os.makedirs(os.path.dirname(os.path.abspath(_JSON_OUT.value)), exist_ok=True)
  with open(_JSON_OUT.value, 'w') as f:
    json.dump(results, f, indent=2)
  print(f'wrote {_JSON_OUT.value}')


if __name__ == '__main__':
  app.run(main)
