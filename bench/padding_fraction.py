"""Padding fraction, padded vs packed, on the docstring corpus and each ../shared/data task.

  python bench/padding_fraction.py [--vocab tokenizer.model] [--batch-size 128] [--batches 10]
                                   [--query-length 128] [--document-length 512] [--segments 16]

Each batch of token ids is converted both ways, so both columns measure the same examples (the
script also checks that the packed batch holds exactly the padded batch's examples). Padding
fraction = padding positions / all positions, over the query, positive and negatives blocks.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", help="SentencePiece tokenizer.model (default: Gemma 3's)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--query-length", type=int, default=128)
    parser.add_argument("--document-length", type=int, default=512)
    parser.add_argument("--segments", type=int, default=16, help="segments per packed row")
    args = parser.parse_args(argv)

    import numpy as np
    import seqio

    from data_throughput import default_vocabulary_path, load_vocabulary
    from gemb.data import batching, feature_converter, tasks

    vocab_path = args.vocab or default_vocabulary_path()
    vocabulary = load_vocabulary(vocab_path)
    names = tasks.register_default_tasks(vocabulary)
    common = dict(query_length=args.query_length, document_length=args.document_length)
    padded = feature_converter.FeatureConverter(feature_converter.FeatureConverterConfig(**common))
    packed = feature_converter.FeatureConverter(
        feature_converter.FeatureConverterConfig(pack=True, segments_per_row=args.segments, **common)
    )
    print(f"vocabulary: {vocab_path}; batch {args.batch_size} x {args.batches} batches per task; "
          f"query <= {args.query_length}, document <= {args.document_length} tokens; "
          f"{args.segments} segments per packed row")
    print(f"{'task':24s} {'padded':>8s} {'packed':>8s} {'rows padded->packed (q/p/n)':>30s}")
    for name in names:
        batcher = batching.TaskHomogeneousBatcher(
            [(name, 1.0)], args.batch_size, padded, seed=0, shard_info=seqio.ShardInfo(0, 1)
        )
        totals = {"padded": [0, 0], "packed": [0, 0]}
        rows = {"padded": np.zeros(3, int), "packed": np.zeros(3, int)}
        for _ in range(args.batches):
            token_batch = batcher.next_token_batch()
            for label, converter in (("padded", padded), ("packed", packed)):
                features = converter.convert(token_batch)
                for i, role in enumerate(feature_converter.ROLES):
                    segment_ids = features[f"{role}_segment_ids"]
                    totals[label][0] += int((segment_ids == 0).sum())
                    totals[label][1] += segment_ids.size
                    rows[label][i] += segment_ids.shape[0]
                if label == "padded":
                    reference = feature_converter.examples_in_features(features)
                elif feature_converter.examples_in_features(features) != reference:
                    raise AssertionError(f"{name}: packed batch does not hold the padded batch's examples")
        fractions = {k: pad / max(total, 1) for k, (pad, total) in totals.items()}
        row_text = f"{'/'.join(map(str, rows['padded']))} -> {'/'.join(map(str, rows['packed']))}"
        print(f"{name:24s} {fractions['padded']:8.1%} {fractions['packed']:8.1%} {row_text:>30s}")
        batcher.close()


if __name__ == "__main__":
    main()
