r"""Streaming and training benchmark, and compile-only (AOT) analysis of paper-scale configs.

    python -m apt2_jax.benchmark --config=experiments/benchmark.py:small --json_out=FILE
    python -m apt2_jax.benchmark --aot --json_out=FILE

Writes one JSON object to `--json_out` and a readable table to stdout.

Streaming figures (one latent frame = 4 video frames per DiT step):
  step_latency_ms         median cached DiT step with a full window (index > N)
  decode_latency_ms       median streaming VAE decode of one latent frame (4 video frames)
  fps                     4 / (step + decode), per stream
  first_frame_latency_ms  image -> first 4 generated video frames: VAE encode of the image, text
                          keys/values, the first DiT step, decode of frame 0 (primes the causal
                          decoder) and of frame 1
  mfu                     analytic step FLOPs (`apt2_jax.flops`) / step time / peak FLOP/s of the
                          mesh; the peak is the spec table on GPUs, a measured matmul on CPUs
  cache_speedup           block-causal whole-window recompute (sink + N + new = N + 2 frames, the
                          exact input the cached step replaces) / cached step
  nfe_speedup             peer-style block (k denoising passes + 1 clean cache-writing pass,
                          `rollout.generator_step`, num_steps=k, cache_from="clean") / 1-NFE step
  latency_growth          step at frame 1000 / step at frame 50 (positions are bounded: ~1)
Training figures (stage 1: teacher forcing; stage 3: one whole AAPT step, a D update and a G
update): step time, tokens/s per device (generated tokens for stage 3), MFU (model FLOPs, remat not
counted) and peak bytes per device from `memory_analysis()`.

The stage-1 step is built here (`stage1_train_step`: the teacher-forced rectified-flow loss with
AdamW, as `stages/diffusion.py` computes it); the stage-3 step is the trainer's own
(`stages/adversarial.AdversarialStage` under `train.guarded_step`: student-forcing rollout, the
real discriminator with its per-frame heads, approximated R1/R2, both optimisers and the EMA).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Callable

from absl import app, flags, logging

flags.DEFINE_string("json_out", None, "Where to write the JSON result.")
flags.DEFINE_bool("aot", False, "Compile-only analysis of apt2_8b (streaming and training) on "
                  "virtual CPU devices instead of running the benchmark.")
flags.DEFINE_string("aot_cases", "", "Comma-separated AOT cases to run in this process (internal; "
                    "default: all, each device count in its own subprocess).")
flags.DEFINE_float("aot_mfu", 0.4, "MFU assumed for the projected H100 latency of AOT cases.")
flags.DEFINE_integer("cpu_devices", 0, "Virtual CPU devices (set before the backend starts; 0: "
                     "leave JAX's default).")
FLAGS = flags.FLAGS

# Dense peak FLOP/s per device by `device_kind` substring and compute dtype (vendor spec sheets;
# bfloat16 is the tensor-core figure without sparsity, float32 the non-tensor-core figure).
PEAK_FLOPS = {
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
    "L40S": {"bfloat16": 362e12, "float16": 362e12, "float32": 91.6e12},
}
H100_BF16_PEAK = PEAK_FLOPS["H100"]["bfloat16"]
H100_MEMORY_BYTES = 80e9
PAPER_STEP_S = 0.16  # AAPT: one 8B step (4 video frames) at 736x416 on one H100
VIDEO_FRAMES_PER_LATENT = 4


def _jax():
  import jax  # imported late so that --cpu_devices can configure the backend first
  return jax


# ------------------------------------------------------------------------------------------------
# Devices, peak FLOP/s, timing
# ------------------------------------------------------------------------------------------------

def spec_peak_flops(device_kind: str, dtype: str) -> float | None:
  """The spec-sheet peak of one device, or None when the kind is not in `PEAK_FLOPS`."""
  for name, table in PEAK_FLOPS.items():
    if name.lower() in device_kind.lower():
      return table.get(dtype)
  return None


def measure_matmul_peak(mesh, dtype: str, n: int = 2048, reps: int = 5) -> float:
  """Achieved FLOP/s of one `[n, n] @ [n, n]` matmul per device, all mesh devices at once."""
  jax = _jax()
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  devices = mesh.devices.size
  sh = NamedSharding(mesh, P(mesh.axis_names))
  a = jax.device_put(jnp.ones((devices, n, n), dtype) * 0.01, sh)
  f = jax.jit(lambda a: jnp.einsum("dij,djk->dik", a, a), in_shardings=sh, out_shardings=sh)
  ms = time_ms(f, (a,), reps=reps, warmup=1)
  return 2.0 * n ** 3 * devices / (ms / 1e3)


def peak_flops(mesh, dtype: str, n: int) -> tuple[float, str]:
  """(peak FLOP/s of all mesh devices, where it comes from)."""
  kind = mesh.devices.flat[0].device_kind
  platform = mesh.devices.flat[0].platform
  spec = spec_peak_flops(kind, dtype) if platform == "gpu" else None
  if spec is not None:
    return spec * mesh.devices.size, f"spec sheet ({kind}, {dtype})"
  measured = measure_matmul_peak(mesh, dtype, n)
  return measured, f"measured {n}x{n} {dtype} matmul per device on {mesh.devices.size} {platform} device(s)"


def _block(x):
  jax = _jax()
  return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def time_ms(fn: Callable, args: tuple, *, reps: int, warmup: int = 1) -> float:
  """Median wall time of `fn(*args)` in ms, after `warmup` untimed calls (compilation included)."""
  for _ in range(max(warmup, 1)):
    _block(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    _block(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return float(sorted(times)[len(times) // 2])


def time_carry_ms(fn: Callable, carry, *, reps: int, warmup: int = 1):
  """Median ms of `carry = fn(carry)` (for donated state: caches, train states). Returns (ms, carry)."""
  for _ in range(max(warmup, 1)):
    carry = _block(fn(carry))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    carry = _block(fn(carry))
    times.append((time.perf_counter() - t0) * 1e3)
  return float(sorted(times)[len(times) // 2]), carry


def memory_bytes(compiled) -> int | None:
  """Peak bytes per device of a compiled executable: arguments + outputs + temporaries - aliased."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # some backends do not implement it
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


