"""Textures for the synthetic worlds: real photographs and procedural patterns.

Photographs are the sample images that scikit-image ships inside its package (no download).
Procedural textures are seeded. Every texture has a name and a caption word; the names are split
into a `train` pool (also used by `validation`) and a held-out `test` pool, so that the test split's
worlds show textures that never occur in training.

All textures are float32 `[size, size, 3]` in [0, 1].
"""
import functools

import numpy as np
import skimage.data
import skimage.transform

TEXTURE_SIZE = 256

# name -> (kind, source, caption word). kind 'photo': source is the skimage.data function name;
# kind 'procedural': source is the pattern name.
TEXTURES = {
    'astronaut': ('photo', 'astronaut', 'astronaut'),
    'chelsea': ('photo', 'chelsea', 'cat'),
    'coffee': ('photo', 'coffee', 'coffee'),
    'rocket': ('photo', 'rocket', 'rocket'),
    'hubble': ('photo', 'hubble_deep_field', 'galaxies'),
    'grass': ('photo', 'grass', 'grass'),
    'brick': ('photo', 'brick', 'bricks'),
    'coins': ('photo', 'coins', 'coins'),
    'fbm': ('procedural', 'fbm', 'clouds'),
    'stripes': ('procedural', 'stripes', 'stripes'),
    'cells': ('procedural', 'cells', 'cells'),
    # Held out for the test split.
    'cells_photo': ('photo', 'immunohistochemistry', 'tissue'),
    'motorcycle': ('photo', 'stereo_motorcycle', 'motorcycle'),
    'gravel': ('photo', 'gravel', 'gravel'),
    'moon': ('photo', 'moon', 'moon'),
    'checker': ('procedural', 'checker', 'checkerboard'),
    'rings': ('procedural', 'rings', 'rings'),
}

TEXTURE_POOLS = {
    'train': ('astronaut', 'chelsea', 'coffee', 'rocket', 'hubble', 'grass', 'brick', 'coins',
              'fbm', 'stripes', 'cells'),
    'test': ('cells_photo', 'motorcycle', 'gravel', 'moon', 'checker', 'rings'),
}
TEXTURE_POOLS['validation'] = TEXTURE_POOLS['train']

TEXTURE_WORDS = tuple(sorted({word for _, _, word in TEXTURES.values()}))


