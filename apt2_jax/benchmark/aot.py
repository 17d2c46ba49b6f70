"""Compile-only (AOT) analysis: lower and compile paper-scale steps on virtual CPU devices,
without running them. FLOPs are analytic (`apt2_jax.flops`); bytes come from `memory_analysis()`.

    python -m apt2_jax.benchmark --aot --json_out=FILE               # the apt2_8b benchmark cases
    python -m apt2_jax.benchmark --aot_cases=targets --json_out=FILE  # a group or named cases
    python -m apt2_jax.tools.finetune_cost --json_out=FILE           # the wan_1_3b fine-tune cases

All of these go through `measure`: it compiles every case with `AOT_XLA_FLAGS` (in this process
while its backend has not started, else in a fresh subprocess), prints each row's per-device
argument, output, temporary and peak bytes as soon as it is compiled, and rewrites `json_out`
after each one (a partial run keeps what it measured).

The streaming case compiles the benchmark's `generation.stream.step`; the training cases compile
the stages' own guarded train steps (`training.stage_step`), with the sharding option each names.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import logging

from .timing import H100_BF16_PEAK, H100_MEMORY_BYTES, PAPER_STEP_S, memory_bytes

# XLA:CPU has no bfloat16 matrix products: float normalisation upcasts each product's operands,
# and while-loop-invariant code motion then hoists the convert of the whole stacked bf16 weights
# and KV cache out of the layer loop (float32 copies of both: the 736x416, N = 30 streaming step
# compiled to 112.5 GB, 78.9 of them temporaries). GPUs multiply bf16 natively (no converts to
# hoist), so the analysis disables that pass to measure the step's own buffers: 45.7 GB
# (parameters + cache 33.6, temporaries 12.1). Set before the backend starts (`measure` does).
AOT_XLA_FLAGS = ("--xla_disable_hlo_passes=while-loop-invariant-code-motion",)
_flags_before_start = False  # set by `add_aot_xla_flags` when it ran before this process's backend


def _backend_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return xla_bridge.backends_are_initialized()


def add_aot_xla_flags():
  """Appends `AOT_XLA_FLAGS` to XLA_FLAGS (call before the backend starts; subprocesses inherit)."""
  global _flags_before_start
  given = os.environ.get("XLA_FLAGS", "").split()
  os.environ["XLA_FLAGS"] = " ".join(given + [f for f in AOT_XLA_FLAGS if f not in given])
  if "jax" not in sys.modules or not _backend_started():
    _flags_before_start = True


# Each case: what to compile (`kind`: stream, stage1, stage3, long_video), at which model size, on
# how many devices, with which mesh, clip and model overrides. Training shards the parameters and
# optimiser state over every device (`embed` over fsdp and sequence: `sharding.ZERO_OVER_SEQUENCE`)
# and each sample's tokens over `sequence` (the paper's Ulysses context parallelism over 8 GPUs).
_ONE = dict(data=1, fsdp=1, tensor=1, sequence=1)
_CP8 = dict(data=1, fsdp=1, tensor=1, sequence=8)    # each sample's tokens over 8 devices
_CP8_FSDP8 = dict(data=1, fsdp=8, tensor=1, sequence=8)  # 64 devices: 8 samples x 8
_PAPER = dict(size="apt2_8b", height=416, width=736, window=30)  # 736x416, N = 30 (5 s)
# wan_1_3b as the README's fine-tune commands train it: Wan2.1's 832x480, 81-frame clips (21 latent
# frames, N = 21: the whole clip), bfloat16 compute (float32 master weights and optimiser state),
# every block rematerialised, the block-causal pass one query frame at a time.
_WAN = dict(size="wan_1_3b", height=480, width=832, window=21)
WAN_TRAIN_MODEL = dict(dtype="bfloat16", remat_policy="full", query_chunk=1)
WAN_STREAM_MODEL = dict(dtype="bfloat16", param_dtype="bfloat16")

AOT_CASES = {
    # The benchmark's apt2_8b cases (`python -m apt2_jax.benchmark --aot`).
    "stream_736x416_n30_1dev": dict(kind="stream", devices=1, mesh=_ONE, batch=1, **_PAPER),
    "stream_1280x720_n15_8dev": dict(kind="stream", devices=8, mesh=_CP8, batch=1,
                                     **dict(_PAPER, height=720, width=1280, window=15)),
    "stage1_736x416_8dev": dict(kind="stage1", devices=8, mesh=_CP8, batch=1, frames=30, **_PAPER),
    "stage3_736x416_8dev": dict(kind="stage3", devices=8, mesh=_CP8, batch=1, frames=30, **_PAPER),
    "stage1_736x416_64dev": dict(kind="stage1", devices=64, mesh=_CP8_FSDP8, batch=8, frames=30, **_PAPER),
    "stage3_736x416_64dev": dict(kind="stage3", devices=64, mesh=_CP8_FSDP8, batch=8, frames=30, **_PAPER),
    # The wan_1_3b fine-tune cases (`python -m apt2_jax.tools.finetune_cost`).
    "wan_stream_1dev": dict(kind="stream", devices=1, mesh=_ONE, batch=1, model=WAN_STREAM_MODEL, **_WAN),
    "wan_stage1_1dev": dict(kind="stage1", devices=1, mesh=_ONE, batch=1, frames=21, model=WAN_TRAIN_MODEL, **_WAN),
    "wan_stage1_8dev": dict(kind="stage1", devices=8, mesh=_CP8, batch=1, frames=21, model=WAN_TRAIN_MODEL, **_WAN),
    "wan_stage3_1dev": dict(kind="stage3", devices=1, mesh=_ONE, batch=1, frames=20, model=WAN_TRAIN_MODEL, **_WAN),
    "wan_stage3_8dev": dict(kind="stage3", devices=8, mesh=_CP8, batch=1, frames=20, model=WAN_TRAIN_MODEL, **_WAN),
    # The configs' own rules (what `--config.mesh.sequence=8` alone gives): parameters and
    # optimiser state replicated over the 8 context-parallel devices.
    "wan_stage1_8dev_replicated": dict(kind="stage1", devices=8, mesh=_CP8, batch=1, frames=21,
                                       model=WAN_TRAIN_MODEL, over_sequence=False, **_WAN),
    "wan_stage3_8dev_replicated": dict(kind="stage3", devices=8, mesh=_CP8, batch=1, frames=20,
                                       model=WAN_TRAIN_MODEL, over_sequence=False, **_WAN),
}
# The issue-28 targets: every stage at both sizes on 8 and 64 devices with the stage configs'
# defaults (parameters and optimiser state over fsdp x sequence; D's clips one pass at a time; G
# ZeRO-2 at wan_1_3b as the paper, ZeRO-3 at apt2_8b, D ZeRO-3), stage 3 also with the other G
# option and with D's clips batched. Long video: the paper's 10-s segments (60 latent frames) with
# 1-s overlap (6), 6 segments (60 s) per rollout; `batch` counts rows: rollout conditions and real
# clips alternate (`stages/long_video.py`), so 8 devices take 1 rollout, 64 take 8.
_LONG = {"long_video.segment_frames": 60, "long_video.overlap_frames": 6, "long_video.num_segments": 6}
AOT_CASES.update({
    "stage3_736x416_8dev_g_zero2": dict(kind="stage3", devices=8, mesh=_CP8, batch=1, frames=30,
                                        options={"adversarial.g_sharding": "zero2"}, **_PAPER),
    "stage3_736x416_8dev_d_batched": dict(kind="stage3", devices=8, mesh=_CP8, batch=1, frames=30,
                                          options={"adversarial.d_clips_per_pass": 0}, **_PAPER),
    "long_736x416_8dev": dict(kind="long_video", devices=8, mesh=_CP8, batch=2, frames=360, options=_LONG, **_PAPER),
    "long_736x416_64dev": dict(kind="long_video", devices=64, mesh=_CP8_FSDP8, batch=16, frames=360, options=_LONG,
                               **_PAPER),
    # What 8 devices take at 5-s segments (30 latent frames, 12 per 60-s rollout).
    "long_736x416_8dev_5s_segments": dict(kind="long_video", devices=8, mesh=_CP8, batch=2, frames=360,
                                          options=dict(_LONG, **{"long_video.segment_frames": 30,
                                                                 "long_video.num_segments": 12}), **_PAPER),
    "wan_stage1_64dev": dict(kind="stage1", devices=64, mesh=_CP8_FSDP8, batch=8, frames=21, model=WAN_TRAIN_MODEL,
                             **_WAN),
    "wan_stage3_8dev_g_zero3": dict(kind="stage3", devices=8, mesh=_CP8, batch=1, frames=20, model=WAN_TRAIN_MODEL,
                                    options={"adversarial.g_sharding": "zero3"}, **_WAN),
    "wan_stage3_64dev": dict(kind="stage3", devices=64, mesh=_CP8_FSDP8, batch=8, frames=20, model=WAN_TRAIN_MODEL,
                             **_WAN),
    "wan_long_8dev": dict(kind="long_video", devices=8, mesh=_CP8, batch=2, frames=360, model=WAN_TRAIN_MODEL,
                          options=_LONG, **_WAN),
    "wan_long_64dev": dict(kind="long_video", devices=64, mesh=_CP8_FSDP8, batch=16, frames=360,
                           model=WAN_TRAIN_MODEL, options=_LONG, **_WAN),
})
# Named groups of cases (`measure` and `--aot_cases` take group names too).
AOT_GROUPS = {
    "apt2_8b": ["stream_736x416_n30_1dev", "stream_1280x720_n15_8dev", "stage1_736x416_8dev", "stage3_736x416_8dev",
                "stage1_736x416_64dev", "stage3_736x416_64dev"],
    "wan_1_3b": ["wan_stream_1dev", "wan_stage1_1dev", "wan_stage1_8dev", "wan_stage3_1dev", "wan_stage3_8dev",
                 "wan_stage1_8dev_replicated", "wan_stage3_8dev_replicated"],
    "targets": ["stage1_736x416_8dev", "stage3_736x416_8dev", "long_736x416_8dev", "wan_stage1_8dev", "wan_stage3_8dev",
                "wan_long_8dev", "stage1_736x416_64dev", "stage3_736x416_64dev", "long_736x416_64dev",
                "wan_stage1_64dev", "wan_stage3_64dev", "wan_long_64dev", "stage3_736x416_8dev_g_zero2",
                "stage3_736x416_8dev_d_batched", "wan_stage3_8dev_g_zero3", "long_736x416_8dev_5s_segments"],
}
DEFAULT_GROUP = "apt2_8b"  # `python -m apt2_jax.benchmark --aot`


def case_names(names) -> list[str]:
  """Case names with group names expanded, in order, once each; ValueError on unknown ones."""
  out = []
  for n in names:
    for m in AOT_GROUPS.get(n, [n]):
      if m not in AOT_CASES:
        raise ValueError(f"unknown AOT case {m!r}; known: {sorted(AOT_CASES)} and groups {sorted(AOT_GROUPS)}")
      if m not in out:
        out.append(m)
  return out


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


def sharding_description(stage_config, case: dict) -> str:
  """Which sharding option a training row compiles (`apt2_jax/sharding.py`), in words."""
  m = case["mesh"]
  over = "fsdp x sequence" if case.get("over_sequence", True) and m["sequence"] > 1 else "fsdp"
  where = f"state sharded over {over} ({m['fsdp'] * (m['sequence'] if over != 'fsdp' else 1)})"
  cp = f"{m['sequence']}-way context parallelism" if m["sequence"] > 1 else "no context parallelism"
  if case["kind"] == "stage1":
    return f"G ZeRO-3; {where}; {cp}"
  a = stage_config.adversarial
  clips = f"{a.d_clips_per_pass} clip(s)" if a.d_clips_per_pass else "all clips"
  return (f"G {a.g_sharding.replace('zero', 'ZeRO-')}, D {a.d_sharding.replace('zero', 'ZeRO-')} ({clips} per "
          f"pass); {where}; {cp}")


def aot_config(case: dict, **model_overrides):
  """The benchmark config of one AOT case (an `AOT_CASES` entry)."""
  from apt2_jax import sharding
  from apt2_jax.configs import benchmark as bench_cfg
  config = bench_cfg.get_config(case["size"])
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
    if case.get("over_sequence", True):
      config.logical_rules = sharding.override_rules(config.logical_rules, sharding.ZERO_OVER_SEQUENCE)
  config.model.update(dict(case.get("model", {}), **model_overrides))
  return config


def aot_case(name: str, case: dict, *, mfu: float = 0.4, **model_overrides) -> dict:
  """Lowers and compiles one case with abstract inputs; returns FLOPs, bytes and projections."""
  import jax
  from apt2_jax import flops
  from apt2_jax.models import count_params, kv_cache
  from . import streaming, training
  from .setup import make_setup
  config = aot_config(case, **model_overrides)
  n = case["devices"]
  if len(jax.devices()) < n:
    raise RuntimeError(f"AOT case {name} needs {n} devices, {len(jax.devices())} exist "
                       f"(run with --cpu_devices={n})")
  s = make_setup(config, devices=jax.devices()[:n])
  mc, (h, w) = s.model_config, s.latent_hw
  row = dict(case=name, size=case["size"], kind=case["kind"], devices=n, mesh=dict(case["mesh"]),
             batch=case["batch"], resolution=f"{config.width}x{config.height}", latent=f"{w}x{h}",
             tokens_per_frame=s.tokens, window=mc.window, params=count_params(mc), dtype=mc.dtype,
             param_dtype=mc.param_dtype, remat=mc.remat_policy, model_overrides=dict(case.get("model", {})),
             attention=attention_description(mc, case["kind"], case.get("frames", 1), s.tokens, config.text_len))
  if case["kind"] != "stream":
    row["over_sequence"] = bool(case.get("over_sequence", True))
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
      st = training.stage_step(s, case["kind"], case["batch"], case["frames"], case.get("options"))
      row["sharding"] = sharding_description(st.config, case)
      row["options"] = dict(case.get("options", {}))
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


def _in_process(devices: int) -> bool:
  """Whether this process compiles with `AOT_XLA_FLAGS` and `devices` devices: its backend has
  not started (then both are set here), or started after `add_aot_xla_flags` with enough devices."""
  import jax
  if not _backend_started():
    add_aot_xla_flags()
    jax.config.update("jax_num_cpu_devices", max(devices, jax.config.jax_num_cpu_devices))
    return True
  return _flags_before_start and len(jax.devices()) >= devices


def measure(names, *, json_out: str | None = None, mfu: float = 0.4, size: str | None = None,
            keep_going: bool = True) -> list[dict]:
  """Compiles the cases `names` (case or group names; `size` overrides each case's model size)
  with `AOT_XLA_FLAGS`, printing each row's per-device memory as it comes and rewriting `json_out`
  (`result`'s object) after each. In this process while its backend has not started, else in one
  fresh subprocess (`python -m apt2_jax.benchmark --aot_cases=...`): the flags and the number of
  virtual CPU devices are fixed when a backend starts. `keep_going`: a case that fails to compile
  becomes a row with its `error` instead of ending the run."""
  from . import report
  names = case_names(names)
  devices = max(AOT_CASES[n]["devices"] for n in names)
  if not _in_process(devices):
    return _measure_in_subprocess(names, json_out, mfu, size, devices)
  rows, t0 = [], time.perf_counter()
  for name in names:
    case = dict(AOT_CASES[name], **({"size": size} if size else {}))
    logging.info("AOT: compiling %s (%s, %d devices)", name, case["size"], case["devices"])
    try:
      row = aot_case(name, case, mfu=mfu)
    except Exception as e:  # pylint: disable=broad-except
      if not keep_going:
        raise
      logging.exception("AOT case %s failed", name)
      row = dict(case=name, size=case["size"], kind=case["kind"], devices=case["devices"],
                 mesh=dict(case["mesh"]), error=f"{type(e).__name__}: {e}"[:2000])
    rows.append(row)
    print(report.memory_table([row], header=len(rows) == 1), flush=True)
    if json_out:
      report.write_json(result(rows, mfu, time.perf_counter() - t0), json_out)
  return rows


def _measure_in_subprocess(names, json_out, mfu, size, devices) -> list[dict]:
  import tempfile
  out = json_out or os.path.join(tempfile.mkdtemp(prefix="apt2_aot_"), "aot.json")
  cmd = [sys.executable, "-m", "apt2_jax.benchmark", f"--cpu_devices={max(devices, 8)}",
         f"--aot_cases={','.join(names)}", f"--aot_mfu={mfu}", f"--json_out={out}"]
  if size:
    cmd.append(f"--aot_size={size}")
  logging.info("AOT in a subprocess (this backend has started): %s", " ".join(cmd))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count"))
  if subprocess.call(cmd, env=env):
    raise RuntimeError(f"AOT subprocess failed: {' '.join(cmd)}")
  with open(out) as f:
    return json.load(f)["aot"]


def result(rows: list[dict], mfu: float = 0.4, wall_s: float | None = None) -> dict:
  """The JSON object of an AOT run: the rows and what they assume."""
  import jax
  return dict(aot=rows, jax_version=jax.__version__, h100_bf16_peak_flops=H100_BF16_PEAK, assumed_mfu=mfu,
              paper_step_s=PAPER_STEP_S, wall_s=wall_s, xla_flags=os.environ.get("XLA_FLAGS", ""),
              attention=AOT_ATTENTION,
              note="Compiled for virtual CPU devices: bytes per device come from XLA:CPU's "
                   "memory_analysis with `AOT_XLA_FLAGS` and the attention each row names (the "
                   "chunked online-softmax kernels: the memory of a flash kernel); FLOPs are analytic.")