# ------------------------------------------------------------------------------------------------
# Setup: model, mesh, shardings
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
  """Everything a measurement needs; arrays are placed with the shardings here."""
  config: Any                # the benchmark ConfigDict
  model_config: Any          # DiTConfig
  model: Any                 # CausalDiT
  mesh: Any
  rules: tuple
  boxed: Any                 # abstract boxed params (logical axes)
  param_sharding: Any
  latent_hw: tuple           # (h, w) latent pixels
  tokens: int                # tokens per latent frame

  def batch_sharding(self, shape, sequence_dim=None):
    """Leading dim over (data, fsdp) when it divides; optionally one dim over `sequence`."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from apt2_jax import sharding
    spec = [None] * len(shape)
    spec[0] = ("data", "fsdp")
    if sequence_dim is not None:
      spec[sequence_dim] = "sequence"
    return NamedSharding(self.mesh, sharding._fit(P(*spec), shape, self.mesh))

  def text(self, batch, rng):
    jax = _jax()
    import jax.numpy as jnp
    c = self.model_config
    if c.caption_vocab_size:
      return jax.random.randint(rng, (batch, self.config.text_len), 1, c.caption_vocab_size)
    return jax.random.normal(rng, (batch, self.config.text_len, c.text_dim)).astype(jnp.dtype(c.dtype))


def make_setup(config, devices=None) -> Setup:
  jax = _jax()
  from apt2_jax import sharding
  from apt2_jax.models import CausalDiT, DiTConfig, init_params
  from apt2_jax.configs.benchmark import validate
  validate(config)
  mc = DiTConfig.from_dict(config.model)
  model = CausalDiT(mc)
  if devices is None:
    devices = sharding.config_devices(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules_from_config(config)
  boxed = jax.eval_shape(lambda: init_params(model, jax.random.key(0), boxed=True))
  p_shard = sharding.param_shardings(boxed, mesh, rules)
  h, w = config.height // 8, config.width // 8
  _, ph, pw = mc.patch_size
  return Setup(config, mc, model, mesh, rules, boxed, p_shard, (h, w), (h // ph) * (w // pw))


def init_sharded_params(s: Setup, seed: int):
  jax = _jax()
  from apt2_jax.models import init_params
  with _mesh(s):
    return jax.jit(lambda k: init_params(s.model, k), out_shardings=s.param_sharding)(jax.random.key(seed))


def _mesh(s: Setup):
  from apt2_jax import sharding
  return sharding.use_mesh(s.mesh, s.rules)


# ------------------------------------------------------------------------------------------------
# Streaming: cached step, peer block, no-cache recompute, VAE decode, first frame
# ------------------------------------------------------------------------------------------------

def make_step_fns(s: Setup, batch: int):
  """Jitted streaming functions with their shardings; the cache is donated."""
  jax = _jax()
  import jax.numpy as jnp
  from apt2_jax import sharding
  from apt2_jax.models import CausalDiT, kv_cache
  from apt2_jax.rollout import RolloutOptions, generator_step
  mc, (h, w) = s.model_config, s.latent_hw
  cache_shapes = jax.eval_shape(lambda: kv_cache.init_cache(mc, batch, h, w))
  c_shard = sharding.cache_shardings(cache_shapes, s.mesh, s.rules)
  text = jax.eval_shape(lambda: s.text(batch, jax.random.key(0)))
  tkv_shapes = jax.eval_shape(lambda p, t: s.model.apply({"params": p}, t, method=CausalDiT.encode_text),
                              _unboxed(s), text)
  t_shard = sharding.text_kv_shardings(tkv_shapes, s.mesh, s.rules)
  z_shape = (batch, 1, h, w, mc.latent_channels)
  z_shard = s.batch_sharding(z_shape)
  ones = lambda: jnp.ones((batch,), jnp.float32)

  def one_nfe(params, cache, tkv, noise, recycled):
    v, cache = s.model.apply({"params": params}, noise, recycled, None, ones(), cache, tkv,
                             method=CausalDiT.step)
    return noise - v, cache

  def peer(params, cache, tkv, noise, recycled):
    opts = RolloutOptions(num_steps=s.config.peer_steps, cache_from="clean")
    return generator_step(s.model, params, cache, tkv, noise, recycled, None, opts)

  kw = dict(in_shardings=(s.param_sharding, c_shard, t_shard, z_shard, z_shard),
            out_shardings=(z_shard, c_shard), donate_argnums=(1,))
  text_shape = text.shape
  encode_text = jax.jit(lambda p, t: s.model.apply({"params": p}, t, method=CausalDiT.encode_text),
                        in_shardings=(s.param_sharding, s.batch_sharding(text_shape)), out_shardings=t_shard)
  new_cache = jax.jit(lambda: kv_cache.init_cache(mc, batch, h, w), out_shardings=c_shard)
  return dict(step=jax.jit(one_nfe, **kw), peer=jax.jit(peer, **kw), encode_text=encode_text,
              new_cache=new_cache, cache_sharding=c_shard, z_sharding=z_shard)


def _unboxed(s: Setup):
  from apt2_jax.models.dit import unbox
  return unbox(s.boxed)


def make_recompute_fn(s: Setup, batch: int, frames: int):
  """No-cache baseline: the block-causal whole-clip pass over the `frames`-frame window."""
  jax = _jax()
  import jax.numpy as jnp
  mc, (h, w) = s.model_config, s.latent_hw
  shape = (batch, frames, h, w, mc.latent_channels)
  zs = s.batch_sharding(shape)
  text_shape = jax.eval_shape(lambda: s.text(batch, jax.random.key(0))).shape

  def recompute(params, noise, recycled, text):
    v = s.model.apply({"params": params}, noise, recycled, None, jnp.ones((batch,)), text,
                      mode="block_causal")
    return noise[:, -1:] - v[:, -1:]
  return jax.jit(recompute, in_shardings=(s.param_sharding, zs, zs, s.batch_sharding(text_shape)))


def streaming_figures(s: Setup, params, peak: float) -> dict:
  jax = _jax()
  import jax.numpy as jnp
  from apt2_jax import flops
  c, mc, (h, w) = s.config, s.model_config, s.latent_hw
  b, n = c.batch, mc.window
  fns = make_step_fns(s, b)
  ks = jax.random.split(jax.random.key(c.seed + 1), 4)
  z_shape = (b, 1, h, w, mc.latent_channels)
  noise = jax.device_put(jax.random.normal(ks[0], z_shape), fns["z_sharding"])
  recycled = jax.device_put(jax.random.normal(ks[1], z_shape), fns["z_sharding"])
  text_spec = jax.eval_shape(lambda: s.text(b, ks[2]))
  text = jax.device_put(s.text(b, ks[2]), s.batch_sharding(text_spec.shape))
  out = {}
  with _mesh(s):
    tkv = fns["encode_text"](params, text)

    def at_index(index):
      cache = fns["new_cache"]()
      return dict(cache, index=jax.device_put(jnp.int32(index), fns["cache_sharding"]["index"]))

    def stream(fn, index, reps):
      ms, _ = time_carry_ms(lambda cache: fn(params, cache, tkv, noise, recycled)[1], at_index(index),
                            reps=reps, warmup=c.warmup)
      return ms

    steady = n + 2  # the ring is full from index N + 1 on
    out["step_latency_ms"] = stream(fns["step"], steady, c.reps)
    peer_ms = stream(fns["peer"], steady, max(2, c.reps // 2))
    out["peer_block_latency_ms"] = peer_ms
    out["nfe_speedup"] = peer_ms / out["step_latency_ms"]
    g0, g1 = c.growth_frames
    growth = [stream(fns["step"], g, c.reps) for g in (g0, g1)]
    out[f"step_latency_ms_at_frame_{g0}"], out[f"step_latency_ms_at_frame_{g1}"] = growth
    out["latency_growth"] = growth[1] / growth[0]

    window_frames = n + 2  # sink + N window frames + the new frame
    shape = (b, window_frames, h, w, mc.latent_channels)
    recompute = make_recompute_fn(s, b, window_frames)
    zs = s.batch_sharding(shape)
    clip = jax.device_put(jax.random.normal(ks[3], shape), zs)
    out["recompute_latency_ms"] = time_ms(recompute, (params, clip, clip, text), reps=max(2, c.reps // 2),
                                          warmup=c.warmup)
    out["cache_speedup"] = out["recompute_latency_ms"] / out["step_latency_ms"]

  step_flops = flops.step_flops(mc, batch=b, tokens=s.tokens, text_len=c.text_len, index=steady)
  out["step_flops"] = step_flops
  out["step_tflops_per_s"] = step_flops / (out["step_latency_ms"] / 1e3) / 1e12
  out["mfu"] = step_flops / (out["step_latency_ms"] / 1e3) / peak
  out["peer_steps"] = c.peer_steps
  out["cache_window_frames"] = window_frames
  return out, fns, (noise, recycled, text)


def vae_figures(s: Setup, dit_params, fns, inputs) -> dict:
  """Streaming decode of one latent frame, and the first-frame latency of a new stream."""
  jax = _jax()
  import jax.numpy as jnp
  from apt2_jax.models import vae as vae_lib
  c, (h, w) = s.config, s.latent_hw
  b = c.batch
  vcfg = vae_lib.vae_config(c.vae_size)
  if vcfg.z_dim != s.model_config.latent_channels:
    raise ValueError(f"config.vae_size={c.vae_size!r} has {vcfg.z_dim} latent channels, the model "
                     f"{s.model_config.latent_channels}")
  vae = vae_lib.VAE(vcfg)
  device = s.mesh.devices.flat[0]  # the VAE runs unsharded on the first device
  vparams = jax.device_put(vae_lib.init_params(vae, jax.random.key(c.seed + 2), c.height, c.width), device)
  z = jax.device_put(jax.random.normal(jax.random.key(c.seed + 3), (b, 1, h, w, vcfg.z_dim)), device)
  cache = vae_lib.init_decode_cache(vae, b, h, w)
  _, cache = vae_lib.decode_step(vae, vparams, cache, z, True)
  decode_ms, _ = time_carry_ms(lambda cache: vae_lib.decode_step(vae, vparams, cache, z, False)[1],
                               cache, reps=c.reps, warmup=c.warmup)
  out = {"decode_latency_ms": decode_ms, "vae_size": c.vae_size}

  # First frame: image -> latent frame 0 -> first DiT step -> decode frames 0 and 1.
  encode = jax.jit(lambda p, v: vae.apply(p, v, method=vae_lib.VAE.encode)[0])
  image = jax.device_put(jnp.zeros((b, 1, c.height, c.width, 3)), device)
  noise, _, text = inputs

  def first_frame():
    t0 = time.perf_counter()
    z0 = encode(vparams, image)
    with _mesh(s):
      tkv = fns["encode_text"](dit_params, text)
      x1, _ = fns["step"](dit_params, fns["new_cache"](), tkv, noise,
                          jax.device_put(z0, fns["z_sharding"]))
    dcache = vae_lib.init_decode_cache(vae, b, h, w)
    v0, dcache = vae_lib.decode_step(vae, vparams, dcache, z0, True)
    v1, _ = vae_lib.decode_step(vae, vparams, dcache, jax.device_put(x1, device), False)
    _block((v0, v1))
    return (time.perf_counter() - t0) * 1e3
  first_frame()  # compile
  times = sorted(first_frame() for _ in range(c.first_frame_reps))
  out["first_frame_latency_ms"] = times[len(times) // 2]
  return out


# ------------------------------------------------------------------------------------------------
# Training steps (measurement builds of stage 1 and the stage-3 generator step)
# ------------------------------------------------------------------------------------------------

def _shift(t, s):
  return s * t / (1.0 + (s - 1.0) * t)


def stage1_train_step(model, optimizer, shift: float):
  """Teacher-forced rectified-flow step: one shifted t per clip, block-causal whole clip, AdamW.

  batch: clip [B, F + 1, h, w, C] (frame 0 is the first frame), text, noise [B, F, h, w, C], u [B].
  """
  jax = _jax()
  import jax.numpy as jnp
  import optax

  def loss_fn(params, batch):
    clip = batch["clip"]
    x0, recycled = clip[:, 1:], clip[:, :-1]
    t = _shift(batch["u"], shift)
    x_t = (1 - t[:, None, None, None, None]) * x0 + t[:, None, None, None, None] * batch["noise"]
    v = model.apply({"params": params}, x_t, recycled, None, t, batch["text"], mode="block_causal")
    return jnp.mean(jnp.square(v - (batch["noise"] - x0)))

  def step(state, batch):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss
  return step


def stage3_config(s: "Setup", batch: int, steps: int):
  """The stage-3 trainer config (`apt2_jax.configs.adversarial`) for the benchmark's model:
  `steps` generated latent frames per rollout, the benchmark's mesh, rules and rollout remat."""
  import ml_collections
  from apt2_jax.configs import adversarial, sizes
  c = s.config
  base = c.size if c.size in sizes.SIZES else "small"
  c3 = adversarial.adversarial_config(base)
  c3.model = ml_collections.ConfigDict(c.model.to_dict())
  c3.model.recycled_channels = True
  c3.model.control_channels = 0
  c3.data.update(dict(source="random_latents", height=int(c.height), width=int(c.width), frames=1 + 4 * steps,
                      control_dim=0, text_len=int(c.text_len)))
  c3.batch_size = batch
  c3.mesh = ml_collections.ConfigDict(dict(c.mesh))
  c3.logical_rules = tuple(c.logical_rules)
  c3.adversarial.rollout_remat = c.train.remat
  # D's block-causal passes over 4 clips (real, fake, perturbed) dominate the step's memory: its
  # blocks are rematerialised like the rollout's (small, 256x256, 8 frames: 31 GB of temporaries
  # without, 3.9 GB with).
  c3.model.remat_policy = c.train.remat
  c3.seed = int(c.seed)
  return c3


