#!/usr/bin/env bash
# Multi-GPU / multi-node: run this on every node with the same arguments.
#   One node, all its GPUs:   launch/multi_gpu.sh configs/cifar10.py /shared/pf_c10
#   N nodes:  COORDINATOR=node0:12345 NUM_NODES=N NODE_RANK=i launch/multi_gpu.sh CONFIG WORKDIR
# Under SLURM (srun), leave these unset: --distributed finds them. One process per node sees
# all of that node's GPUs; the workdir must be on a file system all nodes share.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: [COORDINATOR=host:port NUM_NODES=N NODE_RANK=i] $0 CONFIG WORKDIR [overrides]" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
args=(--config="$config" --workdir="$workdir")
if [[ -n "${COORDINATOR:-}" ]]; then
  args+=(--coordinator_address="$COORDINATOR" --num_processes="${NUM_NODES:?set NUM_NODES}"
         --process_id="${NODE_RANK:?set NODE_RANK}")
elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
  args+=(--distributed)
fi
exec "$python" -m paraformer_jax.main "${args[@]}" "$@"
