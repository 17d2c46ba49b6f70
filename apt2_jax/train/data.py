"""Per-host batch iterators of every stage, checkpointable through orbax.

Four sources (`config.data.source`):
  "pipeline"        the synthetic worlds through grain (`apt2_jax.data.pipeline.make_dataset`):
                    `video` uint8 [b, T, H, W, 3], `controls` float32 [b, T, control_dim],
                    `text_tokens` int32 [b, L]; the stage encodes the video with the frozen VAE.
  "worlds"          no grain, no files: a pool of `config.data.pool_size` clips of the world
                    rendered in process at start (`apt2_jax.data.worlds`), cycled in a seeded
                    order; same keys as "pipeline". For quick real runs before a dataset exists.
  "random_latents"  no dataset, no VAE: latents drawn per step from `(seed, split, step)`, a
                    pattern that translates by the per-frame control, so there is something to
                    learn: `latents` float32 [b, F, h, w, C], `controls` [b, T, control_dim],
                    `text_tokens` [b, L]. Tests and throughput runs use it.
  "random"          no dataset: smooth random videos drawn per step from `(seed, split, step)`,
                    `video` float32 [b, T, H, W, 3] in [-1, 1] (VAE smoke runs and tests).

b = config.batch_size / process_count rows per host; the random sources draw the global batch and
keep this host's rows, so any process count sees the same global batch (the multi-host test
relies on it). `get_state`/`set_state` speak bytes (JSON), the protocol of grain's orbax handler.
"""
from __future__ import annotations

import json

import jax
import numpy as np

from apt2_jax.models import vae as vae_lib

TEMPORAL, SPATIAL = vae_lib.TEMPORAL_FACTOR, vae_lib.SPATIAL_FACTOR
SPLIT_OFFSETS = {"train": 0, "validation": 1, "test": 2}


def latent_shape(config):
  """(latent frames, latent height, latent width) of `config.data`'s video clips."""
  d = config.data
  return vae_lib.latent_frames(d.frames), d.height // SPATIAL, d.width // SPATIAL


