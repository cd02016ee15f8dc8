#!/usr/bin/env bash
# Train on this machine (all local CPUs / GPUs / TPU cores), then test.
#   launch/local.sh configs/digits.py /tmp/pf_digits [--config.field=value ...]
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
exec "$python" -m paraformer_jax.main --config="$config" --workdir="$workdir" "$@"
