"""CausalDiT: a Wan2.1-layout video diffusion transformer made block-causal for AAPT.

Per autoregressive step the generator sees, per latent pixel, the channel concatenation
`[noise | recycled previous latent frame | control]`, patchified 1x2x2. Block s of the sequence
generates latent frame s + 1 from the recycled frame s; block 0 holds the user's first frame in its
recycled slot and is the permanent attention sink.

One set of parameters, four modes of `__call__`:
  "full"          bidirectional attention over the whole clip (stage-0 pretraining, Wan parity);
  "block_causal"  whole clip, frame i sees the text, the sink, frames i-N..i-1 and itself
                  (teacher forcing, the discriminator);
  "step"          one new frame against the KV cache (inference, student forcing);
  "text"          the per-layer cross-attention keys/values of a prompt (computed once per prompt).
The step and block-causal modes give the same numbers (tests/test_dit.py).

Parameter names follow diffusers' `WanTransformer3DModel` (with `.` -> `_`, blocks stacked along a
leading `layers` axis by `nn.scan`), so `apt2_jax.convert` maps Wan2.1 checkpoints one to one.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from apt2_jax.models import kv_cache, rope
from apt2_jax.models.attention import IMPLEMENTATIONS, CrossAttention, SelfAttention, dense
from apt2_jax.models.conditioning import CaptionEncoder, TimeTextEmbedder

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything": jax.checkpoint_policies.everything_saveable,
}
MODES = ("full", "block_causal", "step", "text")
PREDICTIONS = ("velocity", "x0")
X0_MIN_T = 0.05  # x0-prediction: the velocity's denominator is clipped here (as JiT clips 1 - t)


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Hyper-parameters of the causal DiT. Field names are the config keys under `config.model`."""
  latent_channels: int = 16        # VAE latent channels (Wan2.1: 16); also the output channels
  control_channels: int = 0        # extra per-latent-pixel control channels (camera rays, pose)
  recycled_channels: bool = True   # False: plain video diffusion input [noise | control] (Wan2.1,
                                   # stage-0 pretraining); stage 1 widens the patch embedding
  dim: int = 1536                  # hidden width
  ffn_dim: int = 8960
  num_heads: int = 12
  num_layers: int = 30
  text_dim: int = 4096             # width of the text embeddings fed to the text projection
  freq_dim: int = 256              # sinusoidal timestep embedding width
  patch_size: tuple = (1, 2, 2)
  window: int = 30                 # N: latent frames of attention window besides the sink
  eps: float = 1e-6
  rope_theta: float = 10000.0
  caption_vocab_size: int = 0      # > 0: text comes as token ids through a built-in CaptionEncoder
  caption_dim: int = 128
  caption_layers: int = 2
  caption_max_len: int = 32        # longest caption in tokens (position embeddings)
  dtype: str = "float32"           # compute dtype ("bfloat16" for speed); params stay param_dtype
  param_dtype: str = "float32"
  remat_policy: str = "none"       # one of REMAT_POLICIES
  attention_impl: Any = None       # None (auto per platform and size), "xla", "cudnn", "einsum" or
                                   # "chunked" (attention.IMPLEMENTATIONS; the whole-clip kernels:
                                   # attention.block_causal_kernel, cross_kernel; the cached step's:
                                   # attention.step_implementation)
  query_chunk: int = 0             # query frames per chunk of the whole-clip gathered and chunked
                                   # kernels (0 = the kernel's choice)
  key_chunk: int = 0               # key frames per chunk of the chunked kernels (0 = their choice)
  scan_unroll: int = 1             # layers per iteration of the whole-clip passes' layer scan
                                   # (the cached step keeps 1): unrolled, XLA:CPU needs no stacked
                                   # residual buffers (testbed stage 1: 0.86 -> 0.78 s per step)
  prediction: str = "velocity"     # what the head outputs: "velocity" v (Wan), or "x0", the clean
                                   # latent, from which v = (x_t - x0) / max(t, X0_MIN_T): a head
                                   # narrower than a token (e.g. 16 pixel-codec tokens of 3072 values
                                   # at width 96) cannot pass white noise through, clean content it can

  def __post_init__(self):
    if self.dim % self.num_heads:
      raise ValueError(f"model.dim={self.dim} is not divisible by model.num_heads={self.num_heads}")
    rope.section_dims(self.dim // self.num_heads)
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"model.remat_policy={self.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
    if self.scan_unroll < 1 or self.num_layers % self.scan_unroll:
      raise ValueError(f"model.scan_unroll={self.scan_unroll} must be >= 1 and divide model.num_layers={self.num_layers}")
    if self.window < 1:
      raise ValueError(f"model.window={self.window} must be >= 1")
    if tuple(self.patch_size)[0] != 1:
      raise ValueError(f"model.patch_size={self.patch_size}: the time patch must be 1 (one block per latent frame)")
    for name in ("dtype", "param_dtype"):
      jnp.dtype(getattr(self, name))
    if self.attention_impl not in IMPLEMENTATIONS:
      raise ValueError(f"model.attention_impl={self.attention_impl!r} is not one of {IMPLEMENTATIONS}")
    for name in ("query_chunk", "key_chunk"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
        raise ValueError(f"model.{name}={getattr(self, name)!r} must be an integer >= 0")
    if self.prediction not in PREDICTIONS:
      raise ValueError(f"model.prediction={self.prediction!r} is not one of {PREDICTIONS}")

  @property
  def in_channels(self) -> int:
    return (2 if self.recycled_channels else 1) * self.latent_channels + self.control_channels

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  def to_dict(self) -> dict:
    """JSON-able fields (`from_dict` inverts it)."""
    d = dataclasses.asdict(self)
    d["patch_size"] = list(d["patch_size"])
    return d

  @classmethod
  def from_dict(cls, d) -> "DiTConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown model config field(s) {unknown}; known fields: {sorted(known)}")
    if "patch_size" in d:
      d["patch_size"] = tuple(d["patch_size"])
    return cls(**d)


class Block(nn.Module):
  """One Wan2.1 transformer block, scanned over layers. `mode` is one of `MODES`."""
  config: DiTConfig
  mode: str
  return_hidden: bool = False  # also emit the hidden state after this block (discriminator heads)

  def setup(self):
    c = self.config
    self.attn1 = SelfAttention(c)
    self.attn2 = CrossAttention(c)
    self.norm2 = nn.LayerNorm(epsilon=c.eps, dtype=jnp.float32, param_dtype=jnp.float32,
                              scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                              bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))
    self.ffn_net_0_proj = dense(c.ffn_dim, ("embed", "mlp"), "ffn_net_0_proj", c)
    self.ffn_net_2 = dense(c.dim, ("mlp", "embed"), "ffn_net_2", c)
    self.scale_shift_table = self.param(
        "scale_shift_table",
        nn.with_logical_partitioning(lambda k, s, d=jnp.float32: jax.random.normal(k, s, d) / math.sqrt(c.dim), (None, None, "embed")),
        (1, 6, c.dim), jnp.float32)

  def _norm(self, x):  # LayerNorm without affine, in float32 (Wan's FP32LayerNorm)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return (xf - mean) * jax.lax.rsqrt(var + self.config.eps)

  def __call__(self, h, xs, ctx):
    """h: [B, F, P, dim]; xs: per-layer inputs (cache, text_kv); ctx: broadcast inputs."""
    c = self.config
    if self.mode == "text":
      return h, self.attn2.text_kv(ctx["text"])
    dtype = jnp.dtype(c.dtype)
    mod = self.scale_shift_table[None] + ctx["mod"]  # [B, F, 6, dim]
    shift, scale, gate, c_shift, c_scale, c_gate = [mod[:, :, j, None] for j in range(6)]
    h = nn.with_logical_constraint(h, ("activation_batch", None, "activation_length", "activation_embed"))

    x = (self._norm(h) * (1 + scale) + shift).astype(dtype)
    attn, new_cache = self.attn1(x, ctx["spatial"], mode=self.mode, layer_cache=xs.get("cache"),
                                 index=ctx.get("index"), full_positions=ctx.get("full_positions"))
    h = (h.astype(jnp.float32) + attn.astype(jnp.float32) * gate).astype(h.dtype)

    text_kv = xs.get("text_kv")
    if text_kv is None:
      text_kv = self.attn2.text_kv(ctx["text"])
    x = self.norm2(h.astype(jnp.float32)).astype(dtype)
    h = h + self.attn2(x, text_kv).astype(h.dtype)

    x = (self._norm(h) * (1 + c_scale) + c_shift).astype(dtype)
    x = nn.gelu(self.ffn_net_0_proj(x), approximate=True)
    x = nn.with_logical_constraint(x, ("activation_batch", None, "activation_length", "activation_mlp"))
    ff = self.ffn_net_2(x)
    h = (h.astype(jnp.float32) + ff.astype(jnp.float32) * c_gate).astype(h.dtype)
    ys = {"cache": new_cache} if new_cache is not None else {}
    if self.return_hidden:
      ys["hidden"] = h
    return h, ys


