#!/usr/bin/env bash
# One machine (CPU, one GPU host, or a single TPU VM): the same command as `gemb train`.
#   launch/local.sh gin/runs/quickstart.gin runs/quickstart [--gin.NAME=VALUE ...]
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 RUN.gin MODEL_DIR [--gin.NAME=VALUE ...]" >&2; exit 2
fi
RUN_GIN=$1; MODEL_DIR=$2; shift 2
cd "$(dirname "$0")/.."
exec python -m gemb.train --gin_file="$RUN_GIN" --gin.MODEL_DIR="'$MODEL_DIR'" "$@"
