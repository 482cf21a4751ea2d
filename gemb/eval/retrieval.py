"""Retrieval over a BEIR folder, scored exactly as MTEB scores it.

MTEB hands its top-1000 documents per query to pytrec_eval (trec_eval's definitions) for nDCG,
MAP, recall, precision and hit rate, and computes MRR itself. The definitions reproduced here:

* Ranking: score descending, ties broken by document id descending (trec_eval sorts that way,
  so two documents with equal scores are ordered by id, not by where they sit in the corpus).
* Relevance: a qrels value >= 1 is relevant. nDCG uses the qrels value itself as the gain
  (linear, not 2^rel - 1); values <= 0 give no gain. The ideal ranking is built from every
  relevant document in the qrels, including any the corpus lacks, so such documents lower the
  score (MTEB does not check them against the corpus).
* MAP@k and recall@k divide by the number of relevant documents in the qrels; P@k divides by k.
* Queries: those in the queries file that have at least one qrels line (whatever its score). A
  query whose qrels lines are all 0 stays in the average and scores 0. Queries without qrels are
  not evaluated.
* Averages over queries are rounded to 5 decimals, as MTEB reports them; MRR is not rounded.
* Cosine similarity; each query keeps its top 1000 documents (MTEB's largest k).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from gemb.eval import encoders

logger = logging.getLogger(__name__)

K_VALUES = (1, 3, 5, 10, 20, 100, 1000)
RELEVANCE_THRESHOLD = 1  # trec_eval's relevance_level


# ----------------------------------------------------------------------------------- metrics


def rank_documents(doc_scores: Mapping[str, float]) -> list[str]:
    """Document ids in trec_eval order: score descending, then id descending."""
    return [doc_id for doc_id, _ in sorted(doc_scores.items(), key=lambda item: (item[1], item[0]),
                                           reverse=True)]


def _query_metrics(ranked: Sequence[str], relevance: Mapping[str, int],
                   k_values: Sequence[int]) -> dict[str, float]:
    """trec_eval's per-query measures plus MTEB's MRR for one ranked list of document ids."""
    num_relevant = sum(1 for rel in relevance.values() if rel >= RELEVANCE_THRESHOLD)
    ideal_gains = np.array(sorted((rel for rel in relevance.values() if rel > 0), reverse=True),
                           dtype=np.float64)
    gains = np.array([max(relevance.get(doc_id, 0), 0) for doc_id in ranked], dtype=np.float64)
    is_relevant = np.array([relevance.get(doc_id, 0) >= RELEVANCE_THRESHOLD for doc_id in ranked],
                           dtype=bool)
    ranks = np.arange(1, len(ranked) + 1)
    discounted = np.cumsum(gains / np.log2(ranks + 1))
    ideal = np.cumsum(ideal_gains / np.log2(np.arange(2, len(ideal_gains) + 2)))
    hits = np.cumsum(is_relevant)
    precision_sums = np.cumsum(np.where(is_relevant, hits / ranks, 0.0))
    first_hit_rank = int(np.argmax(is_relevant)) + 1 if is_relevant.any() else None

    def upto(cumulative: np.ndarray, k: int) -> float:
        """The cumulative value over the first k ranks (0 for an empty list)."""
        return float(cumulative[min(k, len(cumulative)) - 1]) if len(cumulative) else 0.0

    metrics = {}
    for k in k_values:
        idcg = upto(ideal, k)
        hits_at_k = upto(hits, k)
        metrics[f"ndcg_at_{k}"] = upto(discounted, k) / idcg if idcg > 0 else 0.0
        metrics[f"map_at_{k}"] = upto(precision_sums, k) / num_relevant if num_relevant else 0.0
        metrics[f"recall_at_{k}"] = hits_at_k / num_relevant if num_relevant else 0.0
        metrics[f"precision_at_{k}"] = hits_at_k / k
        metrics[f"hit_rate_at_{k}"] = 1.0 if hits_at_k else 0.0
        metrics[f"mrr_at_{k}"] = (1.0 / first_hit_rank
                                  if first_hit_rank is not None and first_hit_rank <= k else 0.0)
    return metrics


def retrieval_scores_from_rankings(rankings: Mapping[str, Sequence[str]],
                                   qrels: Mapping[str, Mapping[str, int]],
                                   k_values: Sequence[int] = K_VALUES) -> dict[str, Any]:
    """Mean metrics over the queries that have both a ranking and qrels.

    `rankings[query_id]` is already in rank order (see rank_documents).
    """
    evaluated = [query_id for query_id in rankings if query_id in qrels]
    if not evaluated:
        raise ValueError("no query has both retrieval results and qrels; nothing to score. "
                         "Check that query ids in the qrels match the queries file.")
    per_query = {query_id: _query_metrics(rankings[query_id], qrels[query_id], k_values)
                 for query_id in evaluated}
    scores: dict[str, Any] = {}
    for name in next(iter(per_query.values())):
        mean = sum(metrics[name] for metrics in per_query.values()) / len(per_query)
        # MTEB rounds the pytrec_eval means to 5 decimals; its own MRR is not rounded.
        scores[name] = mean if name.startswith("mrr_") else round(mean, 5)
    scores["num_queries"] = len(evaluated)
    return scores


def retrieval_scores(results: Mapping[str, Mapping[str, float]],
                     qrels: Mapping[str, Mapping[str, int]],
                     k_values: Sequence[int] = K_VALUES,
                     ignore_identical_ids: bool = False) -> dict[str, Any]:
    """MTEB's retrieval metrics from {query_id: {doc_id: score}} results and qrels.

    ignore_identical_ids drops a document whose id equals the query id before scoring (MTEB
    sets it for tasks like ArguAna and Quora, whose queries are also in the corpus).
    """
    rankings = {}
    for query_id, doc_scores in results.items():
        if ignore_identical_ids:
            doc_scores = {d: s for d, s in doc_scores.items() if d != query_id}
        rankings[query_id] = rank_documents(doc_scores)
    return retrieval_scores_from_rankings(rankings, qrels, k_values)


# ------------------------------------------------------------------------------------ search


def normalize_rows(embeddings: np.ndarray) -> np.ndarray:
    # The same epsilon as torch.nn.functional.normalize, which MTEB's cosine uses.
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12)


def search_top_k(query_embeddings: np.ndarray, doc_embeddings: np.ndarray, top_k: int,
                 max_chunk_elements: int = 1 << 25) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k: (doc indices, scores), each [num_queries, min(top_k, num_docs)].

    Scores one block of queries against the whole corpus at a time, so memory stays near
    max_chunk_elements floats whatever the corpus size. Rows are sorted by score descending;
    among equal scores the order is not defined here (rank_documents fixes it by id).
    """
    queries = normalize_rows(np.asarray(query_embeddings, dtype=np.float32))
    docs = normalize_rows(np.asarray(doc_embeddings, dtype=np.float32))
    if queries.shape[1] != docs.shape[1]:
        raise ValueError(f"query embeddings have dimension {queries.shape[1]} but document "
                         f"embeddings have {docs.shape[1]}.")
    num_docs = docs.shape[0]
    k = min(top_k, num_docs)
    chunk = max(1, max_chunk_elements // max(num_docs, 1))
    all_indices = np.empty((queries.shape[0], k), dtype=np.int64)
    all_scores = np.empty((queries.shape[0], k), dtype=np.float32)
    for start in range(0, queries.shape[0], chunk):
        scores = queries[start:start + chunk] @ docs.T
        if k == 1:
            # argmax keeps the first of tied documents; bitext mining relies on that.
            candidates = np.argmax(scores, axis=1)[:, None]
        elif k < num_docs:
            candidates = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        else:
            candidates = np.broadcast_to(np.arange(num_docs), scores.shape)
        candidate_scores = np.take_along_axis(scores, candidates, axis=1)
        order = np.argsort(-candidate_scores, axis=1, kind="stable")
        all_indices[start:start + chunk] = np.take_along_axis(candidates, order, axis=1)
        all_scores[start:start + chunk] = np.take_along_axis(candidate_scores, order, axis=1)
    return all_indices, all_scores


# -------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class RetrievalData:
    """A retrieval task: corpus, queries to evaluate and their qrels.

    `queries` holds only the queries that have qrels (the ones MTEB evaluates).
    """

    corpus_ids: list[str]
    corpus_texts: list[str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    source: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if not self.corpus_ids:
            raise ValueError(f"{self.source or 'retrieval task'}: the corpus is empty.")
        if len(self.corpus_ids) != len(self.corpus_texts):
            raise ValueError("corpus_ids and corpus_texts differ in length.")
        if not self.queries:
            raise ValueError(f"{self.source or 'retrieval task'}: no query has qrels; nothing "
                             "to evaluate.")


def subsample(data: RetrievalData, num_queries: Optional[int] = None,
              corpus_size: Optional[int] = None, seed: int = 0) -> RetrievalData:
    """A seeded sample of a retrieval task, for evaluation that must stay short (CPU runs).

    num_queries: the queries kept (a random subset). corpus_size: the corpus is cut to the kept
    queries' relevant documents plus random other documents up to this size, so every kept
    query can still find its documents. A cut corpus has fewer distractors, so its scores are
    higher than the full task's and comparable only with runs on the same sample (the notes say
    so).
    """
    rng = np.random.default_rng(seed)
    query_ids = list(data.queries)
    if num_queries is not None and num_queries < len(query_ids):
        query_ids = [query_ids[i] for i in sorted(rng.permutation(len(query_ids))[:num_queries])]
    queries = {q: data.queries[q] for q in query_ids}
    qrels = {q: data.qrels[q] for q in query_ids if q in data.qrels}
    corpus_ids, corpus_texts = data.corpus_ids, data.corpus_texts
    notes = list(data.notes)
    if corpus_size is not None and corpus_size < len(corpus_ids):
        relevant = {d for docs in qrels.values() for d, score in docs.items() if score > 0}
        if len(relevant) > corpus_size:
            raise ValueError(f"{data.source}: corpus_size={corpus_size} is smaller than the "
                             f"{len(relevant)} documents relevant to the kept queries; raise it "
                             "or keep fewer queries.")
        others = [i for i, d in enumerate(corpus_ids) if d not in relevant]
        distractors = {others[j] for j in rng.permutation(len(others))[:corpus_size - len(relevant)]}
        keep = [i for i, d in enumerate(corpus_ids) if d in relevant or i in distractors]
        corpus_ids = [corpus_ids[i] for i in keep]
        corpus_texts = [data.corpus_texts[i] for i in keep]
    if len(queries) < len(data.queries) or len(corpus_ids) < len(data.corpus_ids):
        notes.append(f"sampled (seed {seed}): {len(queries)} of {len(data.queries)} queries, "
                     f"{len(corpus_ids)} of {len(data.corpus_ids)} documents; scores are "
                     "comparable only with runs on the same sample")
    return RetrievalData(corpus_ids=list(corpus_ids), corpus_texts=list(corpus_texts),
                         queries=queries, qrels=qrels, source=data.source, notes=notes)


def document_text(title: Optional[str], text: Optional[str]) -> str:
    """A BEIR document as MTEB gives it to the model: "title text", stripped."""
    title = title or ""
    text = text or ""
    return f"{title} {text}".strip() if title else text.strip()


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _find_file(directory: Path, names: Sequence[str], what: str) -> Path:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: no {what} file (looked for {', '.join(names)}).")


def _read_jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    with _open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error}).") from None


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR qrels TSV (query-id, corpus-id, score; header optional) -> {query: {doc: score}}."""
    qrels: dict[str, dict[str, int]] = {}
    with _open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) == 4:  # TREC qrels: query, iteration, doc, score
                fields = [fields[0], fields[2], fields[3]]
            if len(fields) != 3:
                raise ValueError(f"{path}:{line_number}: expected 3 tab-separated fields "
                                 f"(query-id, corpus-id, score), got {len(fields)}.")
            query_id, doc_id, score_text = fields
            try:
                score = int(float(score_text))
            except ValueError:
                if line_number == 1:  # the header line
                    continue
                raise ValueError(f"{path}:{line_number}: score {score_text!r} is not a "
                                 "number.") from None
            qrels.setdefault(query_id, {})[doc_id] = score
    return qrels


def load_beir(directory: Union[str, Path], split: str = "test",
              missing_docs: str = "error") -> RetrievalData:
    """A BEIR folder: corpus.jsonl[.gz], queries.jsonl[.gz], qrels/{split}.tsv.

    missing_docs: what to do when the qrels name documents the corpus lacks. "error" (default)
    stops, since it usually means the qrels and corpus do not belong together; "count" keeps them,
    as MTEB does: they are relevant documents that can never be retrieved.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"retrieval folder {directory} does not exist.")
    if missing_docs not in ("error", "count"):
        raise ValueError(f"missing_docs must be 'error' or 'count', got {missing_docs!r}")
    corpus_path = _find_file(directory, ["corpus.jsonl", "corpus.jsonl.gz"], "corpus")
    queries_path = _find_file(directory, ["queries.jsonl", "queries.jsonl.gz"], "queries")
    qrels_path = _find_file(directory / "qrels", [f"{split}.tsv", f"{split}.tsv.gz"],
                            f"qrels for split {split!r}")

    corpus_ids: list[str] = []
    corpus_texts: list[str] = []
    seen: set[str] = set()
    for line_number, record in _read_jsonl(corpus_path):
        if "_id" not in record or "text" not in record:
            raise ValueError(f"{corpus_path}:{line_number}: a corpus line needs '_id' and "
                             f"'text'; it has {sorted(record)}.")
        doc_id = str(record["_id"])
        if doc_id in seen:
            raise ValueError(f"{corpus_path}:{line_number}: document id {doc_id!r} appears "
                             "twice; ids must be unique.")
        seen.add(doc_id)
        corpus_ids.append(doc_id)
        corpus_texts.append(document_text(record.get("title"), record.get("text")))
    if not corpus_ids:
        raise ValueError(f"{corpus_path}: the corpus is empty.")

    all_queries: dict[str, str] = {}
    for line_number, record in _read_jsonl(queries_path):
        if "_id" not in record or "text" not in record:
            raise ValueError(f"{queries_path}:{line_number}: a query line needs '_id' and "
                             f"'text'; it has {sorted(record)}.")
        all_queries[str(record["_id"])] = record["text"]

    qrels = read_qrels(qrels_path)
    if not qrels:
        raise ValueError(f"{qrels_path}: no qrels lines.")
    notes = []
    unknown_queries = sorted(set(qrels) - set(all_queries))
    if unknown_queries:
        # MTEB evaluates only queries it has text for; say how many were dropped.
        note = (f"{len(unknown_queries)} of {len(qrels)} qrels queries are not in "
                f"{queries_path.name} and are not evaluated (e.g. {unknown_queries[:3]})")
        logger.warning("%s: %s", directory, note)
        notes.append(note)
    queries = {query_id: all_queries[query_id] for query_id in all_queries if query_id in qrels}

    known_docs = seen
    missing = sorted({doc_id for query_id in queries for doc_id in qrels[query_id]
                      if doc_id not in known_docs})
    if missing:
        message = (f"{qrels_path}: qrels name {len(missing)} document(s) that are not in "
                   f"{corpus_path.name} (e.g. {missing[:5]}).")
        if missing_docs == "error":
            raise ValueError(message + " If the corpus really lacks them, add "
                             "?missing_docs=count to the task (retrieval:DIR?missing_docs=count) "
                             "to score them as MTEB does: relevant but never retrieved.")
        logger.warning("%s They count as relevant documents that cannot be retrieved.", message)
        notes.append(f"{len(missing)} relevant documents missing from the corpus")
    return RetrievalData(corpus_ids=corpus_ids, corpus_texts=corpus_texts, queries=queries,
                         qrels={query_id: qrels[query_id] for query_id in queries},
                         source=str(directory), notes=notes)