def stage3_trainer_step(s: "Setup", batch: int, steps: int, h: int, w: int):
  """(stage, jitted guarded step, abstract state with shardings, abstract batch with shardings)."""
  jax = _jax()
  import jax.numpy as jnp
  from apt2_jax import sharding, train
  from apt2_jax.stages import adversarial
  c3 = stage3_config(s, batch, steps)
  stage = adversarial.make_stage(c3, s.mesh)
  abstract, shardings = train.state_shardings(stage, s.mesh, s.rules, jax.random.key(0))
  state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)
  text = jax.eval_shape(lambda: s.text(batch, jax.random.key(0)))
  lat = (batch, steps + 1, h, w, s.model_config.latent_channels)
  b = {"latents": jax.ShapeDtypeStruct(lat, jnp.float32, sharding=s.batch_sharding(lat)),
       "text_tokens": jax.ShapeDtypeStruct(text.shape, text.dtype, sharding=s.batch_sharding(text.shape))}
  fn = jax.jit(train.guarded_step(stage, c3.seed),
               in_shardings=(shardings, {}, jax.tree.map(lambda x: x.sharding, b)),
               out_shardings=(shardings, sharding.replicated(s.mesh)), donate_argnums=(0,))
  return stage, fn, state, b


def _opt_shardings(optimizer, params_abstract, p_shard, mesh):
  jax = _jax()
  import optax
  from apt2_jax import sharding
  opt_abstract = jax.eval_shape(optimizer.init, params_abstract)
  return optax.tree_map_params(optimizer, lambda _, sh: sh, opt_abstract, p_shard,
                               transform_non_params=lambda _: sharding.replicated(mesh))


