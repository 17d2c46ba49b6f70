"""The benchmark in CI size: every figure present and sane (nothing here is timed), the AOT path
on tiny configs, the peak-FLOP table, and that the streaming figures time the generation path's
own step."""
import glob
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt2_jax import benchmark
from apt2_jax.configs import benchmark as bench_cfg

STREAM_KEYS = ("step_latency_ms", "decode_latency_ms", "fps", "first_frame_latency_ms", "mfu",
               "cache_speedup", "nfe_speedup", "latency_growth", "recompute_latency_ms",
               "peer_block_latency_ms", "step_flops", "peak_flops")
TRAIN_KEYS = tuple(f"{s}_{k}" for s in ("stage1", "stage3")
                   for k in ("step_ms", "tokens_per_s_per_device", "mfu", "peak_bytes_per_device", "flops"))


def ci_config(**kw):
  c = bench_cfg.get_config("tiny")
  c.reps, c.warmup, c.first_frame_reps, c.peak_matmul = 2, 1, 1, 256
  c.train.reps, c.train.clip_frames, c.train.rollout_steps = 1, 3, 2
  c.update(kw)
  return c


def _check(result, devices):
  for k in STREAM_KEYS + TRAIN_KEYS:
    assert isinstance(result[k], (int, float)) and math.isfinite(result[k]) and result[k] > 0, (k, result[k])
  assert result["device_count"] == devices and result["platform"] == "cpu"
  assert result["jax_version"] == jax.__version__ and result["vae_size"] == "tiny"
  assert result["resolution"] == "64x64" and result["tokens_per_frame"] == 16
  assert result["fps"] == pytest.approx(4e3 / (result["step_latency_ms"] + result["decode_latency_ms"]))
  assert result["cache_speedup"] == pytest.approx(result["recompute_latency_ms"] / result["step_latency_ms"])
  assert 0 < result["mfu"] < 2  # a measured CPU peak can be beaten a little by a lucky step
  # Per-frame cost of a k-step peer block: k + 1 passes by construction (the analytic count).
  assert result["cache_window_frames"] == result["window"] + 2
  json.dumps(result)  # JSON-serialisable
  table = benchmark.table(result)
  for row in ("step latency", "fps", "MFU", "cache speedup", "NFE speedup", "stage-1 step", "stage-3 step"):
    assert row in table


def test_benchmark_tiny_one_device():
  _check(benchmark.run(ci_config()), devices=1)


