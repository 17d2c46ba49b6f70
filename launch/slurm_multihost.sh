#!/usr/bin/env bash
# Many hosts under SLURM; submit with, e.g. (8 nodes x 8 GPUs, one process per host):
#   sbatch --nodes=8 --ntasks-per-node=1 --gpus-per-node=8 \
#     launch/slurm_multihost.sh experiments/stage3_adversarial.py:apt2_8b /ckpt/apt2/stage3
# or one process per GPU: --ntasks-per-node=8 --gpus-per-task=1 (set PER_GPU=1).
# Every task runs apt2_jax.main, which calls `jax.distributed.initialize()` when SLURM_NTASKS > 1;
# JAX reads the task id, task count and the coordinator (first node of the job) from SLURM's
# variables, so all processes see one global device list.
# Mesh: fsdp=8 inside a host, data across hosts (data=-1) by default; MESH overrides, e.g.
#   MESH="--config.mesh.data=-1 --config.mesh.fsdp=1 --config.mesh.sequence=8".
#SBATCH --job-name=apt2
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: sbatch [...] $0 CONFIG[:SIZE] WORKDIR [--config.k=v ...]" >&2
  exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
MESH=${MESH:-"--config.mesh.data=-1 --config.mesh.fsdp=8 --config.mesh.tensor=1 --config.mesh.sequence=1"}
unset JAX_COORDINATOR_ADDRESS  # let JAX's SLURM cluster detection pick the coordinator
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
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
# One task per host sees all the host's GPUs; with PER_GPU=1, SLURM binds one GPU per task.
# shellcheck disable=SC2086
srun --kill-on-bad-exit=1 "$PYTHON" -m apt2_jax.main --config="$CONFIG" --workdir="$WORKDIR" $MESH "$@"