def train_step_builders(s: Setup, batch: int, frames: int, steps: int, abstract: bool = False):
  """Jitted stage-1 and stage-3 steps with shardings and donations, plus their abstract inputs.

  Returns {name: (jitted fn, args)}; with `abstract`, args are `ShapeDtypeStruct`s (AOT) and the
  caller only lowers and compiles.
  """
  jax = _jax()
  import jax.numpy as jnp
  from apt2_jax.models.dit import unbox
  c, mc, (h, w) = s.config, s.model_config, s.latent_hw
  ch = mc.latent_channels
  params_abstract = _unboxed(s)
  adamw = _optimizer("stage1")
  text_shape = jax.eval_shape(lambda: s.text(batch, jax.random.key(0)))
  t_spec = jax.ShapeDtypeStruct(text_shape.shape, text_shape.dtype, sharding=s.batch_sharding(text_shape.shape))

  def spec(shape, dtype=jnp.float32, seq=None):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=s.batch_sharding(shape, seq))

  def state_spec(opt):
    o_shard = _opt_shardings(opt, params_abstract, s.param_sharding, s.mesh)
    p = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), params_abstract,
                     s.param_sharding)
    o = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                     jax.eval_shape(opt.init, params_abstract), o_shard)
    return (p, o), (s.param_sharding, o_shard)

  out = {}
  st1, sh1 = state_spec(adamw)
  b1 = dict(clip=spec((batch, frames + 1, h, w, ch)), noise=spec((batch, frames, h, w, ch)),
            u=spec((batch,)), text=t_spec)
  b1_shard = jax.tree.map(lambda x: x.sharding, b1)
  f1 = jax.jit(stage1_train_step(s.model, adamw, c.train.shift), in_shardings=(sh1, b1_shard),
               out_shardings=(sh1, None), donate_argnums=(0,))
  out["stage1"] = (f1, (st1, b1))

  stage3, f3, st3, b3 = stage3_trainer_step(s, batch, steps, h, w)
  out["stage3"] = (f3, (st3, {}, b3))
  out["stage3_init"] = lambda seed: jax.jit(lambda r: unbox(stage3.init_state(r)),
                                            out_shardings=jax.tree.map(lambda x: x.sharding, st3))(jax.random.key(seed))
  return out


