"""Prompts on the host: a caption string, token ids or embeddings -> the model's text input."""
from __future__ import annotations

import numpy as np

from apt2_jax.models import DiTConfig


def prepare(text, dit_config: DiTConfig, batch: int, text_len: int) -> np.ndarray:
  """A prompt -> int32 tokens [B, T] or float32 embeddings [B, T, text_dim] for the model.

  `text`: None / "" (the empty prompt), a caption string (tokenised to `text_len` tokens),
  int token ids [T] / [B, T], or embeddings [T, text_dim] / [B, T, text_dim].
  """
  c = dit_config
  if text is None:
    text = ""
  if isinstance(text, str):
    if not c.caption_vocab_size:
      if text:
        raise ValueError("this model takes text embeddings (model.caption_vocab_size == 0); pass "
                         "a float array [T, text_dim], not a string")
      text = np.zeros((1, c.text_dim), np.float32)  # the empty prompt of an embedding model
    else:
      from apt2_jax.data import captions
      text = captions.tokenize(text, text_len)
  arr = np.asarray(text)
  if np.issubdtype(arr.dtype, np.integer):
    if arr.ndim == 1:
      arr = arr[None]
    if arr.max(initial=0) >= max(c.caption_vocab_size, 1) or arr.min(initial=0) < 0:
      raise ValueError(f"text token ids must lie in [0, {c.caption_vocab_size})")
    arr = arr.astype(np.int32)
  else:
    if arr.ndim == 2:
      arr = arr[None]
    if arr.ndim != 3 or arr.shape[-1] != c.text_dim:
      raise ValueError(f"text embeddings must be [T, {c.text_dim}] or [B, T, {c.text_dim}], got {arr.shape}")
    arr = arr.astype(np.float32)
  if arr.shape[0] != batch:
    arr = np.repeat(arr, batch, axis=0)
  return arr
