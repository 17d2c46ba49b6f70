"""Per-host batch iterators of every stage, checkpointable through orbax.

Five sources (`config.data.source`):
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
  "tfds"            a TFDS ArrayRecord dataset through grain (`TFDSClips`), e.g. a folder of your
                    own videos built by `python -m apt2_jax.data.build --world=local`:
                    `config.data.tfds_name` ("apt2_local_videos/<name>"), `config.data.data_dir`.
                    Stored `latents` are used when the dataset has them (`config.data.latents`:
                    "auto" | "stored" | "encode": "encode" always encodes the video on the fly with
                    the stage's frozen VAE); the text is the stored umT5 `text_embedding`
                    float32 [b, L, D] for embedding models (`model.caption_vocab_size == 0`), else
                    `text_tokens`; clips are cropped to `config.data.frames`.

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
    if control_dim:  # +-0.1: inside every control's limits (a camera pan of 0.1 rad per frame)
      controls[:, 1:, 0] = 0.1 * (direction[:, None] * 2.0 - 1.0)
    if c.model.get("caption_vocab_size", 0):
      text = rng.integers(2, c.model.caption_vocab_size, size=(b, d.get("text_len", 8))).astype(np.int32)
    else:  # a text-embedding model (Wan sizes): random embeddings [b, L, text_dim]
      text = rng.normal(size=(b, d.get("text_len", 8), c.model.get("text_dim", 4096))).astype(np.float32)
    out = {"latents": latents, "controls": controls, "text_tokens": text}
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
    self.dataset = self._make_dataset(config, split, process_index, process_count, batch_size)
    self.iterator = iter(self.dataset)
    self._buffer, self._state = None, None

  @staticmethod
  def _make_dataset(config, split, process_index, process_count, batch_size):
    from apt2_jax.data import pipeline
    return pipeline.make_dataset(grain_data_config(config, batch_size, process_count), split,
                                 seed=config.seed, process_index=process_index,
                                 process_count=process_count)

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


class TFDSClips(PipelineBatches):
  """A TFDS ArrayRecord dataset (e.g. `apt2_local_videos/<name>`) as stage batches, through grain:
  per-host slice, shuffle (reshuffled every epoch), repeat, crop, batch; checkpointable.

  Batch: `latents` float32 [b, F, h, w, C] (stored, the first F = latent_frames(frames) of the
  record's; the VAE is causal, so they equal the encoding of the first `frames` frames) or `video`
  float32 [b, frames, H, W, 3] in [-1, 1] (a random window of `frames` frames; the stage
  encodes it); `controls` float32 [b, frames, D]; `text_tokens`: umT5 embeddings float32
  [b, L, D] (`text_embedding`) for embedding models, else int32 [b, text_len] caption tokens.
  A split the dataset lacks (a folder built without `validation_fraction`) falls back to `train`,
  with a warning.
  """

  @staticmethod
  def _make_dataset(config, split, process_index, process_count, batch_size):
    import grain
    import tensorflow_datasets as tfds
    from absl import logging
    from apt2_jax.data import builders  # noqa: F401  (registers the builders)
    d, m = config.data, config.model
    name, data_dir = d.get("tfds_name", ""), d.get("data_dir", "") or None
    if not name:
      raise ValueError("config.data.source='tfds' needs config.data.tfds_name (e.g. "
                       "apt2_local_videos/<name>, built by `python -m apt2_jax.data.build`)")
    info = tfds.builder(name, data_dir=data_dir).info
    if split not in info.splits or not info.splits[split].num_examples:
      logging.warning("%s has no %r examples: using 'train'", name, split)
      split = "train"
    features = info.features
    mode = d.get("latents", "auto")
    if mode not in ("auto", "stored", "encode"):
      raise ValueError(f"config.data.latents={mode!r} is not one of 'auto', 'stored', 'encode'")
    use_latents = "latents" in features and mode != "encode"
    if mode == "stored" and "latents" not in features:
      raise ValueError(f"config.data.latents='stored' but {name} holds no latents (build it with --vae)")
    if not use_latents and "video" not in features:
      raise ValueError(f"{name} holds no video to encode (built with --store_video=false): use its latents")
    frames = int(d.frames)
    ref = features["latents"].shape if use_latents else features["video"].shape
    stored_frames = features["controls"].shape[0]
    scale = vae_lib.SPATIAL_FACTOR if use_latents else 1
    if (ref[1] * scale, ref[2] * scale) != (int(d.height), int(d.width)):
      raise ValueError(f"{name} holds {ref[2] * scale}x{ref[1] * scale} clips; config.data.width x height "
                       f"is {d.width}x{d.height}")
    if frames > stored_frames:
      raise ValueError(f"config.data.frames={frames} is longer than {name}'s {stored_frames}-frame clips")
    control_dim = features["controls"].shape[-1]
    if int(m.get("control_channels", 0)) and not control_dim:
      raise ValueError(f"{name} has no controls: set --config.model.control_channels=0 "
                       "--config.data.control_dim=0")
    embeddings = not m.get("caption_vocab_size", 0)
    if embeddings:
      if "text_embedding" not in features:
        raise ValueError(f"the model takes text embeddings (model.caption_vocab_size=0) but {name} has "
                         "none: embed the captions (python -m apt2_jax.tools.embed_captions) and rebuild")
      if features["text_embedding"].shape[-1] != int(m.get("text_dim", 0)):
        raise ValueError(f"{name}'s text embeddings are {features['text_embedding'].shape[-1]}-d, "
                         f"model.text_dim={m.get('text_dim')}")
    latent_count = vae_lib.latent_frames(frames)
    text_len = int(d.get("text_len", 16))
    crop_random = d.get("temporal_crop", "random") == "random"

    def crop(record, rng: np.random.Generator):
      start = 0
      if not use_latents and crop_random:
        start = int(rng.integers(0, stored_frames - frames + 1))
      out = {"controls": np.asarray(record["controls"][start:start + frames], np.float32)}
      if use_latents:
        out["latents"] = np.asarray(record["latents"][:latent_count], np.float32)
      else:
        out["video"] = np.asarray(record["video"][start:start + frames], np.float32) / 127.5 - 1.0
      if embeddings:
        out["text_tokens"] = np.asarray(record["text_embedding"], np.float32)
      else:
        out["text_tokens"] = np.asarray(record["text_tokens"][:text_len], np.int32)
      return out

    source = tfds.data_source(name, split=split, data_dir=data_dir)
    ds = grain.MapDataset.source(source).seed(int(config.seed))
    ds = ds[process_index::process_count].shuffle().repeat(None).random_map(crop)
    ds = ds.batch(int(batch_size or config.batch_size) // process_count, drop_remainder=True)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=int(d.get("read_threads", 2)),
                                                prefetch_buffer_size=4))


SOURCES = ("pipeline", "worlds", "random_latents", "random", "tfds")


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
  if source == "tfds":
    return TFDSClips(config, split, pi, pc, batch_size)
  raise ValueError(f"config.data.source={source!r} is not one of {SOURCES}")
