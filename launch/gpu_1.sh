#!/usr/bin/env bash
# One GPU: launch/gpu_1.sh experiments/stage3_adversarial.py:apt2_8b /ckpt/apt2/stage3 [--config.k=v ...]
# Mesh: data=1, fsdp=1, tensor=1, sequence=1 (forced; nothing is sharded).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG[:SIZE] WORKDIR [--config.k=v ...]" >&2
  exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
# Let JAX take 95% of GPU memory up front (no fragmentation from growth); cuDNN flash attention
# and the latency-hiding scheduler are on in the model config / flags below.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false"
mkdir -p "$WORKDIR"
exec "$PYTHON" -m apt2_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  --config.mesh.data=1 --config.mesh.fsdp=1 --config.mesh.tensor=1 --config.mesh.sequence=1 "$@"
