#!/usr/bin/env bash
# Rehearse a multi-host launch on one machine: N CPU processes join through jax.distributed on
# 127.0.0.1 (gloo collectives), each with D virtual devices, and run one stage together, exactly as
# N hosts of a cluster would (per-host data slices, one sharded orbax checkpoint, resume).
#
#   launch/multihost_local.sh [N=2] [D=4] --config=experiments/stage1_adapt.py:tiny \
#       --workdir=/tmp/mh --config.data.source=random_latents --config.mesh.data=-1
#
# On a real cluster run the same `python -m apt2_jax.main ...` once per host; jax.distributed
# finds the coordinator from SLURM (or set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
# JAX_PROCESS_ID as below). Logs: $WORKDIR/../multihost_logs/process_<i>.log (or ./).
set -euo pipefail
N=2; D=4
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then N=$1; shift; fi
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then D=$1; shift; fi
PYTHON=${PYTHON:-python}
PORT=${PORT:-$($PYTHON -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
LOGS=${LOGS:-multihost_logs}
mkdir -p "$LOGS"
pids=()
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu APT2_NUM_CPU_DEVICES=$D JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT \
  JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i \
    $PYTHON -m apt2_jax.main "$@" >"$LOGS/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $LOGS/process_$i.log" >&2
    status=1
  fi
done
[[ $status == 0 ]] && echo "all $N processes finished; logs in $LOGS/"
exit $status
