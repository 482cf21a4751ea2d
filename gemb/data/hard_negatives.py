"""Hard-negative mining as the Gemini Embedding recipe does it: retrieve, score twice, fuse, and
take the lowest-ranked neighbour.

For each training query:
  1. retrieve its top-k neighbours in the corpus with a first embedder (exact: one matmul per
     block of queries, `nearest_neighbours`, sharded over the mesh when given a Partitioner);
  2. score every neighbour with an LLM two ways: graded relevance (the expected grade under the
     LLM's probabilities of the grades 0..3 as the answer's next token) and query likelihood
     (log p(query | passage));
  3. fuse the two rankings with reciprocal rank fusion (RRF: sum over rankings of
     1 / (k + rank));
  4. drop every positive (by id, and by text: a corpus often holds copies of the positive) and
     the neighbours ranked above `min_rank`, and take the LOWEST-ranked remaining neighbour(s):
     retrieved as close, yet judged least relevant by both scores, they are hard negatives
     unlikely to be unlabelled positives (false negatives).

The result is a JSONL file {"query_id", "negative_ids", ...scores for inspection} that
`read_beir(hard_negatives_path=...)` (a task's source option) reads directly. The stage resumes
after a crash (gemb.data.resumable): queries already in the output are skipped, and every line
is flushed when it is written. `summary.json` beside the output counts queries, neighbours
scored, negatives chosen and skipped inputs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from gemb.data import resumable
from gemb.progress import Progress

log = logging.getLogger(__name__)

GRADES = (0, 1, 2, 3)
RELEVANCE_PROMPT = (
    "Rate how well the passage answers the search query, from 0 (irrelevant) to 3 (answers "
    "it exactly).\nQuery: {query}\nPassage: {passage}\nRating:")
QUERY_LIKELIHOOD_PROMPT = "Passage: {passage}\nA search query that this passage answers:"


@dataclasses.dataclass(frozen=True)
class MiningConfig:
    """top_k: neighbours retrieved and scored per query. min_rank: neighbours ranked above this
    (0-based, after the positives are removed) are never chosen. num_negatives: how many of the
    lowest-ranked to keep. rrf_k: the RRF constant (60, as in Cormack et al. 2009).
    max_passage_chars: passages are cut to this many characters in the LLM prompts."""

    top_k: int = 20
    min_rank: int = 3
    num_negatives: int = 1
    rrf_k: float = 60.0
    max_passage_chars: int = 2000

    def __post_init__(self):
        if self.top_k < 1 or self.num_negatives < 1 or self.min_rank < 0:
            raise ValueError(f"{self}: top_k and num_negatives must be >= 1, min_rank >= 0.")
        if self.min_rank + self.num_negatives > self.top_k:
            raise ValueError(f"min_rank={self.min_rank} + num_negatives={self.num_negatives} "
                             f"leaves nothing to choose among top_k={self.top_k}; raise top_k.")


# ------------------------------------------------------------------------- ranking and choice


def ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of each candidate, highest score first; ties keep candidate order."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    result = np.empty(len(order), np.int64)
    result[order] = np.arange(1, len(order) + 1)
    return result


def reciprocal_rank_fusion(score_lists: Sequence[np.ndarray], k: float = 60.0) -> np.ndarray:
    """Fused score per candidate: sum over the rankings of 1 / (k + rank), higher = better."""
    return sum(1.0 / (k + ranks(scores)) for scores in score_lists)


def _same_text(text: str) -> str:
    return " ".join(text.split())


def choose_negatives(candidate_ids: Sequence[str], fused: np.ndarray,
                     positive_ids: Sequence[str], texts: Mapping[str, str], min_rank: int,
                     count: int) -> list[str]:
    """The `count` lowest-ranked candidates by fused score, never a positive (by id or text)
    and never one of the `min_rank` best-ranked non-positives; lowest-ranked first."""
    positive_texts = {_same_text(texts[p]) for p in positive_ids if p in texts}
    order = np.argsort(-np.asarray(fused, np.float64), kind="stable")
    ranked = [candidate_ids[i] for i in order
              if candidate_ids[i] not in positive_ids
              and _same_text(texts.get(candidate_ids[i], "")) not in positive_texts]
    eligible = ranked[min_rank:]
    return eligible[::-1][:count]


# ----------------------------------------------------------------------------------- retrieval


def nearest_neighbours(queries: np.ndarray, corpus: np.ndarray, k: int, partitioner=None,
                       block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by dot product: (indices [Q, k], scores [Q, k]), best first.

    Blocks of queries against the whole corpus in one jitted matmul + top_k; with a
    Partitioner the corpus rows are split over its data axes (each device scores its rows, XLA
    merges the top k), so a corpus larger than one device's memory still runs exactly."""
    import jax
    import jax.numpy as jnp

    k = min(k, corpus.shape[0])
    corpus_array = jnp.asarray(corpus, jnp.float32)
    if partitioner is not None:
        corpus_array = jax.device_put(corpus_array, partitioner.batch_sharding(2))

    @jax.jit
    def top_k(query_block, corpus_rows):
        return jax.lax.top_k(query_block @ corpus_rows.T, k)

    indices, scores = [], []
    for start in range(0, len(queries), block):
        values, index = top_k(jnp.asarray(queries[start:start + block], jnp.float32),
                              corpus_array)
        indices.append(np.asarray(index))
        scores.append(np.asarray(values))
    if not indices:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate(indices), np.concatenate(scores)


