#!/usr/bin/env bash
# A TPU VM pod slice: run the SAME command on every worker; jax.distributed finds the others
# (TPU_WORKER_HOSTNAMES), each host feeds its share of the global batch, and host 0 writes
# logs and the operative config. MODEL_DIR must be on storage every worker sees (gs://...).
#   launch/tpu_vm_pod.sh TPU_NAME ZONE gin/runs/finetune.gin gs://bucket/runs/ft \
#       --gin_file=gin/models/gemma3_4b.gin --gin.INIT_FROM="'gs://bucket/models/gemma3-4b'"
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE RUN.gin MODEL_DIR [extra gemb train flags]" >&2; exit 2
fi
TPU_NAME=$1; ZONE=$2; RUN_GIN=$3; MODEL_DIR=$4; shift 4
REPO_DIR=${GEMB_REPO_DIR:-gemb}
EXTRA=$(printf " %q" "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd $REPO_DIR && python -m gemb.train --gin_file=$RUN_GIN --gin.MODEL_DIR=\"'$MODEL_DIR'\" $EXTRA"