def _materialise(specs, seed: int):
  """Random arrays for abstract batch specs (uniform [0, 1) times, normal latents, token ids)."""
  jax = _jax()
  import jax.numpy as jnp
  leaves, treedef = jax.tree.flatten(specs)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  arrays = []
  for k, x in zip(keys, leaves):
    if jnp.issubdtype(x.dtype, jnp.integer):
      a = jax.random.randint(k, x.shape, 1, 100, x.dtype)
    elif len(x.shape) == 1:
      a = jax.random.uniform(k, x.shape, x.dtype)
    else:
      a = jax.random.normal(k, x.shape, x.dtype)
    arrays.append(jax.device_put(a, x.sharding))
  return treedef.unflatten(arrays)


def training_figures(s: Setup, params, peak: float) -> dict:
  jax = _jax()
  from apt2_jax import flops
  c, mc = s.config, s.model_config
  tb, frames, steps = c.train.batch, c.train.clip_frames, c.train.rollout_steps
  ndev = s.mesh.devices.size
  with _mesh(s):
    fns = train_step_builders(s, tb, frames, steps)
    out = {"train_batch": tb, "stage1_clip_frames": frames, "stage3_rollout_steps": steps,
           "stage3_remat": c.train.remat}
    for name in ("stage1", "stage3"):
      fn, (state_spec, *rest) = fns[name]
      compiled = fn.lower(state_spec, *rest).compile()
      out[f"{name}_peak_bytes_per_device"] = memory_bytes(compiled)
      batch = _materialise(rest[-1], c.seed + 10)
      if name == "stage1":
        p = jax.tree.map(lambda x: x.copy(), params)  # the state is donated; `params` stays
        opt = _optimizer(name)
        o_shard = jax.tree.map(lambda x: x.sharding, state_spec[1])
        state = (p, jax.jit(opt.init, out_shardings=o_shard)(p))
        run_step = lambda st: compiled(st, batch)[0]
        fl = flops.stage1_train_flops(mc, batch=tb, frames=frames, tokens=s.tokens, text_len=c.text_len)
        tokens = tb * frames * s.tokens
      else:  # the trainer's state: G, D, both optimisers, EMA, counters (random init)
        state = fns["stage3_init"](c.seed)
        run_step = lambda st: compiled(st, {}, batch)[0]
        fl = flops.stage3_step_flops(mc, batch=tb, steps=steps, tokens=s.tokens, text_len=c.text_len)
        tokens = tb * steps * s.tokens
      ms, _ = time_carry_ms(run_step, state, reps=c.train.reps, warmup=1)
      out[f"{name}_step_ms"] = ms
      out[f"{name}_flops"] = fl
      out[f"{name}_tokens_per_s_per_device"] = tokens / (ms / 1e3) / ndev
      out[f"{name}_mfu"] = fl / (ms / 1e3) / peak
    out["stage3_step"] = "stages/adversarial.py: 1 D update (4 clips: real, fake, perturbed) + 1 G update"
  return out


