"""Streaming figures, measured on the generation path's own stream functions.

The cached step, the text K/V, the stream state, the first frame and the decode are
`apt2_jax.generation.stream`'s `step`, `text`, `init_state`, `start` and `decode` (jitted here
with the benchmark mesh's shardings; the VAE runs unsharded on the first device, as
`stream.compiled` does). Only the deliberately different comparisons are benchmark code:

  step_latency_ms         median `stream.step` with a full window (cache index N + 2)
  decode_latency_ms       median `stream.decode` of one latent frame (4 video frames)
  first_frame_latency_ms  image -> first 4 generated video frames: `stream.start` (VAE encode of
                          the image, decode of frame 0), `stream.text`, the first `stream.step`,
                          `stream.decode` of frame 1
  mfu                     analytic step FLOPs (`apt2_jax.flops`) / step time / peak FLOP/s
                          (on CPUs the peak is a matmul measured in the same process)
  ms_per_forward          the step's ms per DiT forward pass (1 for the 1-NFE step; the peer
                          block's is `peer_ms_per_forward`, k + 1 passes)
  step_{attention,linear,cache_update,layer_slices,other}_ms
                          where the steady step's time goes, from a `jax.profiler` trace
                          (`breakdown.step_breakdown`; off with `config.breakdown = False`)
  cache_speedup           block-causal whole-window recompute (sink + N + new = N + 2 frames, the
                          exact input the cached step replaces; benchmark code) / cached step
  nfe_speedup             peer-style block / 1-NFE step. The peer block is `stream.step` under the
                          sampler a peer runs per block (k Euler passes + 1 clean cache-writing
                          pass: `RolloutOptions(num_steps=k, cache_from="clean")`)
  latency_growth          step at frame 1000 / step at frame 50 (positions are bounded: ~1)
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp

from apt2_jax import controls as controls_lib
from apt2_jax import flops, sharding
from apt2_jax.generation import Generator, stream
from apt2_jax.models import kv_cache
from apt2_jax.models import vae as vae_lib
from apt2_jax.rollout import RolloutOptions

from . import breakdown
from .setup import Setup
from .timing import block, median, time_carry_ms, time_ms


def generator(s: Setup, params, vae_params=None) -> Generator:
  """The benchmark's random weights as a `generation.Generator` (its `spec` drives the stream)."""
  mc = s.model_config
  kind, encoding = controls_lib.encoding_from_channels(mc.control_channels)
  return Generator(mc, params, s.vae_config, vae_params, control_type=kind, control_encoding=encoding,
                   control_dim=controls_lib.CONTROL_DIM[kind], height=int(s.config.height),
                   width=int(s.config.width), text_len=int(s.config.text_len), stage="random",
                   source="benchmark")


def peer_options(k: int) -> RolloutOptions:
  """A peer's block: k denoising passes, then one clean pass that writes the cache."""
  return RolloutOptions(num_steps=int(k), cache_from="clean")


@dataclasses.dataclass
class StreamFns:
  """`generation.stream` functions jitted with the mesh's shardings; `step`/`peer` donate the state.

  step(params, state, text_kv, control) -> (latent, state)   `stream.step` of the 1-NFE generator
  peer(params, state, text_kv, control) -> (latent, state)   `stream.step` under `peer_options`
  text(params, prompt) -> text_kv                             `stream.text`
  new_state(latent0, index) -> state                          `stream.init_state` at cache index
  """
  spec: stream.StreamSpec
  peer_spec: stream.StreamSpec
  step: Any
  peer: Any
  text: Any
  new_state: Any
  state_sharding: Any
  z_sharding: Any
  text_sharding: Any
  control_sharding: Any
  control_dim: int

  def control(self, batch: int):
    """Raw controls of one step (zeros, [B, 4, D]), or None for a model without control."""
    if not self.control_dim:
      return None
    c = jnp.zeros((batch, stream.FRAMES_PER_STEP, self.control_dim), jnp.float32)
    return jax.device_put(c, self.control_sharding)


