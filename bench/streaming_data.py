"""Prepared (streamed) tasks vs in-memory tasks: memory, start-up and input throughput per process.

  python bench/streaming_data.py [--sizes 100000,1000000,10000000] [--shards 64]
                                 [--throughput-pairs 100000] [--batch-size 256] [--batches 200]
                                 [--workdir /tmp/gemb-bench-streaming]

1. Scaling: a synthetic prepared corpus (random token pairs, gemb.data.prepared.
   write_synthetic_task) of each size in --sizes; a fresh process per size builds the training
   data (`SeqioData` with the prepared task, packed features), reads the first batch (start-up
   time) and --batches more, and reports its peak RSS. Flat = independent of the corpus size.
2. Throughput on the same text: --throughput-pairs (title, passage)-like text pairs written as
   JSONL, read (a) in memory, as today (seqio task: read, check, template, tokenise in tf.data),
   and (b) prepared once with `gemb data prepare --in_process` and streamed. Both go through the
   same batcher and feature converter; pairs/s and tokens/s per process, first batches excluded.

Each measurement runs in its own process, one at a time, so the figures do not share memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

WORDS = ("the a an of to in for on with by from system file data value list table user process "
         "network memory server client request response error message option command output input "
         "module function class method object string number record field index query search "
         "result model train test document title text sentence label image page link storage").split()


def _rss_mib() -> float:
    """This process's peak RSS. VmHWM, not getrusage's ru_maxrss: ru_maxrss survives exec, so a
    child would report the peak of the parent that forked it (here, the one writing the corpus)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _measure(data_json: str, batches: int) -> dict:
    """Runs in a child process: start-up to the first batch, then `batches` more."""
    started = time.perf_counter()
    from gemb.data.feature_converter import FeatureConverterConfig
    from gemb.train.data import DataShard, SeqioData

    spec = json.loads(data_json)
    jsonl = spec.pop("jsonl_task", None)
    if jsonl:  # an in-memory seqio task over the JSONL file, as a run registers one
        from gemb.data import sources, tasks, templates, vocab

        tasks.add_embedding_task(
            "bench_text_pairs", sources.SourceSpec.of("jsonl", {"train": jsonl}).readers(),
            sources.PairBuilder("title", "passage"), vocab.gemma3_vocabulary(spec["vocabulary_dir"]),
            templates.default_template("search"))
    features = FeatureConverterConfig(query_length=64, document_length=128, pack=True)
    data = SeqioData(features=features, **spec)
    iterator = data.make(None, DataShard())
    first = next(iterator)
    first_batch_seconds = time.perf_counter() - started
    pairs = tokens = 0
    timed = time.perf_counter()
    for _ in range(batches):
        batch = iterator.next_token_batch()
        pairs += batch.batch_size
        tokens += int(batch.query.lengths.sum() + batch.positive.lengths.sum())
        plan = iterator.converter.plan(batch)
        iterator.converter.convert(plan, None)
    seconds = time.perf_counter() - timed
    assert first
    return {"first_batch_s": round(first_batch_seconds, 2), "peak_rss_mib": round(_rss_mib(), 1),
            "pairs_per_s": round(pairs / seconds), "tokens_per_s": round(tokens / seconds)}


def _child(data: dict, batches: int) -> dict:
    code = ("import json, sys; sys.path.insert(0, %r); import streaming_data as b; "
            "print('RESULT ' + json.dumps(b._measure(sys.argv[1], int(sys.argv[2]))))"
            % str(Path(__file__).resolve().parent))
    result = subprocess.run([sys.executable, "-c", code, json.dumps(data), str(batches)],
                            capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not lines:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-4000:])
    return json.loads(lines[-1][len("RESULT "):])