# ------------------------------------------------------------------------------- LLM scoring


def expected_grade(llm, prompts: Sequence[str]) -> np.ndarray:
    """Expected grade per prompt under the LLM's distribution over the grades 0..3 as the
    answer: each grade's probability from log p(" g" | prompt), renormalised over the grades
    (one log_likelihood call for all prompts x grades). The prompts end where the grade goes
    (e.g. "...\nRating:"). The LLM judge of every stage (relevance, query realism)."""
    rows = [p for p in prompts for _ in GRADES]
    answers = [f" {g}" for _ in prompts for g in GRADES]
    log_probs = np.asarray(llm.log_likelihood(rows, answers)).reshape(len(prompts), len(GRADES))
    probs = np.exp(log_probs - log_probs.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return probs @ np.asarray(GRADES, np.float64)


def graded_relevance(llm, query: str, passages: Sequence[str]) -> np.ndarray:
    """Expected relevance grade (0..3, RELEVANCE_PROMPT) of each passage for the query."""
    return expected_grade(llm, [RELEVANCE_PROMPT.format(query=query, passage=p)
                                for p in passages])


def query_likelihood(llm, query: str, passages: Sequence[str]) -> np.ndarray:
    """log p(query | passage) per passage (the same query tokens, so comparable across them)."""
    prompts = [QUERY_LIKELIHOOD_PROMPT.format(passage=p) for p in passages]
    return np.asarray(llm.log_likelihood(prompts, [f" {query}"] * len(passages)), np.float64)


# ------------------------------------------------------------------------------------ the stage


@dataclasses.dataclass(frozen=True)
class MiningQuery:
    query_id: str
    text: str
    positive_ids: tuple[str, ...]


def mine_hard_negatives(queries: Sequence[MiningQuery], corpus: Mapping[str, str],
                        embed: Callable[[Sequence[str], str], np.ndarray], llm,
                        out_path: str | Path, config: MiningConfig = MiningConfig(),
                        partitioner=None) -> dict:
    """Runs the stage (module docstring); returns the summary it also writes.

    embed(texts, role) -> [N, E] embeddings, role 'query' or 'document' (e.g. a gemb
    TextEncoder's encode); llm: anything with log_likelihood(prompts, continuations)
    (gemb.llm: GemmaDecoder in process, or an OpenAI-compatible server)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    counts = {"queries": len(queries), "already_done": 0, "queries_mined": 0,
              "neighbours_scored": 0, "negatives_chosen": 0, "empty_passages_skipped": 0,
              "passages_cut_for_the_llm": 0, "queries_without_a_negative": 0,
              "queries_with_unknown_positives": 0}
    corpus_ids = [i for i, text in corpus.items() if text and text.strip()]
    counts["empty_passages_skipped"] = len(corpus) - len(corpus_ids)
    if counts["empty_passages_skipped"]:
        log.warning("%d empty corpus passages skipped (never retrieved or chosen).",
                    counts["empty_passages_skipped"])
    done = resumable.done_ids(out_path, key="query_id")
    todo = [q for q in queries if q.query_id not in done]
    counts["already_done"] = len(queries) - len(todo)
    if todo:
        corpus_embeddings = np.asarray(embed([corpus[i] for i in corpus_ids], "document"))
        query_embeddings = np.asarray(embed([q.text for q in todo], "query"))
        # The positives take slots of the top k; retrieve enough that k others remain.
        extra = max(len(q.positive_ids) for q in todo)
        neighbours, similarities = nearest_neighbours(
            query_embeddings, corpus_embeddings, config.top_k + extra, partitioner)
        cuts = resumable.KindCounter(log, "LLM prompt input")
        with resumable.AppendWriter(out_path) as out, Progress(
                len(todo), "mining hard negatives", unit="query text") as progress:
            for row, query in enumerate(todo):
                if any(p not in corpus for p in query.positive_ids):
                    counts["queries_with_unknown_positives"] += 1
                candidates = [corpus_ids[i] for i in neighbours[row]
                              if corpus_ids[i] not in query.positive_ids][:config.top_k]
                passages = []
                for candidate in candidates:
                    text = corpus[candidate]
                    if len(text) > config.max_passage_chars:
                        cuts.count("passages_cut_for_the_llm",
                                   f"passage {candidate!r} has {len(text)} characters; passages "
                                   f"longer than {config.max_passage_chars} are cut for the "
                                   "LLM prompts (MiningConfig.max_passage_chars)")
                        text = text[:config.max_passage_chars]
                    passages.append(text)
                relevance = graded_relevance(llm, query.text, passages)
                likelihood = query_likelihood(llm, query.text, passages)
                fused = reciprocal_rank_fusion([relevance, likelihood], config.rrf_k)
                chosen = choose_negatives(candidates, fused, query.positive_ids, corpus,
                                          config.min_rank, config.num_negatives)
                counts["neighbours_scored"] += len(candidates)
                counts["negatives_chosen"] += len(chosen)
                counts["queries_mined"] += 1
                if not chosen:
                    counts["queries_without_a_negative"] += 1
                retrieved = {corpus_ids[i]: float(s)
                             for i, s in zip(neighbours[row], similarities[row])}
                fused_rank = ranks(fused)
                out.write({
                    "query_id": query.query_id, "negative_ids": chosen,
                    "candidates": [
                        {"id": c, "similarity": round(retrieved[c], 6),
                         "relevance": round(float(r), 6),
                         "query_log_likelihood": round(float(q), 4), "fused_rank": int(f)}
                        for c, r, q, f in zip(candidates, relevance, likelihood, fused_rank)],
                })
                progress.update(1)
        counts["passages_cut_for_the_llm"] = cuts["passages_cut_for_the_llm"]
    summary = {"config": dataclasses.asdict(config), **counts}
    resumable.write_summary(out_path, summary)
    return summary


# ------------------------------------------------------------------------------------ the CLI


def read_beir_queries(folder: str, split: str, max_queries: int | None = None
                      ) -> tuple[list[MiningQuery], dict[str, str]]:
    """The queries of a BEIR folder's qrels/{split}.tsv with their positives (score > 0), and
    the corpus texts (title + text)."""
    from gemb.data import sources

    corpus = {}
    for raw in sources.read_jsonl(f"{folder.rstrip('/')}/corpus.jsonl"):
        if raw.error is None and "_id" in raw.value:
            title, text = raw.value.get("title") or "", raw.value.get("text") or ""
            corpus[str(raw.value["_id"])] = f"{title}\n{text}" if title else text
    texts = {}
    for raw in sources.read_jsonl(f"{folder.rstrip('/')}/queries.jsonl"):
        if raw.error is None and "_id" in raw.value:
            texts[str(raw.value["_id"])] = raw.value.get("text") or ""
    positives: dict[str, list[str]] = {}
    for raw in sources.read_tsv(f"{folder.rstrip('/')}/qrels/{split}.tsv"):
        row = raw.value
        if float(row.get("score", 0) or 0) > 0:
            positives.setdefault(row["query-id"], []).append(row["corpus-id"])
    queries = [MiningQuery(q, texts[q], tuple(p)) for q, p in positives.items()
               if texts.get(q, "").strip()]
    return queries[:max_queries] if max_queries else queries, corpus


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from gemb.llm.interface import add_llm_argument

    parser = argparse.ArgumentParser(
        prog="gemb data mine-negatives",
        description="Hard negatives for a BEIR folder's queries: retrieve with a gemb model, "
                    "score with an LLM (graded relevance + query likelihood), fuse with RRF, "
                    "keep the lowest-ranked. Resumable; writes JSONL for read_beir's "
                    "hard_negatives_path and summary.json beside it.")
    parser.add_argument("--beir", required=True, help="BEIR folder (corpus, queries, qrels/)")
    parser.add_argument("--split", required=True, help="qrels split of the training queries "
                        "(never an evaluation split)")
    parser.add_argument("--embedder", required=True, help="gemb model folder that retrieves")
    add_llm_argument(parser)
    parser.add_argument("--out", required=True, help="output JSONL")
    parser.add_argument("--top_k", type=int, default=MiningConfig.top_k)
    parser.add_argument("--min_rank", type=int, default=MiningConfig.min_rank)
    parser.add_argument("--num_negatives", type=int, default=MiningConfig.num_negatives)
    parser.add_argument("--max_passage_chars", type=int, default=MiningConfig.max_passage_chars)
    parser.add_argument("--max_queries", type=int)
    parser.add_argument("--max_length", type=int, default=256,
                        help="tokens per text for the embedder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from gemb.embed import load_encoder
    from gemb.llm.interface import make_llm

    queries, corpus = read_beir_queries(args.beir, args.split, args.max_queries)
    encoder = load_encoder(args.embedder, max_length=args.max_length)
    summary = mine_hard_negatives(
        queries, corpus, lambda texts, role: encoder.encode(texts, role=role), make_llm(args.llm),
        args.out, MiningConfig(args.top_k, args.min_rank, args.num_negatives,
                               max_passage_chars=args.max_passage_chars))
    print(json.dumps(summary), flush=True)
    return 0
