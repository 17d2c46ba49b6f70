"""Compile-only (AOT) analysis: lower and compile paper-scale steps on virtual CPU devices,
without running them. FLOPs are analytic (`apt2_jax.flops`); bytes come from `memory_analysis()`.

The streaming case compiles the benchmark's `generation.stream.step`; the training cases compile
the stages' own guarded train steps (`training.stage_step`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import logging

from .timing import H100_BF16_PEAK, H100_MEMORY_BYTES, PAPER_STEP_S, memory_bytes

# XLA:CPU has no bfloat16 matrix products: float normalisation upcasts each product's operands,
# and while-loop-invariant code motion then hoists the convert of the whole stacked bf16 weights
# and KV cache out of the layer loop (float32 copies of both: the 736x416, N = 30 streaming step
# compiled to 112.5 GB, 78.9 of them temporaries). GPUs multiply bf16 natively (no converts to
# hoist), so the analysis disables that pass to measure the step's own buffers: 45.7 GB
# (parameters + cache 33.6, temporaries 12.1). Set before the backend starts (`cli.main`).
AOT_XLA_FLAGS = ("--xla_disable_hlo_passes=while-loop-invariant-code-motion",)


def add_aot_xla_flags():
  """Appends `AOT_XLA_FLAGS` to XLA_FLAGS (call before the backend starts; subprocesses inherit)."""
  given = os.environ.get("XLA_FLAGS", "").split()
  os.environ["XLA_FLAGS"] = " ".join(given + [f for f in AOT_XLA_FLAGS if f not in given])


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


# The attention every case compiles: the chunked online-softmax kernels for the whole-clip passes
# and the cross-attention (`attention.block_causal_kernel`, `cross_kernel`: "chunked"), the memory
# a flash kernel needs (no [tokens x tokens] logits kept by either pass). cuDNN flash attention, the
# GPUs' default for bf16 where the queries are not sequence-sharded, cannot be compiled for CPU
# devices; the XLA path of `jax.nn.dot_product_attention` ("xla") materialises each query chunk's
# logits and probabilities (stage 1 at apt2_8b on 8 devices: 128.7 GB with it). The cached steps
# of the rollouts and the stream take the CPU's einsum kernel (`attention.step_implementation`).
AOT_ATTENTION = "chunked"

_KERNEL_WORDS = {
    "chunked": "chunked online softmax ({cq} query x {ck} key frames per chunk, per-chunk remat; "
               "no logits kept: a flash kernel's memory)",
    "gathered": "gathered per query frame, jax.nn.dot_product_attention (xla), materialised logits",
    "cudnn": "gathered per query frame, cuDNN flash attention",
    "dense": "dense heads-major einsums over the clip ([heads, queries, keys] logits)",
    "xla": "jax.nn.dot_product_attention (xla) per frame, materialised logits",
}


def attention_description(model_config, kind: str, frames: int, tokens_per_frame: int, text_len: int) -> str:
  """What a row's attention is, in words: the kernels `model_config` resolves to at this shape
  (`attention.block_causal_kernel`, `cross_kernel`, `step_implementation`) outside a mesh."""
  import jax.numpy as jnp
  from apt2_jax.models import attention
  mc = model_config
  impl, p, f, dtype, head_dim = mc.attention_impl, tokens_per_frame, frames, jnp.dtype(mc.dtype), mc.dim // mc.num_heads
  step = attention.step_implementation(impl)
  cached = ("heads-major einsums over the KV cache (the CPU kernel)" if step == "einsum" else
            f"jax.nn.dot_product_attention ({step or 'xla'}) over the KV cache")
  if kind == "stream":
    return f"cached step: {cached}"
  cq = attention._frames_per_chunk(mc.query_chunk, p, f)  # pylint: disable=protected-access
  ck = attention._frames_per_chunk(mc.key_chunk, p, max(1, min(mc.window + cq, f - 1)))  # pylint: disable=protected-access
  words = lambda kernel: _KERNEL_WORDS[kernel].format(cq=cq, ck=ck)
  self_kernel = attention.block_causal_kernel(f, mc.window, impl, p, dtype, head_dim)
  cross = attention.cross_kernel(f * p, text_len, impl, dtype, head_dim)
  text = f"block-causal: {words(self_kernel)}; cross-attention: {words(cross)}"
  return text + (f"; rollout steps: {cached}" if kind != "stage1" else "")


def aot_config(case: dict, size: str = "apt2_8b", **model_overrides):
  """The benchmark config of one AOT case (`AOT_CASES` entry)."""
  from apt2_jax.configs import benchmark as bench_cfg
  config = bench_cfg.get_config(size)
  config.model.attention_impl = AOT_ATTENTION
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
  import jax
  from apt2_jax import flops
  from apt2_jax.models import count_params, kv_cache
  from . import streaming, training
  from .setup import make_setup
  config = aot_config(case, size, **model_overrides)
  n = case["devices"]
  if len(jax.devices()) < n:
    raise RuntimeError(f"AOT case {name} needs {n} devices, {len(jax.devices())} exist "
                       f"(run with --cpu_devices={n})")
  s = make_setup(config, devices=jax.devices()[:n])
  mc, (h, w) = s.model_config, s.latent_hw
  row = dict(case=name, kind=case["kind"], devices=n, mesh=dict(case["mesh"]), batch=case["batch"],
             resolution=f"{config.width}x{config.height}", latent=f"{w}x{h}", tokens_per_frame=s.tokens,
             window=mc.window, params=count_params(mc), dtype=mc.dtype, param_dtype=mc.param_dtype,
             remat=mc.remat_policy,
             attention=attention_description(mc, case["kind"], case.get("frames", 1), s.tokens, config.text_len))
  t0 = time.perf_counter()
  with s.use_mesh():
    if case["kind"] == "stream":
      b = case["batch"]
      fns = streaming.stream_fns(s, b)
      compiled = fns.step.lower(*streaming.abstract_step_args(s, fns, b)).compile()
      fl = flops.step_flops(mc, batch=b, tokens=s.tokens, text_len=config.text_len, index=mc.window + 2)
      row["kv_cache_bytes"] = kv_cache.cache_bytes(mc, b, h, w)
      row["paper_step_s"] = PAPER_STEP_S if (config.width, config.height, n) == (736, 416, 1) else None
    else:
      st = training.stage_step(s, case["kind"], case["batch"], case["frames"])
      compiled = st.fn.lower(*st.args).compile()
      fl = training.step_flops(s, case["kind"], case["batch"], case["frames"])
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
  groups: dict[int, list[str]] = {}
  for n in names:  # the 1-device case runs with the 8-device group (it uses device 0 only)
    groups.setdefault(max(8, AOT_CASES[n]["devices"]), []).append(n)
  tmp = tempfile.mkdtemp(prefix="apt2_aot_")
  procs = []
  for devices, group in sorted(groups.items()):  # concurrently: compilation is mostly single-threaded
    out = os.path.join(tmp, f"aot_{devices}.json")
    cmd = [sys.executable, "-m", "apt2_jax.benchmark", f"--cpu_devices={devices}",
           f"--aot_cases={','.join(group)}", f"--aot_mfu={mfu}", f"--json_out={out}"]
    logging.info("AOT: %s", " ".join(cmd))
    procs.append((subprocess.Popen(cmd, env=dict(os.environ, JAX_PLATFORMS="cpu")), out, cmd))
  rows = []
  for proc, out, cmd in procs:
    if proc.wait():
      raise RuntimeError(f"AOT subprocess failed ({proc.returncode}): {' '.join(cmd)}")
    with open(out) as f:
      rows.extend(json.load(f)["aot"])
  order = {n: i for i, n in enumerate(names)}
  rows.sort(key=lambda r: order[r["case"]])
  return rows


def aot_result(names=None, mfu: float = 0.4, subprocesses: bool = True) -> dict:
  """The JSON object of an AOT run: the rows and what they assume."""
  import jax
  t0 = time.perf_counter()
  rows = run_aot(names, mfu, subprocesses)
  return dict(aot=rows, jax_version=jax.__version__, model="apt2_8b", h100_bf16_peak_flops=H100_BF16_PEAK,
              paper_step_s=PAPER_STEP_S, wall_s=time.perf_counter() - t0,
              xla_flags=os.environ.get("XLA_FLAGS", ""),
              note="Compiled for virtual CPU devices: bytes come from XLA:CPU's memory_analysis "
                   "with the attention each row names (the chunked online-softmax kernels: the memory "
                   "of a flash kernel) and `AOT_XLA_FLAGS`; FLOPs are analytic.")