class RandomLatents:
  """Deterministic random latent clips; state = the number of batches drawn."""

  def __init__(self, config, split: str, process_index: int, process_count: int, batch_size=None):
    self.config, self.split = config, split
    self.batch = int(batch_size or config.batch_size)
    self.rows = slice(process_index * self.batch // process_count,
                      (process_index + 1) * self.batch // process_count)
    self.count = 0

  def _draw(self, n):
    c, d = self.config, self.config.data
    f, h, w = latent_shape(c)
    ch = c.model.latent_channels
    rng = np.random.default_rng([c.seed, SPLIT_OFFSETS[self.split], n])
    b = self.batch
    base = rng.normal(size=(b, h + f, w + f, ch)).astype(np.float32)
    # Frame j is the base pattern moved by j pixels along a per-clip direction (the control).
    direction = rng.integers(0, 2, size=(b,))
    latents = np.stack([np.stack([base[i, j:j + h, :w] if direction[i] else base[i, :h, j:j + w]
                                  for j in range(f)]) for i in range(b)])
    control_dim = int(d.get("control_dim", 0))
    controls = np.zeros((b, d.frames, control_dim), np.float32)
    if control_dim:
      controls[:, 1:, 0] = direction[:, None] * 2.0 - 1.0
    tokens = rng.integers(2, c.model.get("caption_vocab_size", 0) or 3, size=(b, d.get("text_len", 8)))
    out = {"latents": latents, "controls": controls, "text_tokens": tokens.astype(np.int32)}
    return {k: v[self.rows] for k, v in out.items()}

  def peek(self):
    return self._draw(self.count)

  def __iter__(self):
    return self

  def __next__(self):
    out = self._draw(self.count)
    self.count += 1
    return out

  def get_state(self) -> bytes:
    return json.dumps({"count": self.count}).encode()

  def set_state(self, state: bytes):
    self.count = int(json.loads(state)["count"])

  def start_prefetch(self):
    pass


def random_smooth_videos(rng: np.random.Generator, batch: int, frames: int, height: int,
                         width: int) -> np.ndarray:
  """Smooth random videos in [-1, 1], `[batch, frames, height, width, 3]` float32.

  A coarse random field drifting in time (random walk), upsampled bilinearly and squashed: enough
  structure for a VAE to learn, no dataset needed (tests, smoke runs).
  """
  ch, cw = max(2, height // 8), max(2, width // 8)
  steps = rng.normal(size=(batch, frames, ch, cw, 3)).astype(np.float32) * 0.3
  steps[:, 0] *= 5.0
  coarse = np.cumsum(steps, axis=1)
  video = jax.image.resize(coarse, (batch, frames, height, width, 3), "linear")
  return np.asarray(np.tanh(video), np.float32)


class RandomVideos(RandomLatents):
  """Deterministic smooth random videos (`random_smooth_videos`); state = batches drawn."""

  def _draw(self, n):
    d = self.config.data
    rng = np.random.default_rng([self.config.seed, SPLIT_OFFSETS[self.split], n])
    video = random_smooth_videos(rng, self.batch, int(d.frames), int(d.height), int(d.width))
    return {"video": video[self.rows]}


class WorldClips(RandomLatents):
  """A rendered pool of world clips; batch n holds pool entries `perm_epoch[(n * B) % P ...]`."""

  def __init__(self, config, split, process_index, process_count, batch_size=None):
    super().__init__(config, split, process_index, process_count, batch_size)
    from apt2_jax.data import worlds
    d = config.data
    world = worlds.make_world(d.get("world", "camera"), worlds.WorldConfig(height=d.height, width=d.width, num_frames=d.frames))
    size = int(d.get("pool_size", 64))
    clips = [world.sample(seed=worlds.split_seed(split, i)) for i in range(size)]
    self.pool = {k: np.stack([c[k] for c in clips]) for k in ("video", "controls", "text_tokens")}
    self.pool["text_tokens"] = self.pool["text_tokens"][:, :d.get("text_len", 16)]

  def encode_pool(self, encode, chunk: int):
    """Replaces the pool's `video` by `latents = encode(video chunk)`, `chunk` clips at a time
    (`config.data.pre_encode`): the frozen VAE runs once per clip instead of once per batch."""
    video = self.pool.pop("video")
    parts = [np.asarray(encode(video[i:i + chunk])) for i in range(0, len(video), chunk)]
    self.pool["latents"] = np.concatenate(parts).astype(np.float32)

  def _draw(self, n):
    size = len(next(iter(self.pool.values())))
    order = []
    start = n * self.batch
    for i in range(start, start + self.batch):
      epoch, j = divmod(i, size)
      order.append(np.random.default_rng([self.config.seed, SPLIT_OFFSETS[self.split], epoch]).permutation(size)[j])
    return {k: v[np.asarray(order)][self.rows] for k, v in self.pool.items()}


def grain_data_config(config, batch_size=None, process_count: int = 1):
  """The data pipeline's config (`apt2_jax.data.pipeline.default_data_config`) for a stage config.

  Stage fields map as: data.world, data.height, data.width, data.frames -> num_frames (after the
  random temporal crop), batch_size / process_count rows per host, seed. Optional stage fields
  passed through: data.grain_source ("procedural": render on the fly; "tfds": read ArrayRecord
  built by `python -m apt2_jax.data.build`), data.tfds_name, data.data_dir, data.stored_frames,
  data.read_threads, data.worker_count, data.num_train / num_validation / num_test (0: unbounded,
  a fresh procedural world for every example), data.world_options (WorldConfig fields).
  """
  from apt2_jax.data import pipeline
  d = config.data
  c = pipeline.default_data_config(d.get("world", "camera"), "tiny")
  c.source = d.get("grain_source", "procedural")
  c.height, c.width, c.num_frames = int(d.height), int(d.width), int(d.frames)
  c.stored_num_frames = max(int(d.get("stored_frames", 0) or 0), int(d.frames))
  c.batch_size = int(batch_size or config.batch_size) // process_count
  c.seed = int(config.seed)
  for key in ("tfds_name", "data_dir", "read_threads", "worker_count", "num_train", "num_validation", "num_test"):
    if d.get(key, None) not in (None, ""):
      c[key] = d[key]
  if d.get("world_options", None):  # WorldConfig fields (e.g. the panorama's burst settings)
    c.world_options = dict(d.world_options)
  return c


class PipelineBatches:
  """Wraps the grain iterator of `apt2_jax.data.pipeline` (per-host slices of the worlds)."""

  def __init__(self, config, split: str, process_index: int, process_count: int, batch_size=None):
    from apt2_jax.data import pipeline
    self.dataset = pipeline.make_dataset(grain_data_config(config, batch_size, process_count), split,
                                         seed=config.seed, process_index=process_index,
                                         process_count=process_count)
    self.iterator = iter(self.dataset)
    self._buffer, self._state = None, None

  def _inner_state(self):
    state = self.iterator.get_state()
    return state.decode() if isinstance(state, bytes) else state

  def peek(self):
    if self._buffer is None:
      self._state = self._inner_state()
      self._buffer = self._convert(next(self.iterator))
    return self._buffer

  def __iter__(self):
    return self

  def __next__(self):
    if self._buffer is not None:
      out, self._buffer, self._state = self._buffer, None, None
      return out
    return self._convert(next(self.iterator))

  @staticmethod
  def _convert(batch):
    keys = ("video", "controls", "text_tokens", "latents")
    return {k: np.asarray(batch[k]) for k in keys if k in batch}

  def get_state(self) -> bytes:
    state = self._state if self._buffer is not None else self._inner_state()
    return json.dumps({"inner": state}).encode()

  def set_state(self, state: bytes):
    inner = json.loads(state)["inner"]
    current = self.iterator.get_state()
    self.iterator.set_state(inner.encode() if isinstance(current, bytes) else inner)
    self._buffer, self._state = None, None

  def start_prefetch(self):
    pass


SOURCES = ("pipeline", "worlds", "random_latents", "random")


def make_iterator(config, split: str, batch_size=None):
  """This host's iterator over `config.data.source` (`peek`, `get_state`/`set_state`)."""
  source = config.data.source
  pi, pc = jax.process_index(), jax.process_count()
  if source == "random_latents":
    return RandomLatents(config, split, pi, pc, batch_size)
  if source == "random":
    return RandomVideos(config, split, pi, pc, batch_size)
  if source == "pipeline":
    return PipelineBatches(config, split, pi, pc, batch_size)
  if source == "worlds":
    return WorldClips(config, split, pi, pc, batch_size)
  raise ValueError(f"config.data.source={source!r} is not one of {SOURCES}")