class PatchEmbedding(nn.Module):
  """Wan's patch embedding (a Conv3d with kernel = stride = `patch_size`), as reshape + einsum.

  The parameters are those of `nn.Conv` (`kernel` [pt, ph, pw, in_channels, dim], `bias` [dim],
  same initialisers), so Wan converters and checkpoints are unchanged. It is not computed as a
  strided convolution because XLA's SPMD partitioner gets the kernel's gradient of that wrong
  (`tensor` times too large) when the output tokens are sharded over `sequence` while the mesh has
  a `tensor` axis; the einsum is exact on every mesh (tests/test_sharding.py).
  """
  config: DiTConfig

  @nn.compact
  def __call__(self, x):
    """x: [B, F, H, W, Cin] -> tokens [B, F / pt, (H / ph) * (W / pw), dim]."""
    c = self.config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    pt, ph, pw = c.patch_size
    cin = x.shape[-1]
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, "in_channels", "embed")),
        (pt, ph, pw, cin, c.dim), param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (c.dim,), param_dtype)
    b, f, hh, ww, _ = x.shape
    gf, gh, gw = f // pt, hh // ph, ww // pw
    x = x.astype(dtype).reshape(b, gf, pt, gh, ph, gw, pw, cin)
    y = jnp.einsum("bftuivjc,tijcd->bfuvd", x, kernel.astype(dtype))  # [B, F/pt, H/ph, W/pw, dim]
    y = y + bias.astype(dtype)
    return y.reshape(b, gf, gh * gw, c.dim)


