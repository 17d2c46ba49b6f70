#!/usr/bin/env bash
# Run one stage on this machine (CPU or whatever JAX finds), e.g. for the toy pipeline:
#   launch/local.sh experiments/stage1_adapt.py:tiny /tmp/apt2/stage1 [--config.k=v ...]
# Mesh: the config's `mesh` over all local devices (default data=-1: pure data parallelism).
# CPU_DEVICES=8 splits the CPU into 8 virtual devices (APT2_NUM_CPU_DEVICES of apt2_jax.main) to
# rehearse sharded runs without accelerators.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG[:SIZE] WORKDIR [--config.k=v ...]" >&2
  exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
if [[ -n "${CPU_DEVICES:-}" ]]; then
  export JAX_PLATFORMS=cpu
  export APT2_NUM_CPU_DEVICES=${CPU_DEVICES}
fi
mkdir -p "$WORKDIR"
exec "$PYTHON" -m apt2_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