def _optimizer(name: str):
  import optax
  if name != "stage1":  # stage 3 uses the trainer's own optimisers (stage3_config)
    raise ValueError(f"no benchmark-local optimiser for {name!r}")
  return optax.adamw(1e-5, weight_decay=0.01)


# ------------------------------------------------------------------------------------------------
# AOT: lower and compile paper-scale steps on virtual CPU devices, without running them
# ------------------------------------------------------------------------------------------------

# Each case: what to compile, on how many devices, with which mesh. Training shards parameters
# and optimiser state over every device (ZeRO-3: `embed` over fsdp and sequence) and each sample's
# tokens over `sequence` (the paper's Ulysses context parallelism over 8 GPUs).
_CP_RULES_OVERRIDE = {"embed": ("fsdp", "sequence")}
AOT_CASES = {
    "stream_736x416_n30_1dev": dict(kind="stream", devices=1, height=416, width=736, window=30,
                                    mesh=dict(data=1, fsdp=1, tensor=1, sequence=1), batch=1),
    "stream_1280x720_n15_8dev": dict(kind="stream", devices=8, height=720, width=1280, window=15,
                                     mesh=dict(data=1, fsdp=1, tensor=1, sequence=8), batch=1),
    "stage1_736x416_8dev": dict(kind="stage1", devices=8, height=416, width=736, window=30,
                                mesh=dict(data=1, fsdp=1, tensor=1, sequence=8), batch=1, frames=30),
    "stage3_736x416_8dev": dict(kind="stage3", devices=8, height=416, width=736, window=30,
                                mesh=dict(data=1, fsdp=1, tensor=1, sequence=8), batch=1, frames=30),
    "stage1_736x416_64dev": dict(kind="stage1", devices=64, height=416, width=736, window=30,
                                 mesh=dict(data=1, fsdp=8, tensor=1, sequence=8), batch=8, frames=30),
    "stage3_736x416_64dev": dict(kind="stage3", devices=64, height=416, width=736, window=30,
                                 mesh=dict(data=1, fsdp=8, tensor=1, sequence=8), batch=8, frames=30),
}


def aot_config(case: dict, size: str = "apt2_8b", **model_overrides):
  """The benchmark config of one AOT case (`AOT_CASES` entry)."""
  from apt2_jax.configs import benchmark as bench_cfg
  config = bench_cfg.get_config(size)
  config.height, config.width = case["height"], case["width"]
  config.model.window = case["window"]
  config.batch = case["batch"]
  config.num_devices = case["devices"]
  config.mesh.update(case["mesh"])
  if case["kind"] != "stream":
    config.model.param_dtype = "float32"  # training keeps float32 master weights
    config.train.batch = case["batch"]
    config.train.clip_frames = config.train.rollout_steps = case["frames"]
    config.logical_rules = tuple((k, _CP_RULES_OVERRIDE.get(k, v)) for k, v in config.logical_rules)
  config.model.update(model_overrides)
  return config


def aot_case(name: str, case: dict, *, size: str = "apt2_8b", mfu: float = 0.4, **model_overrides) -> dict:
  """Lowers and compiles one case with abstract inputs; returns FLOPs, bytes and projections."""
  jax = _jax()
  import jax.numpy as jnp
  from apt2_jax import flops
  from apt2_jax.models import count_params, kv_cache
  config = aot_config(case, size, **model_overrides)
  n = case["devices"]
  if len(jax.devices()) < n:
    raise RuntimeError(f"AOT case {name} needs {n} devices, {len(jax.devices())} exist "
                       f"(run with --cpu_devices={n})")
  s = make_setup(config, devices=jax.devices()[:n])
  mc, (h, w) = s.model_config, s.latent_hw
  params = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), _unboxed(s),
                        s.param_sharding)
  row = dict(case=name, kind=case["kind"], devices=n, mesh=dict(case["mesh"]), batch=case["batch"],
             resolution=f"{config.width}x{config.height}", latent=f"{w}x{h}", tokens_per_frame=s.tokens,
             window=mc.window, params=count_params(mc), dtype=mc.dtype, param_dtype=mc.param_dtype,
             remat=mc.remat_policy)
  t0 = time.perf_counter()
  with _mesh(s):
    if case["kind"] == "stream":
      b = case["batch"]
      fns = make_step_fns(s, b)
      cache = jax.eval_shape(lambda: kv_cache.init_cache(mc, b, h, w))
      cache = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=fns["cache_sharding"][k]) for k, v in cache.items()}
      text = jax.eval_shape(lambda: s.text(b, jax.random.key(0)))
      tkv = fns["encode_text"].eval_shape(params, text)
      tkv = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tkv,
                         fns["encode_text"].lower(params, text).compile().output_shardings)
      z = jax.ShapeDtypeStruct((b, 1, h, w, mc.latent_channels), jnp.float32, sharding=fns["z_sharding"])
      compiled = fns["step"].lower(params, cache, tkv, z, z).compile()
      fl = flops.step_flops(mc, batch=b, tokens=s.tokens, text_len=config.text_len, index=mc.window + 2)
      row["kv_cache_bytes"] = kv_cache.cache_bytes(mc, b, h, w)
      row["paper_step_s"] = PAPER_STEP_S if (config.width, config.height, n) == (736, 416, 1) else None
    else:
      fns = train_step_builders(s, case["batch"], case["frames"], case["frames"], abstract=True)
      fn, args = fns[case["kind"]]
      compiled = fn.lower(*args).compile()
      if case["kind"] == "stage1":
        fl = flops.stage1_train_flops(mc, batch=case["batch"], frames=case["frames"], tokens=s.tokens,
                                      text_len=config.text_len)
      else:
        fl = flops.stage3_step_flops(mc, batch=case["batch"], steps=case["frames"], tokens=s.tokens,
                                     text_len=config.text_len)
      row["frames"] = case["frames"]
  row["compile_s"] = time.perf_counter() - t0
  row["flops_per_step"] = fl
  row["bytes_per_device"] = memory_bytes(compiled)
  m = compiled.memory_analysis()
  if m is not None:
    row["memory_analysis"] = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
                                  temp=m.temp_size_in_bytes, alias=m.alias_size_in_bytes)
  row["fits_80gb"] = None if row["bytes_per_device"] is None else row["bytes_per_device"] <= H100_MEMORY_BYTES
  row["assumed_mfu"] = mfu
  row["projected_h100_s"] = fl / (H100_BF16_PEAK * n * mfu)
  if row.get("paper_step_s"):
    row["paper_implied_mfu"] = fl / (H100_BF16_PEAK * n * PAPER_STEP_S)
  return row


