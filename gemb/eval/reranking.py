"""Reranking: order each query's candidate documents by cosine similarity, as MTEB does.

MTEB 2.x runs reranking tasks (AskUbuntuDupQuestions, SciDocsRR, StackOverflowDupQuestions...)
as retrieval restricted to each query's candidates, with the same trec_eval metrics; the main
score is MAP@1000 and MRR@10 is reported beside it. Each candidate list here is
positives (relevance 1) + negatives (relevance 0), the form of MTEB's original reranking data.
A query with no positive or no negative candidate is skipped, as MTEB's original reranking
evaluator did: it cannot tell rankers apart.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

from gemb.eval import encoders
from gemb.eval.retrieval import K_VALUES, normalize_rows, rank_documents
from gemb.eval.retrieval import retrieval_scores_from_rankings

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RerankingExample:
    query: str
    positives: list[str]
    negatives: list[str]


@dataclasses.dataclass
class RerankingData:
    examples: list[RerankingExample]
    source: str = ""

    def __post_init__(self):
        where = self.source or "reranking data"
        usable = [e for e in self.examples if e.positives and e.negatives]
        if not usable:
            raise ValueError(f"{where}: no query has both a positive and a negative candidate; "
                             "there is nothing to rerank.")
        skipped = len(self.examples) - len(usable)
        if skipped:
            logger.warning("%s: %d of %d queries lack a positive or a negative candidate and are "
                           "skipped.", where, skipped, len(self.examples))
        self.skipped = skipped
        self.examples = usable


def evaluate_reranking(encoder: Any, data: RerankingData, *, main_score: str = "map_at_1000",
                       prompt_task: Optional[str] = encoders.PROMPT_TASKS["reranking"]
                       ) -> dict[str, Any]:
    # Unique texts are embedded once: candidate lists of different queries overlap heavily.
    documents = sorted({text for e in data.examples for text in e.positives + e.negatives})
    row_of = {text: row for row, text in enumerate(documents)}
    doc_embeddings = normalize_rows(encoders.embed(encoder, documents, encoders.DOCUMENT,
                                                   task=prompt_task))
    query_embeddings = normalize_rows(encoders.embed(
        encoder, [e.query for e in data.examples], encoders.QUERY, task=prompt_task))

    rankings: dict[str, list[str]] = {}
    qrels: dict[str, dict[str, int]] = {}
    for q, example in enumerate(data.examples):
        query_id = str(q)
        # Candidate ids are positions in the list, so a text listed twice stays two candidates.
        candidates = [(text, 1) for text in example.positives] + \
                     [(text, 0) for text in example.negatives]
        ids = [f"{i:06d}" for i in range(len(candidates))]
        rows = [row_of[text] for text, _ in candidates]
        similarities = doc_embeddings[rows] @ query_embeddings[q]
        rankings[query_id] = rank_documents({i: float(s) for i, s in zip(ids, similarities)})
        qrels[query_id] = {i: relevance for i, (_, relevance) in zip(ids, candidates)}
    result = retrieval_scores_from_rankings(rankings, qrels, K_VALUES)
    if main_score not in result:
        raise ValueError(f"main_score {main_score!r} is not a reranking metric.")
    result["main_score"] = result[main_score]
    result["main_score_name"] = main_score
    result["num_skipped_queries"] = data.skipped
    return result
