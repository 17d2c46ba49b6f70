"""Analytic FLOP counts of the causal DiT (matmuls only), for MFU and AOT projections.

One multiply-add is 2 FLOPs. We count every matmul of a forward pass: the patch embedding (a
strided convolution = one matmul per token), the time MLP and its 6-way modulation projection,
the text projection (and the built-in caption encoder), per block the self-attention projections,
QK^T and AV, the cross-attention (query/output projections, text keys/values, QK^T and AV) and the
FFN, and the output head. Elementwise work (norms, RoPE, softmax, GELU) is left out, as in the
usual MFU convention; `tests/test_flops.py` checks the total against XLA's `cost_analysis()`.

Attention keys: `count="valid"` counts only the keys a query really attends to (the model's useful
work: for the cached step `self + sink + min(index - 1, N)` frames), `count="computed"` the keys
the XLA path multiplies through before masking (the cached step always reads `N + 2` frames, a
whole-clip block-causal pass `2 + min(F - 2, N)` frames per query frame). MFU uses "valid".

Training: the backward pass costs twice the forward (gradients w.r.t. activations and weights);
rematerialised forward passes are recomputation and are not counted (model FLOPs, not hardware
FLOPs).
"""
from __future__ import annotations

import numpy as np

COUNTS = ("valid", "computed")


def _key_frames(mode: str, frames: int, window: int, index, count: str) -> np.ndarray:
  """Key frames seen by each query frame, `[frames]`."""
  if count not in COUNTS:
    raise ValueError(f"count must be one of {COUNTS}, got {count!r}")
  n = window
  if mode == "full":
    return np.full((frames,), frames)
  if mode == "step":
    if index is None:
      raise ValueError("mode='step' needs the cache index of the query frame")
    if count == "computed":
      return np.array([n + 2])
    return np.array([1 + int(index >= 1) + min(max(index - 1, 0), n)])
  if mode == "block_causal":
    i = np.arange(frames)
    if count == "computed":
      return np.full((frames,), 2 + min(max(frames - 2, 0), n))
    return 1 + (i >= 1) + np.minimum(np.maximum(i - 1, 0), n)
  raise ValueError(f"unknown mode {mode!r}")


def forward_flops(config, *, batch: int, frames: int, tokens: int, text_len: int, mode: str,
                  index: int | None = None, count: str = "valid", text_tokens: bool | None = None) -> dict:
  """FLOPs of one forward pass of `CausalDiT(config)`, by component.

  Args:
    config: a `DiTConfig`.
    batch, frames: the noise input is `[batch, frames, h, w, C]`; `tokens = (h / 2) * (w / 2)`.
    text_len: text tokens T.
    mode: "block_causal", "full" or "step" (one frame against the cache; text keys/values are
      precomputed by `encode_text` and not counted).
    index: the cached step's frame index (mode "step").
    text_tokens: whether text comes as caption token ids through the built-in encoder (default:
      `config.caption_vocab_size > 0`).
  Returns:
    dict of FLOPs per component, with "total".
  """
  c = config
  if mode == "step" and frames != 1:
    raise ValueError(f"mode='step' takes one frame, got frames={frames}")
  d, L, f = c.dim, c.num_layers, c.ffn_dim
  q = batch * frames * tokens                         # query tokens
  kf = _key_frames(mode, frames, c.window, index, count)
  keys = int(kf.sum()) * tokens * batch * tokens      # sum over query tokens of their key count
  patch = int(np.prod(c.patch_size))
  out = {
      "patch_embedding": 2 * q * c.in_channels * patch * d,
      "time_modulation": 2 * batch * frames * (c.freq_dim * d + d * d + d * 6 * d),
      "self_attention_proj": L * 4 * 2 * q * d * d,
      "self_attention_qk_av": L * 2 * 2 * keys * d,
      "cross_attention_proj": L * 2 * 2 * q * d * d,
      "cross_attention_qk_av": L * 2 * 2 * q * text_len * d,
      "ffn": L * 2 * 2 * q * d * f,
      "head": 2 * q * d * patch * c.latent_channels,
  }
  if mode != "step":  # text keys/values per layer and the text projection, once per pass
    out["text_kv"] = L * 2 * 2 * batch * text_len * d * d
    out["text_embedder"] = 2 * batch * text_len * (c.text_dim * d + d * d)
    use_tokens = c.caption_vocab_size > 0 if text_tokens is None else text_tokens
    if use_tokens:
      out["caption_encoder"] = caption_encoder_flops(c, batch, text_len)
  out["total"] = int(sum(out.values()))
  return {k: int(v) for k, v in out.items()}


