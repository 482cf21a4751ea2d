"""How closely a `gemb export` sentence-transformers folder reproduces `gemb embed`.

    python bench/export_parity.py [--model ~/.cache/gemb/models/gemma3-270m] [--dim 768]
    python bench/export_parity.py --compare-params DIR_A DIR_B

Exports the model folder (default: the real Gemma 3 270M, converted on first use), encodes the
same texts (5 scripts and code, plus literal "<eos>" text) with gemb's TextEncoder and with
SentenceTransformer on the exported folder, for query and document prompts, and prints the
largest absolute difference and smallest cosine between the two.

--compare-params prints the largest absolute difference between the params of two model
folders instead (e.g. two quickstart exports, to check that training is reproducible).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

TEXTS = [
    "The history of the printing press begins long before Gutenberg.",
    "Москва является столицей Российской Федерации.",
    "東京は日本の首都であり、世界で最も人口の多い都市圏の一つです。",
    "भारत दक्षिण एशिया में स्थित एक विशाल देश है।",
    "def binary_search(items, target):\n    low, high = 0, len(items) - 1\n",
    "A document that quotes <eos> and <bos> as plain text.",
]


def compare_params(first: str, second: str) -> int:
    from flax import traverse_util

    from gemb.checkpoints import model_dir

    a = traverse_util.flatten_dict(model_dir.load_params(first))
    b = traverse_util.flatten_dict(model_dir.load_params(second))
    if a.keys() != b.keys():
        print(f"different parameter sets: {sorted(set(a) ^ set(b))[:5]}")
        return 1
    worst = max(float(np.abs(np.asarray(a[k], np.float32) - np.asarray(b[k], np.float32)).max())
                for k in a)
    print(f"{len(a)} tensors, max |diff| {worst:.3g}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a gemb model folder (default: the 270M)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--compare-params", nargs=2, metavar="DIR", default=None)
    args = parser.parse_args()
    if args.compare_params:
        return compare_params(*args.compare_params)

    from sentence_transformers import SentenceTransformer

    from gemb import embed
    from gemb.export import sentence_transformers as st_export
    from gemb.train import gin_registry

    model = args.model or gin_registry.converted_model("gemma3-270m")
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        out = st_export.export(model, Path(scratch) / "st", dim=args.dim)
        print(f"exported {model} in {time.perf_counter() - started:.1f} s")
        exported = SentenceTransformer(str(out), device="cpu")
        encoder = embed.load_encoder(model, dim=args.dim, task="search")
        for role in ("query", "document"):
            ours = encoder.encode(TEXTS, role=role)
            theirs = exported.encode(TEXTS, prompt_name=role, convert_to_numpy=True)
            print(f"{role:<9} {len(TEXTS)} texts, dim {ours.shape[1]}: "
                  f"max |diff| {np.abs(ours - theirs).max():.2g}, "
                  f"min cosine {np.sum(ours * theirs, axis=-1).min():.7f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
