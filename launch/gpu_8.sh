#!/usr/bin/env bash
# Eight GPUs on one host, one process:
#   launch/gpu_8.sh experiments/stage1_adapt.py:apt2_8b /ckpt/apt2/stage1 [--config.k=v ...]
# Mesh: fsdp=8 by default (ZeRO-3 over the 8 GPUs, each GPU its own samples); override, e.g.
#   MESH="--config.mesh.data=1 --config.mesh.fsdp=1 --config.mesh.sequence=8" for Ulysses-style
#   context parallelism (each sample over 8 GPUs, as the paper does at 1280x720).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG[:SIZE] WORKDIR [--config.k=v ...]" >&2
  exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
MESH=${MESH:-"--config.mesh.data=1 --config.mesh.fsdp=8 --config.mesh.tensor=1 --config.mesh.sequence=1"}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
# Overlap collectives (FSDP all-gathers / reduce-scatters, sequence all-to-alls) with compute:
# the latency-hiding scheduler, async collectives and combining of small collectives.
export XLA_FLAGS="${XLA_FLAGS:-} \
  --xla_gpu_enable_latency_hiding_scheduler=true \
  --xla_gpu_enable_triton_gemm=false \
  --xla_gpu_enable_pipelined_all_gather=true \
  --xla_gpu_enable_pipelined_reduce_scatter=true \
  --xla_gpu_enable_pipelined_all_reduce=true \
  --xla_gpu_enable_while_loop_double_buffering=true \
  --xla_gpu_all_gather_combine_threshold_bytes=134217728 \
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728 \
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728"
mkdir -p "$WORKDIR"
# shellcheck disable=SC2086
exec "$PYTHON" -m apt2_jax.main --config="$CONFIG" --workdir="$WORKDIR" $MESH "$@"
