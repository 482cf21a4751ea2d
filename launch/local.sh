#!/usr/bin/env bash
# One machine (CPU, one GPU host, or a single TPU VM): the same command as `gemb train`.
#   launch/local.sh gin/runs/quickstart.gin runs/quickstart [--gin.NAME=VALUE ...]
# NUM_PROCESSES=N (and DEVICES_PER_PROCESS, default 4) runs it as N local JAX processes over
# fake CPU devices, a multi-host job in miniature (docs/launch.md).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 RUN.gin MODEL_DIR [--gin.NAME=VALUE ...]" >&2; exit 2
fi
RUN_GIN=$1; MODEL_DIR=$2; shift 2
cd "$(dirname "$0")/.."
if [[ "${NUM_PROCESSES:-1}" -gt 1 ]]; then
  exec python -m gemb.local_processes --num_processes "$NUM_PROCESSES" \
    --devices_per_process "${DEVICES_PER_PROCESS:-4}" -- \
    train --gin_file="$RUN_GIN" --gin.MODEL_DIR="'$MODEL_DIR'" "$@"
fi
exec python -m gemb.train --gin_file="$RUN_GIN" --gin.MODEL_DIR="'$MODEL_DIR'" "$@"
