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
#
# Preemption (BUILD.md, "Preemption and a full disk"): `--signal=TERM@180` has SLURM send SIGTERM to
# every task 180 s before the time limit (no `B:`, so the tasks get it, not only this script);
# scancel and preemption send SIGTERM too. Training then finishes its step, checkpoints it on every
# host (they agree on the step) and exits with status 75; rerunning this script resumes at that
# step. Give it the time a checkpoint takes: raise 180 for big models (and SLURM's KillWait /
# GraceTime, after which SIGKILL follows). REQUEUE=1 requeues the job itself after status 75
# (needs `--requeue`, set below). Status 74 is a full disk: not requeued (it would fail again).
#SBATCH --job-name=apt2
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=TERM@180
#SBATCH --requeue
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
# srun runs in the background and this script waits for it through a SIGTERM (scancel, the time
# limit): the tasks get SIGTERM from SLURM themselves, and this script must outlive their checkpoint.
# shellcheck disable=SC2086
srun --kill-on-bad-exit=1 "$PYTHON" -m apt2_jax.main --config="$CONFIG" --workdir="$WORKDIR" $MESH "$@" &
SRUN=$!
trap 'echo "SIGTERM: waiting for the tasks to checkpoint and exit" >&2' TERM
while :; do  # a trapped signal interrupts `wait`: wait again until srun itself has ended
  status=0
  wait "$SRUN" || status=$?
  kill -0 "$SRUN" 2>/dev/null || break
done
if [[ $status -eq 75 ]]; then
  echo "preempted: every host checkpointed; rerun (or REQUEUE=1) to resume" >&2
  if [[ ${REQUEUE:-0} == 1 && -n ${SLURM_JOB_ID:-} ]]; then
    scontrol requeue "$SLURM_JOB_ID"
  fi
elif [[ $status -eq 74 ]]; then
  echo "the disk of $WORKDIR is full (see the error line above); not requeued" >&2
fi
exit "$status"
