"""Fixed, small caption vocabulary for the synthetic worlds.

Every caption comes from one template per world; `CAPTIONS` enumerates all of them, so a caption's
id is its index there. `tokenize` maps a caption to a fixed-length int32 vector (0 = padding,
1 = unknown word), which is what the DiT's text cross-attention consumes in the toy pipeline.
"""
import itertools

import numpy as np

from apt2_jax.data import textures

MAX_LEN = 16
PAD_ID = 0
UNK_ID = 1

CAMERA_MOTIONS = ('drifts', 'circles', 'glides', 'spirals')
PUPPET_COLOURS = ('red', 'green', 'blue', 'yellow', 'purple', 'orange', 'white', 'black')
PUPPET_MOTIONS = ('walks', 'waves', 'jumps', 'dances', 'kicks')
BOUNCING_COUNTS = ('two', 'three', 'four', 'five')
# Panorama world (`apt2_jax.data.panorama`): trajectory words (wander, bursty) and palette names;
# the first four palettes are the training appearance, the last two the unseen one.
PANORAMA_MOTIONS = ('wanders', 'darts')
PANORAMA_PALETTES = ('sunset', 'meadow', 'ocean', 'desert', 'neon', 'aurora')


def camera_caption(motion: str, ground: str) -> str:
  return f'a camera {motion} over {ground}'


def puppet_caption(colour: str, motion: str, background: str) -> str:
  return f'a {colour} puppet {motion} in front of {background}'


def bouncing_caption(count: str, background: str) -> str:
  return f'{count} shapes bounce over {background}'


def panorama_caption(motion: str, palette: str) -> str:
  return f'a camera {motion} around the {palette} panorama'


def _all_captions() -> tuple[str, ...]:
  words = textures.TEXTURE_WORDS
  captions = [camera_caption(m, g) for m, g in itertools.product(CAMERA_MOTIONS, words)]
  captions += [puppet_caption(c, m, b)
               for c, m, b in itertools.product(PUPPET_COLOURS, PUPPET_MOTIONS, words)]
  captions += [bouncing_caption(n, b) for n, b in itertools.product(BOUNCING_COUNTS, words)]
  return tuple(captions)


def _panorama_captions() -> tuple[str, ...]:
  return tuple(panorama_caption(m, p)
               for m, p in itertools.product(PANORAMA_MOTIONS, PANORAMA_PALETTES))


# Later worlds' captions and words are appended, so earlier caption and word ids never change.
_FIRST_CAPTIONS = _all_captions()
CAPTIONS = _FIRST_CAPTIONS + _panorama_captions()
_CAPTION_IDS = {caption: i for i, caption in enumerate(CAPTIONS)}

_FIRST_WORDS = tuple(sorted({w for c in _FIRST_CAPTIONS for w in c.split()}))
VOCAB = ('<pad>', '<unk>') + _FIRST_WORDS + tuple(
    sorted({w for c in CAPTIONS for w in c.split()} - set(_FIRST_WORDS)))
VOCAB_SIZE = len(VOCAB)
_WORD_IDS = {w: i for i, w in enumerate(VOCAB)}


def caption_id(caption: str) -> int:
  """Index of `caption` in `CAPTIONS`; raises KeyError for a caption outside the vocabulary."""
  return _CAPTION_IDS[caption]


def tokenize(caption: str, max_len: int = MAX_LEN) -> np.ndarray:
  """Caption -> int32 `[max_len]` word ids, zero padded (unknown words -> `UNK_ID`)."""
  ids = [_WORD_IDS.get(w, UNK_ID) for w in caption.lower().split()][:max_len]
  tokens = np.zeros((max_len,), np.int32)
  tokens[:len(ids)] = ids
  return tokens


def detokenize(tokens: np.ndarray) -> str:
  return ' '.join(VOCAB[int(t)] for t in tokens if t != PAD_ID)