def _stack(config: DiTConfig, mode: str, return_hidden: bool = False):
  block = Block
  policy = REMAT_POLICIES[config.remat_policy]
  if config.remat_policy != "none" and mode != "text":
    block = nn.remat(Block, policy=policy, prevent_cse=False)
  scan = nn.scan(
      block, variable_axes={"params": 0}, split_rngs={"params": True},
      in_axes=(0, nn.broadcast), length=config.num_layers,
      unroll=1 if mode == "step" else config.scan_unroll,
      metadata_params={nn.PARTITION_NAME: "layers"})(config, mode, return_hidden, name="blocks")
  if mode != "step":
    return scan

  def step_stack(h, xs, ctx):
    """The scan reads each layer's cache and emits only the new frame's keys/values
    ([L, B, H, P, D]); one slot-sized write per entry then updates the stacked cache in place
    (a donated cache is never rewritten). ys["cache"] is the updated cache, without `index`."""
    cache = xs["cache"]
    h, ys = scan(h, xs, ctx)
    with jax.named_scope("kv_cache_write"):
      new = kv_cache.write_frame(dict(cache, index=ctx["index"]), ys["cache"], config.window)
    new.pop("index")
    return h, dict(ys, cache=new)
  return step_stack


class CausalDiT(nn.Module):
  """The AAPT generator backbone (and the discriminator's), Wan2.1 layout.

  Shapes: latents are `[batch, frames, height, width, channels]` at latent resolution; `t` is in
  [0, 1] (rectified flow: `x_t = (1 - t) x_0 + t * noise`, the model predicts `v = noise - x_0`).
  """
  config: DiTConfig

  @nn.compact
  def __call__(self, noise=None, recycled=None, control=None, t=None, text=None, *,
               mode: str = "block_causal", cache=None, text_kv=None, return_hidden: bool = False):
    """Whole-clip pass (modes "block_causal" and "full"); `step` and `encode_text` use the others.

    Args:
      noise: [B, F, h, w, C] the noise slot (noisy latent x_t; for D, the frame to judge).
      recycled: [B, F, h, w, C] the previous clean latent frame for each block.
      control: [B, F, h, w, control_channels] or None.
      t: [B] or [B, F] flow time in [0, 1].
      text: [B, T, text_dim] float embeddings, or int32 [B, T] caption tokens.
    Returns:
      v: [B, F, h, w, C] float32 velocity; with `return_hidden`, also the hidden states after every
      block, [L, B, F, P, dim].
    """
    c = self.config
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    embedder = TimeTextEmbedder(c, name="condition_embedder")
    if mode == "text":
      _, ys = _stack(c, "text")(jnp.zeros((1,)), {}, {"text": self._text(text, embedder)})
      return ys

    b, f, hh, ww, _ = noise.shape
    x = self._embed_inputs(noise, recycled, control)
    t = jnp.asarray(t, jnp.float32)
    t = jnp.broadcast_to(t[:, None] if t.ndim == 1 else t, (b, f))
    temb, mod = embedder.time(t)
    _, ph, pw = c.patch_size
    spatial = jnp.asarray(rope.spatial_angles(hh // ph, ww // pw, c.head_dim, c.rope_theta))
    ctx = {"mod": mod, "spatial": spatial}
    if mode == "step":
      if f != 1:
        raise ValueError(f"step() takes one latent frame, got {f}")
      index = cache["index"]
      ctx["index"] = index
      layer_cache = {k: cache[k] for k in ("sink_k", "sink_v", "ring_k", "ring_v")}
      h, ys = _stack(c, "step")(x, {"cache": layer_cache, "text_kv": text_kv}, ctx)
      return self._velocity(self._head(h, temb, hh, ww), noise, t), dict(ys["cache"], index=index + 1)

    ctx["text"] = self._text(text, embedder)
    if mode == "full":
      ctx["full_positions"] = jnp.arange(f)
    h, ys = _stack(c, mode, return_hidden)(x, {}, ctx)
    v = self._velocity(self._head(h, temb, hh, ww), noise, t)
    return (v, ys["hidden"]) if return_hidden else v

  def _velocity(self, out, noise, t):
    """The head's output as a velocity: itself, or from an x0 prediction `(x_t - x0) / t`."""
    if self.config.prediction == "velocity":
      return out
    t = jnp.maximum(t, X0_MIN_T)[:, :, None, None, None]  # [B, F] -> [B, F, 1, 1, 1]
    return (noise.astype(jnp.float32) - out) / t

  def step(self, noise, recycled, control, t, cache, text_kv):
    """One cached autoregressive step: generates the frame `cache['index']`.

    Args:
      noise, recycled: [B, 1, h, w, C]; control: [B, 1, h, w, Cc] or None; t: [B].
      cache: the KV cache (`kv_cache.init_cache`); text_kv: `encode_text(...)`.
    Returns:
      (v [B, 1, h, w, C] float32, new cache with `index + 1`).
    """
    return self(noise, recycled, control, t, None, mode="step", cache=cache, text_kv=text_kv)

  def encode_text(self, text):
    """Per-layer cross-attention keys/values of a prompt: {'k', 'v'}: [L, B, T, H, D]."""
    return self(text=text, mode="text")

  # ---------------------------------------------------------------------------------------------
  def _text(self, text, embedder):
    c = self.config
    if jnp.issubdtype(text.dtype, jnp.integer):
      if not c.caption_vocab_size:
        raise ValueError("text was given as token ids but model.caption_vocab_size is 0")
      text = CaptionEncoder(c, name="caption_encoder")(text)
    if text.shape[-1] != c.text_dim:
      raise ValueError(f"text embeddings have width {text.shape[-1]}, model.text_dim={c.text_dim}")
    return embedder.text(text.astype(jnp.dtype(c.dtype)))

  def _embed_inputs(self, noise, recycled, control):
    c = self.config
    if noise.shape[-1] != c.latent_channels:
      raise ValueError(f"noise {noise.shape} must have {c.latent_channels} latent channels")
    parts = [noise]
    if c.recycled_channels:
      if recycled is None or recycled.shape != noise.shape:
        raise ValueError(f"recycled {None if recycled is None else recycled.shape} must match noise "
                         f"{noise.shape} (model.recycled_channels=True)")
      parts.append(recycled)
    if c.control_channels:
      if control is None or control.shape[:-1] != noise.shape[:-1] or control.shape[-1] != c.control_channels:
        raise ValueError(f"control must be {noise.shape[:-1] + (c.control_channels,)}, got "
                         f"{None if control is None else control.shape}")
      parts.append(control)
    elif control is not None and control.shape[-1]:
      raise ValueError("control was given but model.control_channels is 0")
    x = jnp.concatenate([p.astype(jnp.dtype(c.dtype)) for p in parts], axis=-1)
    _, ph, pw = c.patch_size
    if x.shape[2] % ph or x.shape[3] % pw:
      raise ValueError(f"latent size {x.shape[2:4]} is not divisible by the patch {c.patch_size[1:]}")
    return PatchEmbedding(c, name="patch_embedding")(x)  # [B, F, h/2 * w/2, dim]

  def _head(self, h, temb, hh, ww):
    c = self.config
    b, f, p, _ = h.shape
    table = self.param(
        "scale_shift_table",
        nn.with_logical_partitioning(lambda k, s, d=jnp.float32: jax.random.normal(k, s, d) / math.sqrt(c.dim),
                                     (None, None, "embed")),
        (1, 2, c.dim), jnp.float32)
    shift, scale = [(table[None] + temb[:, :, None])[:, :, j, None] for j in range(2)]
    xf = h.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    x = ((xf - mean) * jax.lax.rsqrt(var + c.eps) * (1 + scale) + shift).astype(jnp.dtype(c.dtype))
    x = dense(int(np.prod(c.patch_size)) * c.latent_channels, ("embed", "out_channels"), "proj_out", c)(x)
    x = x.astype(jnp.float32)  # [B, F, P, pt*ph*pw*C]
    pt, ph, pw = c.patch_size
    gh, gw = hh // ph, ww // pw
    x = x.reshape(b, f, gh, gw, pt, ph, pw, c.latent_channels)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, f * pt, hh, ww, c.latent_channels)


def init_params(model: CausalDiT, rng, batch=1, frames=2, latent_hw=(4, 4), text_len=4, boxed=False):
  """Initialises (or, under `jax.eval_shape`, describes) the parameters of `model`."""
  c = model.config
  shape = (batch, frames) + tuple(latent_hw) + (c.latent_channels,)
  z = jnp.zeros(shape, jnp.float32)
  ctrl = jnp.zeros(shape[:-1] + (c.control_channels,)) if c.control_channels else None
  text = (jnp.ones((batch, text_len), jnp.int32) if c.caption_vocab_size
          else jnp.zeros((batch, text_len, c.text_dim)))
  variables = jax.jit(model.init)(rng, z, z, ctrl, jnp.zeros((batch,)), text)
  params = variables["params"]
  return params if boxed else unbox(params)


def unbox(tree):
  """Strips `nn.Partitioned` boxes without applying sharding constraints (safe under any mesh)."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def count_params(config: DiTConfig) -> int:
  """Parameter count from `jax.eval_shape` (nothing is allocated)."""
  shapes = jax.eval_shape(lambda: init_params(CausalDiT(config), jax.random.key(0)))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))