def test_inspect_profiles_and_dumps_cost_analysis(tmp_path):
  """`--profile_dir` / `--dump_dir` on one small program (the benchmark's own runs: slow test)."""
  f = jax.jit(lambda x: jnp.tanh(x @ x))
  x = jnp.ones((32, 32))
  inspect = benchmark.Inspect(str(tmp_path / "profile"), 2, str(tmp_path / "cost"))
  inspect.profile("matmul", f, x)
  cost = inspect.dump("matmul", f.lower(x).compile())
  assert cost["flops"] >= 2 * 32 ** 3
  assert glob.glob(str(tmp_path / "profile" / "matmul" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert glob.glob(str(tmp_path / "profile" / "matmul" / "plugins" / "profile" / "*" / "perfetto_trace.json.gz"))
  assert "dot" in (tmp_path / "cost" / "matmul.hlo.txt").read_text()
  assert benchmark.Inspect().profile("none", f, x) is x  # off by default: nothing runs


@pytest.mark.slow  # the tiny benchmark plus profiles of its four programs and two more compiles
def test_benchmark_profiles_and_dumps_every_program(tmp_path):
  inspect = benchmark.Inspect(str(tmp_path / "profile"), 1, str(tmp_path / "cost"))
  result = benchmark.run(ci_config(), inspect)
  _check(result, devices=1)
  for name in ("stream_step", "vae_decode", "stage1_train_step", "stage3_train_step"):
    assert glob.glob(str(tmp_path / "profile" / name / "plugins" / "profile" / "*" / "*.xplane.pb")), name
    assert glob.glob(str(tmp_path / "profile" / name / "plugins" / "profile" / "*" / "perfetto_trace.json.gz"))
    with open(tmp_path / "cost" / f"{name}.cost.json") as f:
      assert json.load(f)["cost_analysis"]["flops"] > 0, name
    assert (tmp_path / "cost" / f"{name}.hlo.txt").stat().st_size > 0
  assert result["step_xla_flops"] > 0 and result["stage3_xla_flops"] > 0


@pytest.mark.slow
def test_benchmark_tiny_eight_devices(devices):
  c = ci_config(num_devices=0, batch=2)
  c.train.batch = 2
  c.mesh.update(dict(data=2, fsdp=1, tensor=1, sequence=4))
  _check(benchmark.run(c), devices=8)


def test_aot_tiny_compiles_stream_and_train_without_running(devices):
  stream = dict(kind="stream", size="tiny", devices=8, height=64, width=64, window=3, batch=1,
                mesh=dict(data=1, fsdp=1, tensor=1, sequence=8))
  row = benchmark.aot_case("tiny_stream", stream, mfu=0.5)
  assert row["bytes_per_device"] > row["kv_cache_bytes"] // 8 > 0
  assert row["flops_per_step"] > 0 and row["fits_80gb"] is True
  assert row["projected_h100_s"] == pytest.approx(row["flops_per_step"] / (989e12 * 8 * 0.5))
  # The rows compile (and name) the chunked kernels, not the dense ones auto would pick here.
  assert row["attention"].startswith("cached step: heads-major einsums")
  train = dict(kind="stage1", size="tiny", devices=8, height=64, width=64, window=3, batch=4, frames=3,
               mesh=dict(data=1, fsdp=4, tensor=1, sequence=2))
  row = benchmark.aot_case("tiny_stage1", train)
  assert row["bytes_per_device"] > 0 and row["frames"] == 3 and row["param_dtype"] == "float32"
  assert row["attention"].startswith("block-causal: chunked online softmax (3 query x 2 key frames")
  assert "cross-attention: chunked" in row["attention"]
  assert "tiny_stage1" in benchmark.aot_table([row])
  table = benchmark.memory_table([row])
  assert "argument" in table and "temp" in table and "peak" in table and "tiny_stage1" in table


def test_peak_table_and_config_validation():
  assert benchmark.spec_peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert benchmark.spec_peak_flops("NVIDIA H200", "bfloat16") == 989e12
  assert benchmark.spec_peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12  # not the SXM figure
  assert benchmark.spec_peak_flops("NVIDIA H100 NVL", "float32") == 60e12
  assert benchmark.spec_peak_flops("cpu", "float32") is None
  assert set(benchmark.AOT_CASES) >= {"stream_736x416_n30_1dev", "stream_1280x720_n15_8dev"}
  # One AOT path: groups expand in order, once each; the fine-tune tool's cases are a group.
  from apt2_jax.benchmark import aot
  assert aot.case_names(["wan_stage1_8dev", "wan_1_3b"])[:2] == ["wan_stage1_8dev", "wan_stream_1dev"]
  assert len(aot.case_names(["wan_1_3b", "wan_1_3b"])) == len(aot.AOT_GROUPS["wan_1_3b"])
  with pytest.raises(ValueError, match="unknown AOT case 'stage9'"):
    aot.case_names(["stage9"])
  c = bench_cfg.get_config("small")
  assert (c.height, c.width, c.vae_size) == (256, 256, "small")
  c.height = 100
  with pytest.raises(ValueError, match="height"):
    bench_cfg.validate(c)
  with pytest.raises(ValueError, match="unknown benchmark size"):
    bench_cfg.get_config("huge")
  # The CPU real-time size: 256x256 (256 tokens per latent frame), N = 10, the light decoder.
  from apt2_jax.configs import sizes
  from apt2_jax.models import DiTConfig
  from apt2_jax.models import vae as vae_lib
  cs = bench_cfg.get_config("cpu_stream")
  bench_cfg.validate(cs)
  model = DiTConfig.from_dict(cs.model.to_dict())
  assert (model.dim, model.num_heads, model.num_layers, model.ffn_dim, model.window) == (256, 4, 6, 1024, 10)
  assert sizes.tokens_per_frame(cs.height, cs.width, model.patch_size) == 256
  assert vae_lib.vae_config(cs.vae_size).decoder_type == "light"
  assert bench_cfg.get_config("peer").model.num_layers == 8


def test_streaming_step_is_the_generation_stream_step():
  """The benchmark's timed step is `generation.stream.step`: one step from the same state, text
  K/V and parameters gives exactly the latent and state of the stream's own jitted step; the peer
  block is the same function under the k-step sampler."""
  from apt2_jax.benchmark import setup, streaming
  from apt2_jax.generation import stream
  from apt2_jax.rollout import RolloutOptions
  c = ci_config()
  s = setup.make_setup(c)
  params = setup.init_sharded_params(s, c.seed)
  fns = streaming.stream_fns(s, c.batch, c.seed)
  assert fns.peer_spec.options == RolloutOptions(num_steps=c.peer_steps, cache_from="clean")
  prompt = s.text(c.batch, jax.random.key(1))
  latent0 = jax.random.normal(jax.random.key(2), (c.batch, 1, *s.latent_hw, s.model_config.latent_channels))
  index = jnp.int32(s.model_config.window + 2)  # a full window, as step_latency_ms
  with s.use_mesh():
    x, state = fns.step(params, fns.new_state(latent0, index), fns.text(params, prompt), fns.control(c.batch))
  jitted = stream.compiled(fns.spec)
  want = stream.init_state(fns.spec, latent0, c.seed)
  want = dict(want, cache=dict(want["cache"], index=index), counter=index + 0)  # two buffers: both donated
  want_x, want_state = jitted.step(params, want, jitted.text(params, prompt))
  np.testing.assert_array_equal(np.asarray(x), np.asarray(want_x))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state, want_state)


def test_aot_disables_the_hoisting_of_bf16_converts(monkeypatch):
  """The AOT analysis keeps XLA:CPU from hoisting float32 copies of the stacked bf16 weights and
  cache out of the layer loop (`aot.AOT_XLA_FLAGS`); other flags are kept, nothing is doubled."""
  from apt2_jax.benchmark import aot
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  aot.add_aot_xla_flags()
  aot.add_aot_xla_flags()
  flags = os.environ["XLA_FLAGS"].split()
  assert flags == ["--xla_cpu_enable_fast_math=false", "--xla_disable_hlo_passes=while-loop-invariant-code-motion"]