def run_aot(names=None, mfu: float = 0.4, subprocesses: bool = True) -> list[dict]:
  """All (or `names`) AOT cases; with `subprocesses`, one process per device count (the number of
  virtual CPU devices is fixed when a backend starts)."""
  names = list(names or AOT_CASES)
  if not subprocesses:
    return [aot_case(n, AOT_CASES[n], mfu=mfu) for n in names]
  rows = []
  groups: dict[int, list[str]] = {}
  for n in names:  # the 1-device case runs with the 8-device group (it uses device 0 only)
    groups.setdefault(max(8, AOT_CASES[n]["devices"]), []).append(n)
  import tempfile
  tmp = tempfile.mkdtemp(prefix="apt2_aot_")
  procs = []
  for devices, group in sorted(groups.items()):  # concurrently: compilation is mostly single-threaded
    out = os.path.join(tmp, f"aot_{devices}.json")
    cmd = [sys.executable, "-m", "apt2_jax.benchmark", f"--cpu_devices={devices}",
           f"--aot_cases={','.join(group)}", f"--aot_mfu={mfu}", f"--json_out={out}"]
    logging.info("AOT: %s", " ".join(cmd))
    procs.append((subprocess.Popen(cmd, env=dict(os.environ, JAX_PLATFORMS="cpu")), out, cmd))
  for proc, out, cmd in procs:
    if proc.wait():
      raise RuntimeError(f"AOT subprocess failed ({proc.returncode}): {' '.join(cmd)}")
    rows.extend(json.load(open(out))["aot"])
  order = {n: i for i, n in enumerate(names)}
  rows.sort(key=lambda r: order[r["case"]])
  return rows


def aot_table(rows: list[dict]) -> str:
  head = (f"{'case':26s} {'dev':>3s} {'mesh (d,f,t,s)':>14s} {'tokens':>8s} {'TFLOP/step':>11s} "
          f"{'GB/dev':>7s} {'state GB':>8s} {'fits 80GB':>9s} {'H100 s @MFU':>11s} {'compile s':>9s}")
  lines = [head, "-" * len(head)]
  for r in rows:
    m = r["mesh"]
    gb = "n/a" if r["bytes_per_device"] is None else f"{r['bytes_per_device'] / 1e9:.1f}"
    state = r.get("memory_analysis", {}).get("argument")
    state = "n/a" if state is None else f"{state / 1e9:.1f}"
    toks = r["tokens_per_frame"] * r["batch"] * r.get("frames", 1)
    mesh = f"{m['data']},{m['fsdp']},{m['tensor']},{m['sequence']}"
    lines.append(f"{r['case']:26s} {r['devices']:3d} {mesh:>14s} "
                 f"{toks:8d} {r['flops_per_step'] / 1e12:11.1f} {gb:>7s} {state:>8s} {str(r['fits_80gb']):>9s} "
                 f"{r['projected_h100_s']:11.3f} {r['compile_s']:9.1f}")
  mfu = rows[0]["assumed_mfu"] if rows else 0
  lines.append(f"H100 s @MFU: FLOPs / ({H100_BF16_PEAK / 1e12:.0f} TFLOP/s x devices x MFU {mfu}). GB/dev: "
               "memory_analysis() peak (arguments + outputs + temporaries - aliased); state GB: "
               "arguments alone (parameters, optimiser state, KV cache).")
  for r in rows:
    if r.get("paper_implied_mfu"):
      lines.append(f"{r['case']}: the paper's {PAPER_STEP_S} s/step implies MFU "
                   f"{r['paper_implied_mfu']:.3f}; projected at MFU {mfu}: {r['projected_h100_s']:.3f} s.")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Run and report
# ------------------------------------------------------------------------------------------------

