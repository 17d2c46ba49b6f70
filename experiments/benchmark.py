"""Benchmark config: streaming latency, FPS, MFU, cache and NFE speedups, training step figures.

    python -m apt2_jax.benchmark --config=experiments/benchmark.py:small --json_out=/tmp/small.json
    # all devices, context parallel over 8 GPUs at 1280x720:
    python -m apt2_jax.benchmark --config=experiments/benchmark.py:apt2_8b --config.num_devices=0 \
        --config.mesh.data=1 --config.mesh.sequence=-1 --config.height=720 --config.width=1280 \
        --config.model.window=15 --json_out=/tmp/apt2_8b_720p.json
    # 8 virtual CPU devices:
    python -m apt2_jax.benchmark --config=experiments/benchmark.py:tiny --cpu_devices=8 \
        --config.num_devices=0 --config.batch=8 --json_out=/tmp/tiny8.json
    # paper-scale compile-only analysis (apt2_8b on 1 / 8 / 64 virtual devices):
    python -m apt2_jax.benchmark --aot --json_out=docs/benchmarks/aot_apt2_8b.json

    # the per-forward comparison size (width 384, 6 heads, 8 blocks, FFN 1536, 256 tokens) with the
    # profile breakdown (attention / linear / cache update / layer slices):
    python -m apt2_jax.benchmark --config=experiments/benchmark.py:peer --json_out=/tmp/peer.json

    # the CPU real-time streaming size (256x256 with the light decoder; fps with decode):
    python -m apt2_jax.benchmark --config=experiments/benchmark.py:cpu_stream --config.train.enabled=False \
        --json_out=/tmp/cpu_stream.json

Sizes: `tiny` (CI: 64x64 pixels, seconds), `small` (256x256), `peer` (`small`
with 8 blocks: a PyTorch peer's CPU reference dimensions), `cpu_stream` (256x256: width 256,
6 blocks, N = 10, the light decoder; real time on 2 CPU cores), `wan_1_3b`
(832x480), `apt2_8b` (736x416, N = 30, bfloat16; the paper's single-H100 setting). Fields:
`apt2_jax/configs/benchmark.py`; without `--config` the benchmark runs its `small` size.
"""
from apt2_jax.configs import benchmark


def get_config(arg: str = "small"):
  return benchmark.get_config(arg)
