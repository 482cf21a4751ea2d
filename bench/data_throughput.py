"""Tokenisation + batching throughput of the data pipeline (examples per second).

  python bench/data_throughput.py [--vocab tokenizer.model] [--batch-size 256] [--batches 40]
                                  [--pack] [--tasks gemb_docstring_code,...]

Times the whole host-side path of gemb.data.batching on this machine: template, tokenise (tf.data),
batch, then pad or pack (numpy) into model features. The first batches (pipeline start-up, reading
the sources) are excluded. Without --vocab it uses Gemma 3's tokenizer rebuilt from the GGUF that
ships with gemb (cached), or seqio's small test model if that is unavailable.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def default_vocabulary_path() -> str:
    """Gemma 3's tokenizer.model, rebuilt once from the bundled GGUF into the gemb cache."""
    from gemb import paths

    target = paths.cache_dir() / "bench" / "gemma3_tokenizer.model"
    if target.exists():
        return str(target)
    try:
        from gemb.checkpoints import gguf_tokenizer, import_gguf

        target.parent.mkdir(parents=True, exist_ok=True)
        gguf_tokenizer.write_sentencepiece_model(import_gguf.default_gemma3_270m_gguf(), target)
        return str(target)
    except Exception as error:  # the bundled model may be missing in a minimal install
        import seqio

        fallback = Path(seqio.__file__).parent / "test_data" / "sentencepiece" / "sentencepiece.model"
        print(f"(Gemma 3 tokenizer unavailable: {error}; using {fallback})")
        return str(fallback)


def load_vocabulary(path: str):
    import seqio

    try:
        from gemb.data import vocab

        return vocab.gemma3_vocabulary(path)
    except Exception:
        return seqio.SentencePieceVocabulary(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", help="SentencePiece tokenizer.model")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--pack", action="store_true", help="pack rows (default: pad)")
    parser.add_argument("--tasks", default="gemb_docstring_code", help="comma-separated task names")
    parser.add_argument("--query-length", type=int, default=128)
    parser.add_argument("--document-length", type=int, default=512)
    args = parser.parse_args(argv)

    from gemb.data import batching, feature_converter, tasks

    vocab_path = args.vocab or default_vocabulary_path()
    vocabulary = load_vocabulary(vocab_path)
    tasks.register_default_tasks(vocabulary)
    names = args.tasks.split(",")
    converter = feature_converter.FeatureConverter(
        feature_converter.FeatureConverterConfig(
            pack=args.pack, query_length=args.query_length, document_length=args.document_length
        )
    )
    batcher = batching.TaskHomogeneousBatcher([(n, 1.0) for n in names], args.batch_size, converter, seed=0)
    # Reading a source and starting its tf.data pipeline are one-off costs, not throughput.
    batcher.prepare()
    seen = set()
    for step in range(10_000):
        next(batcher)
        seen.add(batcher.last_task)
        if step + 1 >= args.warmup and len(seen) == len(names):
            break

    tokenize_seconds = convert_seconds = 0.0
    tokens = 0
    start = time.perf_counter()
    for _ in range(args.batches):
        t0 = time.perf_counter()
        token_batch = batcher.next_token_batch()
        t1 = time.perf_counter()
        features = converter.convert(token_batch)
        t2 = time.perf_counter()
        tokenize_seconds += t1 - t0
        convert_seconds += t2 - t1
        tokens += int(sum((features[f"{r}_segment_ids"] > 0).sum() for r in feature_converter.ROLES))
    elapsed = time.perf_counter() - start
    examples = args.batches * args.batch_size
    print(f"vocabulary: {vocab_path}")
    print(f"tasks: {names}; batch {args.batch_size}; {'packed' if args.pack else 'padded'}; "
          f"cpus: {os.cpu_count()}")
    print(f"throughput: {examples / elapsed:,.0f} examples/s ({tokens / elapsed:,.0f} tokens/s) over "
          f"{examples} examples")
    print(f"  waiting for tokenised batches: {tokenize_seconds:.2f} s; padding/packing: {convert_seconds:.2f} s "
          f"({examples / max(convert_seconds, 1e-9):,.0f} examples/s alone)")


if __name__ == "__main__":
    main()