# ---------------------------------------------------------------------------------- evaluate


def rankings_from_top_k(query_ids: Sequence[str], doc_ids: Sequence[str], indices: np.ndarray,
                        scores: np.ndarray, ignore_identical_ids: bool = False
                        ) -> dict[str, list[str]]:
    """Per-query ranked id lists from search_top_k output, with trec_eval's tie order."""
    rankings = {}
    for row, query_id in enumerate(query_ids):
        # Scores go through Python floats, as MTEB's results dicts hold them.
        doc_scores = {doc_ids[i]: float(s) for i, s in zip(indices[row], scores[row])}
        if ignore_identical_ids:
            doc_scores.pop(query_id, None)
        rankings[query_id] = rank_documents(doc_scores)
    return rankings


def evaluate_retrieval(encoder: Any, data: RetrievalData, *, k_values: Sequence[int] = K_VALUES,
                       ignore_identical_ids: bool = False, main_score: str = "ndcg_at_10",
                       prompt_task: Optional[str] = encoders.PROMPT_TASKS["retrieval"],
                       embedding_cache: Optional[encoders.EmbeddingCache] = None
                       ) -> dict[str, Any]:
    """Encodes queries and corpus, retrieves the top max(k_values) documents, scores them."""
    query_ids = list(data.queries)
    query_embeddings = encoders.embed(encoder, [data.queries[q] for q in query_ids],
                                      encoders.QUERY, task=prompt_task)
    if embedding_cache is not None:
        doc_embeddings = embedding_cache.embed(encoder, data.corpus_texts, encoders.DOCUMENT,
                                               task=prompt_task)
    else:
        doc_embeddings = encoders.embed(encoder, data.corpus_texts, encoders.DOCUMENT,
                                        task=prompt_task)
    indices, scores = search_top_k(query_embeddings, doc_embeddings, max(k_values))
    rankings = rankings_from_top_k(query_ids, data.corpus_ids, indices, scores,
                                   ignore_identical_ids=ignore_identical_ids)
    result = retrieval_scores_from_rankings(rankings, data.qrels, k_values)
    if main_score not in result:
        raise ValueError(f"main_score {main_score!r} is not a retrieval metric; choose one of "
                         f"{sorted(k for k in result if k != 'num_queries')}.")
    result["main_score"] = result[main_score]
    result["main_score_name"] = main_score
    result["num_documents"] = len(data.corpus_ids)
    if data.notes:
        result["notes"] = list(data.notes)
    return result