def stream_fns(s: Setup, batch: int, seed: int = 0) -> StreamFns:
  mc, (h, w) = s.model_config, s.latent_hw
  gen = generator(s, None)
  spec, peer_spec = gen.spec(RolloutOptions(), 1.0), gen.spec(peer_options(s.config.peer_steps), 1.0)
  cache_shapes = jax.eval_shape(lambda: kv_cache.init_cache(mc, batch, h, w))
  z_shard = s.batch_sharding((batch, 1, h, w, mc.latent_channels))
  state_shard = {"cache": sharding.cache_shardings(cache_shapes, s.mesh, s.rules), "recycled": z_shard,
                 "seed": s.replicated(), "counter": s.replicated()}
  prompt = s.text_shape(batch)
  tkv_shapes = jax.eval_shape(lambda p, t: stream.text(spec, p, t), s.abstract_params, prompt)
  t_shard = sharding.text_kv_shardings(tkv_shapes, s.mesh, s.rules)
  c_shard = s.batch_sharding((batch, stream.FRAMES_PER_STEP, gen.control_dim)) if gen.control_dim else None

  def jit_step(sp):
    return jax.jit(lambda p, st, tkv, c: stream.step(sp, p, st, tkv, c),
                   in_shardings=(s.param_sharding, state_shard, t_shard, c_shard),
                   out_shardings=(z_shard, state_shard), donate_argnums=(1,))

  def new_state(latent0, index):
    state = stream.init_state(spec, latent0, seed)
    return dict(state, cache=dict(state["cache"], index=index), counter=index)

  return StreamFns(
      spec=spec, peer_spec=peer_spec, step=jit_step(spec), peer=jit_step(peer_spec),
      text=jax.jit(lambda p, t: stream.text(spec, p, t),
                   in_shardings=(s.param_sharding, s.batch_sharding(prompt.shape)), out_shardings=t_shard),
      new_state=jax.jit(new_state, in_shardings=(z_shard, s.replicated()), out_shardings=state_shard),
      state_sharding=state_shard, z_sharding=z_shard, text_sharding=t_shard, control_sharding=c_shard,
      control_dim=gen.control_dim)


def abstract_step_args(s: Setup, fns: StreamFns, batch: int):
  """(params, state, text_kv, control) of `fns.step` as sharded `ShapeDtypeStruct`s (AOT)."""
  mc, (h, w) = s.model_config, s.latent_hw
  params = s.sharded_abstract_params()
  z = jax.ShapeDtypeStruct((batch, 1, h, w, mc.latent_channels), jnp.float32)
  state = jax.eval_shape(fns.new_state, z, jax.ShapeDtypeStruct((), jnp.int32))
  text_kv = jax.eval_shape(fns.text, params, s.text_shape(batch))
  with_sharding = lambda tree, shardings: jax.tree.map(
      lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree, shardings)
  control = None
  if fns.control_dim:
    control = jax.ShapeDtypeStruct((batch, stream.FRAMES_PER_STEP, fns.control_dim), jnp.float32,
                                   sharding=fns.control_sharding)
  return params, with_sharding(state, fns.state_sharding), with_sharding(text_kv, fns.text_sharding), control


def make_recompute_fn(s: Setup, batch: int, frames: int):
  """No-cache baseline: the block-causal whole-clip pass over the `frames`-frame window."""
  mc, (h, w) = s.model_config, s.latent_hw
  zs = s.batch_sharding((batch, frames, h, w, mc.latent_channels))

  def recompute(params, noise, recycled, text):
    v = s.model.apply({"params": params}, noise, recycled, None, jnp.ones((batch,)), text,
                      mode="block_causal")
    return noise[:, -1:] - v[:, -1:]
  return jax.jit(recompute, in_shardings=(s.param_sharding, zs, zs, s.batch_sharding(s.text_shape(batch).shape)))


