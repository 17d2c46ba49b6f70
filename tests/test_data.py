"""Tests of apt2_jax.data: worlds, oracle, controls, TFDS builders, grain pipeline."""
import os

import grain
import jax
import numpy as np
import pytest

from apt2_jax import controls
from apt2_jax.data import builders
from apt2_jax.data import captions
from apt2_jax.data import controls as data_controls
from apt2_jax.data import pipeline
from apt2_jax.data import worlds

SMALL = worlds.WorldConfig(height=16, width=16, num_frames=9)
TEST_BUILD = builders.WorldBuilderConfig(name='unittest', height=16, width=16, num_frames=9,
                                         num_train=4, num_validation=2, num_test=3)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """Tiny ArrayRecord datasets of every world: {world: (builder, data sources)}."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  out = {}
  for world in worlds.WORLD_NAMES:
    builder = builders.build_world(world, TEST_BUILD, data_dir)
    out[world] = (builder, builder.as_data_source())
  return out


# ---------------------------------------------------------------------------------------------
# Worlds
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name,dim', [('camera', 5), ('puppet', 30), ('bouncing', 0)])
def test_sample_shapes_and_dtypes(name, dim):
  world = worlds.make_world(name, SMALL, seed=3)
  example = world.sample()
  assert example['video'].shape == (9, 16, 16, 3) and example['video'].dtype == np.uint8
  assert example['controls'].shape == (9, dim) and example['controls'].dtype == np.float32
  np.testing.assert_array_equal(example['first_frame'], example['video'][0])
  assert example['seed'] == 3
  assert captions.CAPTIONS[example['caption_id']] == example['caption']
  assert captions.detokenize(example['text_tokens']) == example['caption']
  assert example['text_tokens'].dtype == np.int32
  assert example['text_tokens'].max() < captions.VOCAB_SIZE
  assert example['video'].std() > 5  # not a blank frame
  if name == 'camera':
    np.testing.assert_array_equal(example['controls'][0], 0)
  if name != 'bouncing':  # controlled worlds move
    assert np.abs(np.diff(example['video'].astype(float), axis=0)).mean() > 0.5
  with pytest.raises(ValueError, match='1 \\+ 4k'):
    world.sample(num_frames=8)


def test_oracle_follows_new_controls():
  """render() of a different trajectory from the same world state differs, but starts equal."""
  world = worlds.make_world('camera', SMALL)
  example = world.sample(11)
  other = world.random_controls(np.random.default_rng(5), 9, seed=11)
  video = world.render(other, 11)
  np.testing.assert_array_equal(video[0], example['video'][0])
  assert np.abs(video[-1].astype(float) - example['video'][-1]).mean() > 1.0
  keys = np.stack([controls.camera_control_from_keys([])] +
                  [controls.camera_control_from_keys(['w', 'd'])] * 4)
  assert world.render(keys, 11).shape == (5, 16, 16, 3)


def test_relative_camera_controls_compose_to_absolute_trajectory():
  world = worlds.make_world('camera', SMALL)
  example = world.sample(7, num_frames=17)
  poses = example['poses'].astype(np.float64)
  rotations, positions, log_focals = poses[:, :9].reshape(-1, 3, 3), poses[:, 9:12], poses[:, 12]
  scene = world.scene(7)
  # Frame 0 is the world's start pose; later frames compose the relative controls.
  np.testing.assert_allclose(rotations[0], scene['rotation'], atol=1e-6)
  np.testing.assert_allclose(positions[0], scene['position'], atol=1e-5)
  composed = worlds.compose_camera(example['controls'], scene['rotation'], scene['position'])
  for got, want in zip(composed, (rotations, positions, log_focals)):
    np.testing.assert_allclose(got, want, atol=1e-5)
  recovered = worlds.relative_from_absolute(rotations, positions, log_focals)
  np.testing.assert_allclose(recovered, example['controls'], atol=1e-5)
  # A known case: pan by a quarter turn in 10 steps turns the optical axis by 90 degrees.
  steps = np.zeros((11, 5))
  steps[1:, 0] = np.pi / 20
  r, _, _ = worlds.compose_camera(steps, np.eye(3), np.zeros(3))
  np.testing.assert_allclose(r[-1][:, 2], [1, 0, 0], atol=1e-12)


def test_held_out_pools_are_disjoint():
  assert not set(worlds.CameraWorld.trajectory_pools['train']) >= {'spiral'}
  for world in ('camera', 'puppet'):
    cls = type(worlds.make_world(world))
    held_out = set(cls.trajectory_pools['test']) - set(cls.trajectory_pools['train'])
    assert held_out
  from apt2_jax.data import textures
  assert not set(textures.TEXTURE_POOLS['train']) & set(textures.TEXTURE_POOLS['test'])
  assert worlds.seed_split(worlds.split_seed('test', 5)) == 'test'
  assert worlds.seed_split(worlds.split_seed('validation', 0)) == 'validation'


# ---------------------------------------------------------------------------------------------
# Controls
# ---------------------------------------------------------------------------------------------

def test_validate_controls_and_keys():
  with pytest.raises(ValueError, match=r'controls\[2, 1\] \(tilt\)'):
    bad = np.zeros((3, 5))
    bad[2, 1] = 0.5
    data_controls.validate_controls(bad, 'camera')
  with pytest.raises(ValueError, match='nan|outside'):
    data_controls.validate_controls(np.full((1, 30), np.nan), 'puppet')
  assert data_controls.control_names('puppet')[:2] == ('head.x', 'head.y')
  # The strongest key combinations are valid camera controls of the world.
  keys = [controls.camera_control_from_keys(k) for k in (['w', 'd', 'arrowup', 'e', '+'],
                                                        ['s', 'a', 'arrowdown', 'q', '-'])]
  data_controls.validate_controls(np.stack(keys), 'camera')
  data_controls.validate_controls(controls.REST_POSE.reshape(1, 30), 'puppet')


# ---------------------------------------------------------------------------------------------
# TFDS builders
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', worlds.WORLD_NAMES)
def test_tfds_records_match_oracle(built, name):
  builder, sources = built[name]
  assert {s: len(d) for s, d in sources.items()} == {'train': 4, 'validation': 2, 'test': 3}
  world = worlds.make_world(name, builder.builder_config.world_config())
  for split in ('train', 'test'):
    record = sources[split][1]
    assert record['video'].dtype == np.uint8 and record['video'].shape == (9, 16, 16, 3)
    assert worlds.seed_split(record['seed']) == split
    # The oracle's render of the recorded controls reproduces the stored frames exactly.
    np.testing.assert_array_equal(world.render(record['controls'], record['seed']),
                                  record['video'])


def test_tfds_test_worlds_not_in_train(built):
  for name in worlds.WORLD_NAMES:
    sources = built[name][1]
    def field(split, key):
      return {sources[split][i][key] for i in range(len(sources[split]))}
    assert not field('train', 'seed') & field('test', 'seed')
    assert not field('validation', 'seed') & field('train', 'seed')
    train_textures = {t for s in field('train', 'textures') for t in s.split(b',')}
    test_textures = {t for s in field('test', 'textures') for t in s.split(b',')}
    assert train_textures and test_textures and not train_textures & test_textures


def _write_video(path, frames, codec):
  import imageio_ffmpeg
  height, width = frames.shape[1:3]
  writer = imageio_ffmpeg.write_frames(path, (width, height), fps=8, codec=codec,
                                       macro_block_size=1, output_params=['-loglevel', 'error'])
  writer.send(None)
  for frame in frames:
    writer.send(np.ascontiguousarray(frame))
  writer.close()


def test_local_folder_builder_skips_corrupt_file(tmp_path):
  folder = tmp_path / 'videos'
  (folder / 'sub').mkdir(parents=True)
  t = np.arange(12)[:, None, None, None]
  ramp = np.broadcast_to(np.clip(t * 20, 0, 255), (12, 24, 40, 3)).astype(np.uint8)
  _write_video(str(folder / 'ramp.mp4'), ramp, 'libx264')
  _write_video(str(folder / 'sub' / 'flat.webm'), np.full((9, 32, 32, 3), 200, np.uint8),
               'libvpx')
  (folder / 'ramp.txt').write_text('a camera drifts over grass')
  (folder / 'broken.mov').write_bytes(os.urandom(3000))
  (folder / 'notes.md').write_text('not a video')
  config = builders.LocalVideosConfig(name='unittest', folder=str(folder), num_frames=5,
                                      clip_stride=4, height=16, width=16,
                                      text_embedding_shape=(2, 3))
  builder = builders.Apt2LocalVideos(config=config, data_dir=str(tmp_path / 'tfds'),
                                     file_format='array_record')
  builder.download_and_prepare()
  assert [p for p, _ in builder.skipped_files] == ['broken.mov']
  assert builder.num_files_read == 2
  source = builder.as_data_source()['train']
  records = [source[i] for i in range(len(source))]
  by_file = {}
  for r in records:
    by_file.setdefault(r['source'], []).append(r)
  # 12 frames -> clips at 0, 4; 9 frames -> clips at 0, 4.
  assert {k: len(v) for k, v in by_file.items()} == {b'ramp.mp4': 2, b'sub/flat.webm': 2}
  ramp_clip = [r for r in by_file[b'ramp.mp4'] if r['clip_start'] == 4][0]
  assert ramp_clip['video'].shape == (5, 16, 16, 3)
  np.testing.assert_allclose(ramp_clip['video'].mean(axis=(1, 2, 3)), t[4:9, 0, 0, 0] * 20,
                             atol=6)
  assert ramp_clip['caption'] == b'a camera drifts over grass'
  assert ramp_clip['caption_id'] == captions.caption_id('a camera drifts over grass')
  assert ramp_clip['text_embedding'].shape == (2, 3)


# ---------------------------------------------------------------------------------------------
# Grain pipeline
# ---------------------------------------------------------------------------------------------

def _check_batch(batch, world, b=2, t=9, size=16):
  assert batch['video'].shape == (b, t, size, size, 3) and batch['video'].dtype == np.float32
  assert -1.0 <= batch['video'].min() and batch['video'].max() <= 1.0
  np.testing.assert_array_equal(batch['first_frame'], batch['video'][:, 0])
  assert batch['text_tokens'].shape == (b, captions.MAX_LEN)
  assert batch['text_tokens'].dtype == np.int32
  dim = controls.CONTROL_DIM[controls.WORLD_CONTROL_TYPES[world]]
  assert batch['controls'].shape == (b, t, dim) and batch['controls'].dtype == np.float32
  assert 'control_maps' not in batch  # the trainer encodes raw controls (apt2_jax.controls)


def _tiny_config(world, **overrides):
  config = pipeline.default_data_config(world, 'tiny')
  config.height = config.width = 16
  config.stored_num_frames = 9
  config.num_frames = 5
  config.update(overrides)
  return config


@pytest.mark.parametrize('world', worlds.WORLD_NAMES)
def test_procedural_pipeline(world):
  batch = next(iter(pipeline.make_dataset(_tiny_config(world), 'train', seed=1)))
  _check_batch(batch, world, t=5)
  if world == 'camera':
    np.testing.assert_array_equal(batch['controls'][:, 0], 0)  # crop resets frame 0


def test_tfds_pipeline_and_iterator_restore(built, tmp_path):
  config = _tiny_config('puppet', source='tfds', tfds_name='apt2_puppet/unittest',
                        data_dir=os.path.dirname(os.path.dirname(os.path.dirname(
                            built['puppet'][0].data_dir))), stored_num_frames=9)
  ds = pipeline.make_dataset(config, 'train', seed=4)
  iterator = iter(ds)
  for _ in range(3):  # past one epoch of 4 examples
    _check_batch(next(iterator), 'puppet', t=5)
  path = str(tmp_path / 'iterator.json')
  pipeline.save_iterator_state(iterator, path)
  expected = next(iterator)
  restored = iter(ds)
  pipeline.restore_iterator_state(restored, path)
  got = next(restored)
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key])


def test_per_process_slices_are_disjoint():
  seeds = []
  for index in range(2):
    config = _tiny_config('bouncing', num_train=8, shuffle=False, num_epochs=1, batch_size=4)
    it = iter(pipeline.make_dataset(config, 'train', process_index=index, process_count=2))
    seeds.append({int(s) for s in next(it)['seed']})
  assert len(seeds[0]) == 4 and not seeds[0] & seeds[1]


def test_to_global_batch(devices):
  mesh = jax.make_mesh((4, 2), ('data', 'tensor'), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  config = _tiny_config('camera', batch_size=8)
  batch = next(iter(pipeline.make_dataset(config, 'train')))
  global_batch = pipeline.to_global_batch(batch, mesh)
  assert global_batch['video'].shape == batch['video'].shape
  assert global_batch['video'].sharding.spec == jax.sharding.PartitionSpec(('data',))
  np.testing.assert_array_equal(np.asarray(global_batch['controls']), batch['controls'])


def test_validate_data_config():
  with pytest.raises(ValueError, match='data_config.num_frames'):
    pipeline.make_dataset(_tiny_config('camera', num_frames=6), 'train')
  with pytest.raises(ValueError, match='data_config.world'):
    pipeline.make_dataset(_tiny_config('nope'), 'train')


def test_iterator_state_with_orbax(tmp_path):
  import orbax.checkpoint as ocp
  ds = pipeline.make_dataset(_tiny_config('bouncing'), 'train', seed=2)
  iterator = iter(ds)
  next(iterator)
  manager = ocp.CheckpointManager(str(tmp_path / 'ckpt'),
                                  item_handlers={'data': grain.checkpoint.CheckpointHandler()})
  manager.save(1, args=ocp.args.Composite(data=pipeline.iterator_save_args(iterator)))
  manager.wait_until_finished()
  expected = next(iterator)
  restored = iter(ds)
  manager.restore(1, args=ocp.args.Composite(data=pipeline.iterator_restore_args(restored)))
  np.testing.assert_array_equal(next(restored)['video'], expected['video'])