def scaling(workdir: Path, sizes: list[int], shards: int, batch_size: int, batches: int) -> None:
    from gemb.data import prepared

    print(f"\nScaling: packed batches of {batch_size} pairs, {batches} batches after the first; "
          f"{shards} shards; one fresh process per size.")
    print(f"{'pairs':>12} {'write s':>8} {'first batch s':>14} {'peak RSS MiB':>13} "
          f"{'pairs/s':>9} {'tokens/s':>10}")
    for size in sizes:
        folder = workdir / f"synthetic_{size}"
        started = time.perf_counter()
        if not (folder / prepared.INFO_FILE).is_file():
            prepared.write_synthetic_task(folder, size, shards, task="pairs", max_length=48)
        written = time.perf_counter() - started
        row = _child({"batch_size": batch_size, "prepared": {"pairs": str(folder)},
                      "rates": {"pairs": 1.0}}, batches)
        print(f"{size:>12,} {written:>8.1f} {row['first_batch_s']:>14} {row['peak_rss_mib']:>13} "
              f"{row['pairs_per_s']:>9,} {row['tokens_per_s']:>10,}", flush=True)


def throughput(workdir: Path, num_pairs: int, batch_size: int, batches: int) -> None:
    import numpy as np

    from bench.data_throughput import default_vocabulary_path
    from gemb.data import prepare, sources, templates

    vocabulary = default_vocabulary_path()
    raw = workdir / f"text_pairs_{num_pairs}.jsonl"
    if not raw.is_file():
        rng = np.random.default_rng(0)
        with open(raw, "w") as handle:
            for _ in range(num_pairs):
                title = " ".join(rng.choice(WORDS, int(rng.integers(4, 12))))
                passage = " ".join(rng.choice(WORDS, int(rng.integers(20, 90))))
                handle.write(json.dumps({"title": title, "passage": passage}) + "\n")
    folder = workdir / f"text_pairs_{num_pairs}_prepared"
    spec = prepare.PrepareSpec(
        "text_pairs", sources.SourceSpec.of("jsonl", {"train": str(raw)}),
        sources.PairBuilder("title", "passage"), templates.default_template("search"), vocabulary)
    if not (folder / "info.json").is_file():
        started = time.perf_counter()
        prepare.prepare_in_process(spec, folder, 16)
        print(f"\nprepared {num_pairs:,} pairs in {time.perf_counter() - started:.1f} s "
              "(gemb data prepare --in_process, one process)")
    streamed = _child({"batch_size": batch_size, "prepared": {"text_pairs": str(folder)},
                       "rates": {"text_pairs": 1.0}}, batches)
    in_memory = _child({"batch_size": batch_size, "vocabulary_dir": vocabulary,
                        "mixture": "bench_text_pairs", "rates": {"bench_text_pairs": 1.0},
                        "jsonl_task": str(raw)}, batches)
    print(f"\nThroughput on the same {num_pairs:,} text pairs (Gemma 3 tokenizer), packed batches "
          f"of {batch_size}, {batches} batches after the first, one process:")
    print(f"{'path':>28} {'first batch s':>14} {'peak RSS MiB':>13} {'pairs/s':>9} {'tokens/s':>10}")
    for name, row in (("in memory (seqio, tf.data)", in_memory), ("prepared, streamed", streamed)):
        print(f"{name:>28} {row['first_batch_s']:>14} {row['peak_rss_mib']:>13} "
              f"{row['pairs_per_s']:>9,} {row['tokens_per_s']:>10,}")
    print(f"ratio streamed / in memory: {streamed['pairs_per_s'] / in_memory['pairs_per_s']:.1f}x "
          "pairs/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000,10000000")
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--throughput-pairs", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gemb-bench-streaming"))
    parser.add_argument("--skip", choices=("scaling", "throughput"), action="append", default=[])
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if "throughput" not in args.skip:
        throughput(args.workdir, args.throughput_pairs, args.batch_size, args.batches)
    if "scaling" not in args.skip:
        scaling(args.workdir, [int(s) for s in args.sizes.split(",")], args.shards,
                args.batch_size, args.batches)


if __name__ == "__main__":
    main()