def dit_figures(s: Setup, fns: StreamFns, params, prompt, peak: float, inspect=None) -> dict:
  """Cached step (steady and at the growth frames), peer block, recompute, FLOPs and MFU.

  `inspect` (`programs.Inspect`): profile the steady step, dump its cost analysis."""
  c, mc, (h, w) = s.config, s.model_config, s.latent_hw
  b, n = c.batch, mc.window
  ks = jax.random.split(jax.random.key(c.seed + 1), 2)
  latent0 = jax.device_put(jax.random.normal(ks[0], (b, 1, h, w, mc.latent_channels)), fns.z_sharding)
  control = fns.control(b)
  out = {}
  with s.use_mesh():
    tkv = fns.text(params, prompt)

    def timed(fn, index, reps):
      state = fns.new_state(latent0, jnp.int32(index))
      ms, _ = time_carry_ms(lambda st: fn(params, st, tkv, control)[1], state, reps=reps, warmup=c.warmup)
      return ms

    steady = n + 2  # the ring is full from index N + 1 on
    out["step_latency_ms"] = timed(fns.step, steady, c.reps)
    out["ms_per_forward"] = out["step_latency_ms"]  # the 1-NFE step is one forward pass
    if c.get("breakdown", True):
      compiled = fns.step.lower(*abstract_step_args(s, fns, b)).compile()
      figures, _ = breakdown.step_breakdown(lambda st: compiled(params, st, tkv, control)[1],
                                            fns.new_state(latent0, jnp.int32(steady)), compiled.as_text())
      out.update({f"step_{k}": v for k, v in figures.items()})
    if inspect is not None:
      inspect.profile("stream_step", lambda st: fns.step(params, st, tkv, control)[1],
                      fns.new_state(latent0, jnp.int32(steady)))
      if inspect.dump_dir:
        cost = inspect.dump("stream_step", fns.step.lower(*abstract_step_args(s, fns, b)).compile())
        out["step_xla_flops"] = cost.get("flops")
    peer_ms = timed(fns.peer, steady, max(2, c.reps // 2))
    out["peer_block_latency_ms"] = peer_ms
    out["peer_ms_per_forward"] = peer_ms / (c.peer_steps + 1)  # k denoising passes + 1 clean pass
    out["nfe_speedup"] = peer_ms / out["step_latency_ms"]
    g0, g1 = c.growth_frames
    growth = [timed(fns.step, g, c.reps) for g in (g0, g1)]
    out[f"step_latency_ms_at_frame_{g0}"], out[f"step_latency_ms_at_frame_{g1}"] = growth
    out["latency_growth"] = growth[1] / growth[0]

    window_frames = n + 2  # sink + N window frames + the new frame
    recompute = make_recompute_fn(s, b, window_frames)
    shape = (b, window_frames, h, w, mc.latent_channels)
    clip = jax.device_put(jax.random.normal(ks[1], shape), s.batch_sharding(shape))
    out["recompute_latency_ms"] = time_ms(recompute, (params, clip, clip, prompt), reps=max(2, c.reps // 2),
                                          warmup=c.warmup)
    out["cache_speedup"] = out["recompute_latency_ms"] / out["step_latency_ms"]

  step_flops = flops.step_flops(mc, batch=b, tokens=s.tokens, text_len=c.text_len, index=steady)
  out["step_flops"] = step_flops
  out["step_tflops_per_s"] = step_flops / (out["step_latency_ms"] / 1e3) / 1e12
  out["mfu"] = step_flops / (out["step_latency_ms"] / 1e3) / peak
  out["peer_steps"] = c.peer_steps
  out["cache_window_frames"] = window_frames
  return out


def vae_figures(s: Setup, fns: StreamFns, params, prompt, inspect=None) -> dict:
  """`stream.decode` of one latent frame, and the first-frame latency of a new stream."""
  c, (h, w) = s.config, s.latent_hw
  b, vcfg = c.batch, s.vae_config
  if vcfg.z_dim != s.model_config.latent_channels:
    raise ValueError(f"config.vae_size={c.vae_size!r} has {vcfg.z_dim} latent channels, the model "
                     f"{s.model_config.latent_channels}")
  device = s.mesh.devices.flat[0]  # the VAE runs unsharded on the first device
  vae = vae_lib.VAE(vcfg)
  vparams = jax.device_put(vae_lib.init_params(vae, jax.random.key(c.seed + 2), 16, 16), device)
  jitted = stream.compiled(fns.spec)  # start / decode: unsharded, where the VAE parameters live
  z = jax.device_put(jax.random.normal(jax.random.key(c.seed + 3), (b, 1, h, w, vcfg.z_dim)), device)
  _, dcache = jitted.decode(vparams, vae_lib.init_decode_cache(vae, b, h, w), z, first=True)
  if inspect is not None and inspect.dump_dir:
    inspect.dump("vae_decode", jitted.decode.lower(vparams, dcache, z).compile())
  decode_ms, dcache = time_carry_ms(lambda dc: jitted.decode(vparams, dc, z)[1], dcache, reps=c.reps,
                                    warmup=c.warmup)
  if inspect is not None:
    inspect.profile("vae_decode", lambda dc: jitted.decode(vparams, dc, z)[1], dcache)
  out = {"decode_latency_ms": decode_ms, "vae_size": c.vae_size}

  image = jax.device_put(jnp.zeros((b, c.height, c.width, 3), jnp.uint8), device)
  control = fns.control(b)

  def first_frame():
    t0 = time.perf_counter()
    frame0, state, dcache = jitted.start(vparams, image, c.seed)
    with s.use_mesh():
      state = jax.device_put(state, fns.state_sharding)
      x1, _ = fns.step(params, state, fns.text(params, prompt), control)
    video, _ = jitted.decode(vparams, dcache, jax.device_put(x1, device))
    block((frame0, video))
    return (time.perf_counter() - t0) * 1e3
  first_frame()  # compile
  out["first_frame_latency_ms"] = median(first_frame() for _ in range(c.first_frame_reps))
  return out


def streaming_figures(s: Setup, params, peak: float, progress=lambda what: None, inspect=None) -> dict:
  """Every streaming figure of `s.config` (the DiT's, then the VAE's); `inspect`
  (`programs.Inspect`) profiles the steady step and decode and dumps their cost analyses."""
  c = s.config
  fns = stream_fns(s, c.batch, c.seed)
  prompt = jax.device_put(s.text(c.batch, jax.random.key(c.seed + 4)), s.batch_sharding(s.text_shape(c.batch).shape))
  out = dit_figures(s, fns, params, prompt, peak, inspect)
  progress(f"VAE decode ({c.vae_size}) and first frame; DiT step {out['step_latency_ms']:.2f} ms")
  out.update(vae_figures(s, fns, params, prompt, inspect))
  return out
