"""The quickstart's evaluator: docstring -> code retrieval on held-out modules.

Queries are docstrings (first paragraph) of functions from the corpus's held-out split (whole
modules the training split never saw, gemb.data.code_corpus); the corpus is the code of the
same functions, so every query has exactly one relevant document. A fixed random subsample
keeps the CPU quickstart short. Scores come from gemb.eval.retrieval (MTEB's definitions).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass
class DocstringCodeRetrieval:
    num_queries: int = 200
    split: str = "test"
    seed: int = 0
    k_values: tuple[int, ...] = (1, 10)
    prompt_task: str = "code_retrieval"

    def __post_init__(self):
        self._data = None

    def data(self):
        if self._data is None:
            from gemb.data import code_corpus
            from gemb.eval.retrieval import RetrievalData

            records = list(code_corpus.read_split(self.split))
            if not records:
                raise ValueError(f"the docstring corpus has no {self.split!r} examples.")
            rng = np.random.default_rng(self.seed)
            chosen = rng.permutation(len(records))[: self.num_queries]
            queries, corpus_ids, corpus_texts, qrels = {}, [], [], {}
            for index in sorted(chosen):
                record = records[index]
                qid, did = f"q{index}", f"d{index}"
                queries[qid] = record["query"]
                corpus_ids.append(did)
                corpus_texts.append(record["code"])
                qrels[qid] = {did: 1}
            self._data = RetrievalData(corpus_ids=corpus_ids, corpus_texts=corpus_texts,
                                       queries=queries, qrels=qrels,
                                       source=f"docstring_code[{self.split}]")
        return self._data

    def __call__(self, step: int, encode: Callable) -> dict[str, float]:
        from gemb.eval.retrieval import evaluate_retrieval

        result = evaluate_retrieval(encode, self.data(), k_values=self.k_values,
                                    prompt_task=self.prompt_task)
        return {k: v for k, v in result.items() if k.startswith(("recall_at", "ndcg_at", "mrr_at"))}