@functools.lru_cache(maxsize=None)
def _photo(source: str, size: int) -> np.ndarray:
  image = getattr(skimage.data, source)()
  if isinstance(image, tuple):  # stereo pairs
    image = image[0]
  image = np.asarray(image, np.float32)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  image = image[..., :3] / 255.0
  # Centre square crop, then resize.
  h, w = image.shape[:2]
  s = min(h, w)
  image = image[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
  image = skimage.transform.resize(image, (size, size), order=1, anti_aliasing=True)
  image = np.clip(image, 0.0, 1.0).astype(np.float32)
  image.setflags(write=False)
  return image


def _palette(rng: np.random.Generator, n: int) -> np.ndarray:
  """`n` random saturated colours, float [n, 3]."""
  hue = rng.uniform(0, 1, n)
  sat = rng.uniform(0.4, 0.9, n)
  val = rng.uniform(0.5, 1.0, n)
  k = lambda m: (m + hue * 6) % 6
  f = lambda m: val - val * sat * np.clip(np.minimum(k(m), 4 - k(m)), 0, 1)
  return np.stack([f(5), f(3), f(1)], axis=-1)


def _interpolation_matrix(cells: int, size: int) -> np.ndarray:
  """[size, cells + 1] weights that upsample a lattice with a smoothstep fade."""
  position = (np.arange(size) + 0.5) / size * cells
  i = np.minimum(np.floor(position).astype(int), cells - 1)
  f = position - i
  f = f * f * (3 - 2 * f)
  matrix = np.zeros((size, cells + 1))
  matrix[np.arange(size), i] = 1 - f
  matrix[np.arange(size), i + 1] = f
  return matrix


def _value_noise(rng: np.random.Generator, size: int, octaves: int = 5) -> np.ndarray:
  """Fractal value noise in [0, 1], float [size, size]."""
  total = np.zeros((size, size), np.float64)
  amplitude = 1.0
  for octave in range(octaves):
    cells = 2 ** (octave + 2)
    lattice = rng.uniform(0, 1, (cells + 1, cells + 1))
    upsample = _interpolation_matrix(cells, size)
    total += amplitude * (upsample @ lattice @ upsample.T)
    amplitude *= 0.5
  return (total - total.min()) / max(total.max() - total.min(), 1e-6)


def _procedural(pattern: str, rng: np.random.Generator, size: int) -> np.ndarray:
  colours = _palette(rng, 2)
  yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing='ij')
  if pattern == 'fbm':
    mix = _value_noise(rng, size)
  elif pattern == 'stripes':
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(12, 40)
    warp = 8 * _value_noise(rng, size, octaves=3)
    mix = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy + warp) / period)
  elif pattern == 'cells':
    points = rng.uniform(0, size, (24, 2))
    d = np.sqrt((yy[..., None] - points[:, 0]) ** 2 + (xx[..., None] - points[:, 1]) ** 2)
    d.sort(axis=-1)
    mix = np.clip((d[..., 1] - d[..., 0]) / 12.0, 0, 1)
  elif pattern == 'checker':
    period = int(rng.integers(16, 48))
    mix = ((xx // period + yy // period) % 2).astype(np.float64)
  elif pattern == 'rings':
    cy, cx = rng.uniform(0, size, 2)
    period = rng.uniform(10, 30)
    mix = 0.5 + 0.5 * np.cos(2 * np.pi * np.hypot(yy - cy, xx - cx) / period)
  else:
    raise ValueError(f'unknown procedural pattern {pattern!r}')
  shade = 0.85 + 0.15 * _value_noise(rng, size, octaves=4)
  texture = (colours[0] * (1 - mix[..., None]) + colours[1] * mix[..., None]) * shade[..., None]
  return np.clip(texture, 0, 1).astype(np.float32)


def load_texture(name: str, seed: int, size: int = TEXTURE_SIZE) -> np.ndarray:
  """Texture `name` as float32 `[size, size, 3]` in [0, 1].

  Photographs are tinted and flipped by `seed` (grey photographs get a colour); procedural
  patterns are drawn from `seed`.
  """
  kind, source, _ = TEXTURES[name]
  rng = np.random.default_rng(seed)
  if kind == 'procedural':
    return _procedural(source, rng, size)
  image = _photo(source, size)
  if rng.uniform() < 0.5:
    image = image[:, ::-1]
  tint = 0.75 + 0.25 * _palette(rng, 1)[0]
  return np.clip(image * tint, 0, 1).astype(np.float32)


def texture_word(name: str) -> str:
  return TEXTURES[name][2]


def sample_bilinear(texture: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Samples `texture` `[S, S, C]` at texel coordinates `u` (column), `v` (row).

  The texture repeats mirrored, so an infinite plane has no seams. Returns `[*u.shape, C]`.
  """
  size = texture.shape[0]

  def mirror(i):
    i = np.mod(i, 2 * size)
    return np.where(i >= size, 2 * size - 1 - i, i)

  u0 = np.floor(u)
  v0 = np.floor(v)
  fu = (u - u0)[..., None]
  fv = (v - v0)[..., None]
  u0 = u0.astype(np.int64)
  v0 = v0.astype(np.int64)
  iu0, iu1 = mirror(u0), mirror(u0 + 1)
  iv0, iv1 = mirror(v0), mirror(v0 + 1)
  top = texture[iv0, iu0] * (1 - fu) + texture[iv0, iu1] * fu
  bottom = texture[iv1, iu0] * (1 - fu) + texture[iv1, iu1] * fu
  return top * (1 - fv) + bottom * fv
