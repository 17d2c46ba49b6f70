"""Prompts on the host: a caption string, token ids or embeddings -> the model's text input.

Models with a caption encoder (`caption_vocab_size > 0`) tokenise strings themselves. Wan-size
models take umT5 embeddings: a caption string reaches them through a `TextEncoder` (Wan2.1's umT5
encoder and tokenizer from a local folder, through `transformers`), set once per process with
`set_text_encoder(folder)` (`sample`/`serve --text_encoder=DIR`); `apt2_jax.tools.embed_captions`
embeds a dataset's captions with the same class, so training and sampling see the same vectors.
"""
from __future__ import annotations

import collections
import html
import os
import re
from typing import Optional, Sequence

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
      if text and _ENCODER is None:
        raise ValueError("this model takes text embeddings (model.caption_vocab_size == 0): pass a "
                         "float array [T, text_dim], or give the umT5 text encoder folder "
                         "(--text_encoder=DIR; generation.prompt.set_text_encoder) to embed strings")
      if text:
        text = _ENCODER.embed_one(text)
        if text.shape[-1] != c.text_dim:
          raise ValueError(f"the text encoder {_ENCODER.path} gives {text.shape[-1]}-d embeddings, the "
                           f"model takes model.text_dim={c.text_dim}")
      else:
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


# ------------------------------------------------------------------------------------------------
# umT5 text encoder (Wan2.1) from a local folder
# ------------------------------------------------------------------------------------------------

WAN_TEXT_LEN = 512  # Wan2.1's prompt length in tokens (max_sequence_length)


def clean_caption(text: str) -> str:
  """Wan's prompt cleaning: HTML entities unescaped, runs of whitespace collapsed (and `ftfy`'s
  mojibake repair when it is installed)."""
  try:
    import ftfy  # pylint: disable=g-import-not-at-top
    text = ftfy.fix_text(text)
  except ImportError:
    pass
  text = html.unescape(html.unescape(text))
  return re.sub(r"\s+", " ", text).strip()


def text_encoder_folders(path: str, tokenizer: Optional[str] = None) -> tuple[str, str]:
  """(encoder folder, tokenizer folder) of `path`: a diffusers Wan pipeline folder (its
  `text_encoder/` and `tokenizer/`), or one folder holding both; `tokenizer` overrides."""
  encoder = path
  if os.path.isdir(os.path.join(path, "text_encoder")):
    encoder = os.path.join(path, "text_encoder")
  if tokenizer is None:
    tokenizer = os.path.join(path, "tokenizer") if os.path.isdir(os.path.join(path, "tokenizer")) else encoder
  for what, folder in (("text encoder", encoder), ("tokenizer", tokenizer)):
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"{what} folder {folder!r} does not exist")
  if not os.path.isfile(os.path.join(encoder, "config.json")):
    raise FileNotFoundError(f"{encoder!r} holds no config.json: expected a Wan2.1 diffusers folder "
                            "(with text_encoder/ and tokenizer/) or a umT5 encoder folder")
  return encoder, tokenizer


class TextEncoder:
  """Wan2.1's text encoder: umT5 (`UMT5EncoderModel`, or any T5 encoder) and its tokenizer, read
  from local folders through `transformers` (nothing is downloaded), run with torch.

  `encode(captions)` follows Wan's pipeline: captions cleaned, tokenised to `max_length` (padded,
  truncated), encoded with the attention mask; positions past each caption's tokens are set to
  zero. Returns float32 [B, max_length, d_model].
  """

  def __init__(self, path: str, *, tokenizer: Optional[str] = None, max_length: int = WAN_TEXT_LEN,
               device: Optional[str] = None, dtype: str = "float32", cache_size: int = 64):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    encoder_dir, tokenizer_dir = text_encoder_folders(path, tokenizer)
    self.path, self.max_length = path, int(max_length)
    self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    config = transformers.AutoConfig.from_pretrained(encoder_dir, local_files_only=True)
    cls = transformers.UMT5EncoderModel if config.model_type == "umt5" else transformers.T5EncoderModel
    self.model = cls.from_pretrained(encoder_dir, local_files_only=True,
                                     dtype=getattr(torch, dtype)).to(self.device).eval()
    self.dim = int(config.d_model)
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._cache_size = int(cache_size)

  def encode(self, captions: Sequence[str]) -> np.ndarray:
    """Captions -> float32 [B, max_length, dim] (Wan: zeros after each caption's tokens)."""
    import torch  # pylint: disable=g-import-not-at-top
    inputs = self.tokenizer([clean_caption(c) for c in captions], padding="max_length",
                            max_length=self.max_length, truncation=True, add_special_tokens=True,
                            return_attention_mask=True, return_tensors="pt")
    mask = inputs.attention_mask.to(self.device)
    with torch.inference_mode():
      hidden = self.model(input_ids=inputs.input_ids.to(self.device), attention_mask=mask).last_hidden_state
      hidden = hidden * mask[..., None].to(hidden.dtype)
    return hidden.float().cpu().numpy().astype(np.float32)

  def embed_one(self, caption: str) -> np.ndarray:
    """One caption -> float32 [max_length, dim], remembered (prompts repeat in a session)."""
    if caption not in self._cache:
      self._cache[caption] = self.encode([caption])[0]
      while len(self._cache) > self._cache_size:
        self._cache.popitem(last=False)
    self._cache.move_to_end(caption)
    return self._cache[caption]

  def encode_batched(self, captions: Sequence[str], batch_size: int = 8, progress: bool = True,
                     desc: str = "embedding captions"):
    """Yields (index range start, embeddings [b, max_length, dim]) over `captions`, `batch_size`
    at a time, with a progress bar."""
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    # disable=None: no bar when stderr is not a terminal
    with tqdm(total=len(captions), desc=desc, unit="caption", disable=None if progress else True) as bar:
      for start in range(0, len(captions), batch_size):
        chunk = list(captions[start:start + batch_size])
        yield start, self.encode(chunk)
        bar.update(len(chunk))


_ENCODER: Optional[TextEncoder] = None


def set_text_encoder(encoder, **kwargs) -> Optional[TextEncoder]:
  """Sets the process's text encoder for caption strings given to embedding models: a folder
  (`TextEncoder(folder, **kwargs)`), a `TextEncoder`, or None to unset. Returns it."""
  global _ENCODER
  _ENCODER = TextEncoder(encoder, **kwargs) if isinstance(encoder, (str, os.PathLike)) else encoder
  return _ENCODER


def text_encoder() -> Optional[TextEncoder]:
  """The text encoder `set_text_encoder` set (None when unset)."""
  return _ENCODER