def caption_encoder_flops(config, batch: int, text_len: int) -> int:
  """The built-in caption encoder (pre-LN transformer of width `caption_dim`)."""
  w, t = config.caption_dim, text_len
  per_layer = 2 * batch * t * (4 * w * w + 2 * 4 * w * w) + 2 * 2 * batch * t * t * w
  return config.caption_layers * per_layer + 2 * batch * t * w * config.text_dim


def text_kv_flops(config, *, batch: int, text_len: int, text_tokens: bool | None = None) -> int:
  """`CausalDiT.encode_text`: text projection and per-layer cross-attention keys/values."""
  c, d = config, config.dim
  use_tokens = c.caption_vocab_size > 0 if text_tokens is None else text_tokens
  total = 2 * batch * text_len * (c.text_dim * d + d * d) + c.num_layers * 2 * 2 * batch * text_len * d * d
  return total + (caption_encoder_flops(c, batch, text_len) if use_tokens else 0)


def step_flops(config, *, batch: int, tokens: int, text_len: int, index: int, count: str = "valid") -> int:
  """One cached step (one latent frame) at cache index `index`."""
  return forward_flops(config, batch=batch, frames=1, tokens=tokens, text_len=text_len, mode="step",
                       index=index, count=count)["total"]


def peer_block_flops(config, *, batch: int, tokens: int, text_len: int, index: int, num_steps: int) -> int:
  """A peer-style block: `num_steps` denoising passes plus one pass that writes clean keys/values."""
  return (num_steps + 1) * step_flops(config, batch=batch, tokens=tokens, text_len=text_len, index=index)


def stage1_train_flops(config, *, batch: int, frames: int, tokens: int, text_len: int) -> int:
  """Teacher-forced diffusion step: one block-causal whole-clip forward, backward = 2x forward."""
  fwd = forward_flops(config, batch=batch, frames=frames, tokens=tokens, text_len=text_len,
                      mode="block_causal")["total"]
  return 3 * fwd


def rollout_flops(config, *, batch: int, steps: int, tokens: int, text_len: int, start_index: int = 0) -> int:
  """A `steps`-frame one-step rollout from cache index `start_index` (forward only)."""
  return sum(step_flops(config, batch=batch, tokens=tokens, text_len=text_len, index=start_index + i)
             for i in range(steps))


def stage3_step_flops(config, *, batch: int, steps: int, tokens: int, text_len: int, d_steps: int = 1,
                      d_head_flops: int = 0) -> int:
  """One AAPT step of `stages/adversarial.py` (discriminator = the same backbone):

  G: the student-forcing rollout of `steps` frames, forward + backward (3x), and the prompt's
     text keys/values (3x);
  D update (`d_steps` times): real, fake and their two perturbed copies (approximated R1/R2), each
     a block-causal pass over the `steps` judged frames, forward + backward (4 x 3x);
  G update through D: the real clip forward (1x) and the fake clip forward + backward to its
     inputs (2x; D's weights get no gradient there).
  """
  g = 3 * rollout_flops(config, batch=batch, steps=steps, tokens=tokens, text_len=text_len)
  g += 3 * text_kv_flops(config, batch=batch, text_len=text_len)
  d_fwd = forward_flops(config, batch=batch, frames=steps, tokens=tokens, text_len=text_len,
                        mode="block_causal")["total"] + d_head_flops
  return int(g + (12 * d_steps + 3) * d_fwd)
