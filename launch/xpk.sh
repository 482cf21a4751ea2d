#!/usr/bin/env bash
# GKE with xpk (TPU slices, multislice over DCN with --num-slices): one workload, the same
# command on every host. Build an image with this repository installed first.
#   launch/xpk.sh CLUSTER TPU_TYPE NUM_SLICES IMAGE gin/runs/pretrain.gin gs://bucket/runs/pre \
#       --gin_file=gin/models/gemma3_4b.gin --gin.INIT_FROM="'gs://bucket/models/gemma3-4b'"
# With NUM_SLICES > 1, gin/partitioning/fsdp.gin puts the data axis over DCN (slices).
set -euo pipefail
if [[ $# -lt 6 ]]; then
  echo "usage: $0 CLUSTER TPU_TYPE NUM_SLICES IMAGE RUN.gin MODEL_DIR [extra flags]" >&2; exit 2
fi
CLUSTER=$1; TPU_TYPE=$2; NUM_SLICES=$3; IMAGE=$4; RUN_GIN=$5; MODEL_DIR=$6; shift 6
EXTRA=$(printf " %q" "$@")
xpk workload create --cluster "$CLUSTER" --tpu-type "$TPU_TYPE" --num-slices "$NUM_SLICES" \
  --docker-image "$IMAGE" --workload "gemb-$(date +%Y%m%d-%H%M%S)" \
  --command "python -m gemb.train --gin_file=$RUN_GIN --gin.MODEL_DIR=\"'$MODEL_DIR'\" $EXTRA"
