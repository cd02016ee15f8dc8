#!/usr/bin/env bash
# Create (if needed) a Cloud TPU VM pod slice, install the project on every host and run
# the same command on all of them; JAX finds the other hosts by itself (--distributed).
#   TPU_NAME=pf-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32 \
#     launch/tpu_pod.sh configs/imagenet.py gs://BUCKET/pf_in1k --config.data.data_dir=gs://BUCKET/tfds
# The workdir and data_dir must be reachable from every host (a GCS bucket).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: TPU_NAME=.. ZONE=.. ACCELERATOR=.. $0 CONFIG WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
accelerator=${ACCELERATOR:-v4-32}
version=${TPU_VERSION:-tpu-ubuntu2204-base}
repo=${REPO_URL:-$(git -C "$(dirname "$0")/.." remote get-url origin)}
config=$1
workdir=$2
shift 2
extra=$(printf ' %q' "$@")

if ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
    --accelerator-type="$accelerator" --version="$version"
fi
setup="test -d paraformer_jax || git clone $repo paraformer_jax; cd paraformer_jax && git pull -q \
  && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -e . \
  && .venv/bin/pip install -q 'jax[tpu]==$(grep '^jax==' "$(dirname "$0")/../requirements.txt" | cut -d= -f3)'"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$setup"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="\
  cd paraformer_jax && .venv/bin/python -m paraformer_jax.main --distributed \
  --config=$config --workdir=$workdir$extra"