def run(config) -> dict:
  """All benchmark figures for `config` (an `experiments/benchmark.py` config) as a dict."""
  jax = _jax()
  s = make_setup(config)
  mc = s.model_config
  devices = s.mesh.devices
  result = dict(
      device_kind=devices.flat[0].device_kind, platform=devices.flat[0].platform,
      device_count=int(devices.size), jax_version=jax.__version__,
      mesh={k: int(v) for k, v in s.mesh.shape.items()}, size=config.size,
      config=json.loads(config.to_json_best_effort()),
      batch=config.batch, resolution=f"{config.width}x{config.height}",
      latent=f"{s.latent_hw[1]}x{s.latent_hw[0]}", tokens_per_frame=s.tokens, window=mc.window,
      params=int(sum(math.prod(x.shape) for x in jax.tree.leaves(_unboxed(s)))),
      dtype=mc.dtype)
  t0 = time.perf_counter()
  progress = lambda what: print(f"[benchmark {time.perf_counter() - t0:6.0f} s] {what}", flush=True)
  progress(f"{config.size}: {result['params']:,} parameters on {result['device_count']} "
           f"{result['platform']} device(s); measuring peak FLOP/s")
  peak, source = peak_flops(s.mesh, mc.dtype, config.peak_matmul)
  result.update(peak_flops=peak, peak_source=source)
  params = init_sharded_params(s, config.seed)
  progress("streaming: cached step, latency growth, no-cache recompute, peer block")
  stream, fns, inputs = streaming_figures(s, params, peak)
  result.update(stream)
  progress(f"VAE decode ({config.vae_size}) and first frame; DiT step {stream['step_latency_ms']:.2f} ms")
  result.update(vae_figures(s, params, fns, inputs))
  result["fps"] = VIDEO_FRAMES_PER_LATENT / ((result["step_latency_ms"] + result["decode_latency_ms"]) / 1e3)
  result["fps_dit_only"] = VIDEO_FRAMES_PER_LATENT / (result["step_latency_ms"] / 1e3)
  if config.train.enabled:
    progress("training: stage-1 and stage-3 steps (compile, then timed)")
    result.update(training_figures(s, params, peak))
  progress("done")
  return result


_TABLE_ROWS = [
    ("device", "{device_kind} x{device_count} ({platform}), jax {jax_version}"),
    ("model", "{size}: {params:,} params, {dtype}, N={window}, batch {batch}, {resolution} px "
              "({latent} latent, {tokens_per_frame} tokens/frame)"),
    ("step latency", "{step_latency_ms:.2f} ms  (frame 50: {step_latency_ms_at_frame_50:.2f}, "
                     "frame 1000: {step_latency_ms_at_frame_1000:.2f}; growth {latency_growth:.3f})"),
    ("decode latency", "{decode_latency_ms:.2f} ms  (VAE {vae_size})"),
    ("fps", "{fps:.2f} video frames/s per stream  (DiT only {fps_dit_only:.2f})"),
    ("first frame", "{first_frame_latency_ms:.1f} ms"),
    ("MFU", "{mfu:.3f}  ({step_tflops_per_s:.3f} TFLOP/s of {peak_flops:.3g} FLOP/s: {peak_source})"),
    ("cache speedup", "{cache_speedup:.2f}x  (recompute {cache_window_frames} frames: {recompute_latency_ms:.2f} ms)"),
    ("NFE speedup", "{nfe_speedup:.2f}x  (peer block, k={peer_steps}: {peer_block_latency_ms:.2f} ms)"),
    ("stage-1 step", "{stage1_step_ms:.1f} ms, {stage1_tokens_per_s_per_device:,.0f} tokens/s/device, "
                     "MFU {stage1_mfu:.3f}, peak {stage1_peak_bytes_per_device:,} B/device"),
    ("stage-3 step", "{stage3_step_ms:.1f} ms, {stage3_tokens_per_s_per_device:,.0f} tokens/s/device, "
                       "MFU {stage3_mfu:.3f}, peak {stage3_peak_bytes_per_device:,} B/device"),
]


def table(result: dict) -> str:
  lines = []
  for name, fmt in _TABLE_ROWS:
    try:
      lines.append(f"{name:15s} {fmt.format(**result)}")
    except (KeyError, TypeError, ValueError):
      continue
  return "\n".join(lines)


def _write(result: dict, path: str | None):
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(result, f, indent=2, sort_keys=True, default=str)
      f.write("\n")


def main(argv):
  del argv
  if FLAGS.cpu_devices:
    import jax
    jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
  if FLAGS.aot or FLAGS.aot_cases:
    names = [n for n in FLAGS.aot_cases.split(",") if n] or None
    unknown = sorted(set(names or ()) - set(AOT_CASES))
    if unknown:
      raise app.UsageError(f"unknown --aot_cases {unknown}; known: {sorted(AOT_CASES)}")
    t0 = time.perf_counter()
    rows = run_aot(names, FLAGS.aot_mfu, subprocesses=not FLAGS.aot_cases)
    jax = _jax()
    result = dict(aot=rows, jax_version=jax.__version__, model="apt2_8b",
                  h100_bf16_peak_flops=H100_BF16_PEAK, paper_step_s=PAPER_STEP_S,
                  wall_s=time.perf_counter() - t0,
                  note="Compiled for virtual CPU devices: bytes come from XLA:CPU's memory_analysis "
                       "with the XLA attention path (no flash attention); FLOPs are analytic.")
    if not FLAGS.aot_cases:
      print(aot_table(rows))
    _write(result, FLAGS.json_out)
    return
  config = _CONFIG.value
  if config is None:  # no --config: the package's default, from any directory
    from apt2_jax.configs import benchmark as bench_cfg
    config = bench_cfg.get_config("small")
  result = run(config)
  print(table(result))
  _write(result, FLAGS.json_out)


from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/benchmark.py:<size> "
                                          "(default: apt2_jax.configs.benchmark, small)",
                                          lock_config=True)

if __name__ == "__main__":
  app.run(main)
