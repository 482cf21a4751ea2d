"""Hard-negative mining as the Gemini Embedding recipe does it: retrieve, score twice, fuse, and
take the lowest-ranked neighbour.

For each training query:
  1. retrieve its top-k neighbours in the corpus with a first embedder: exact (one matmul per
     block of queries, `nearest_neighbours`, sharded over the mesh when given a Partitioner),
     or through a FAISS index for corpora too large for exact search (`ann_neighbours`: HNSW,
     or IVF over k-means lists);
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

Run as a job of several JAX processes (a multi-host launcher, as `gemb train`), the corpus is
embedded by all of them and searched once over the global mesh, each process scores its share
of the queries with its own LLM, and process 0 merges their part files (on a filesystem they
share). For hundreds of millions of passages, use --index faiss_ivf.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from gemb.data import resumable
from gemb.progress import Progress

log = logging.getLogger(__name__)

GRADES = (0, 1, 2, 3)
# exact: brute force on the accelerator (sharded); faiss_hnsw: a graph index, no training, the
# best recall per query-time; faiss_ivf: k-means lists, less memory and faster to build on
# hundreds of millions of passages.
RETRIEVAL_INDEXES = ("exact", "faiss_hnsw", "faiss_ivf")
RELEVANCE_PROMPT = (
    "Rate how well the passage answers the search query, from 0 (irrelevant) to 3 (answers "
    "it exactly).\nQuery: {query}\nPassage: {passage}\nRating:")
QUERY_LIKELIHOOD_PROMPT = "Passage: {passage}\nA search query that this passage answers:"


@dataclasses.dataclass(frozen=True)
class MiningConfig:
    """top_k: neighbours retrieved and scored per query. min_rank: neighbours ranked above this
    (0-based, after the positives are removed) are never chosen. num_negatives: how many of the
    lowest-ranked to keep. rrf_k: the RRF constant (60, as in Cormack et al. 2009).
    max_passage_chars: passages are cut to this many characters in the LLM prompts.
    index: how neighbours are retrieved, one of RETRIEVAL_INDEXES (`search_neighbours`)."""

    top_k: int = 20
    min_rank: int = 3
    num_negatives: int = 1
    rrf_k: float = 60.0
    max_passage_chars: int = 2000
    index: str = "exact"

    def __post_init__(self):
        if self.index not in RETRIEVAL_INDEXES:
            raise ValueError(f"unknown index {self.index!r}; one of {RETRIEVAL_INDEXES}.")
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
    corpus = np.asarray(corpus, np.float32)
    replicated = None
    if partitioner is None:
        corpus_array = jnp.asarray(corpus)
    else:
        # Every process holds the whole corpus; each device takes its rows (this works across
        # processes, where device_put of a host array to a global sharding does not), and the
        # top k comes back whole to every process.
        # Zero rows pad the corpus to a multiple of the data-parallel devices; they score -inf.
        sharding = partitioner.batch_sharding(2)
        padded = np.pad(corpus, ((0, -len(corpus) % partitioner.data_parallel_size), (0, 0)))
        corpus_array = jax.make_array_from_callback(padded.shape, sharding,
                                                    lambda index: padded[index])
        replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    num_rows = len(corpus)

    @functools.partial(jax.jit, out_shardings=replicated)
    def top_k(query_block, corpus_rows):
        scores = query_block @ corpus_rows.T
        scores = jnp.where(jnp.arange(scores.shape[1]) < num_rows, scores, -jnp.inf)
        return jax.lax.top_k(scores, k)

    indices, scores = [], []
    for start in range(0, len(queries), block):
        values, index = top_k(jnp.asarray(queries[start:start + block], jnp.float32),
                              corpus_array)
        indices.append(np.asarray(index))
        scores.append(np.asarray(values))
    if not indices:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate(indices), np.concatenate(scores)


def ann_neighbours(queries: np.ndarray, corpus: np.ndarray, k: int, index: str = "faiss_hnsw",
                   hnsw_neighbours: int = 32, ef_search: int = 128,
                   ivf_lists: int | None = None, ivf_probes: int = 16
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-k by inner product through FAISS (CPU): (indices [Q, k], scores [Q, k]),
    best first; an index FAISS could not fill (IVF lists too few) holds -1 with score -inf.

    faiss_hnsw: IndexHNSWFlat with `hnsw_neighbours` links per node, searched with ef_search
    (>= k) candidates. faiss_ivf: IndexIVFFlat over `ivf_lists` k-means lists (default
    4 * sqrt(N), at most N / 39 so that every centroid trains on enough points), `ivf_probes`
    lists searched per query."""
    try:
        import faiss
    except ImportError:
        raise ImportError(f"index={index!r} needs faiss: pip install 'gemb[prepare]' (faiss-cpu); "
                          "or use index='exact'.") from None
    corpus = np.ascontiguousarray(corpus, np.float32)
    queries = np.ascontiguousarray(queries, np.float32)
    size, dim = corpus.shape
    k = min(k, size)
    if index == "faiss_hnsw":
        searcher = faiss.IndexHNSWFlat(dim, hnsw_neighbours, faiss.METRIC_INNER_PRODUCT)
        searcher.hnsw.efSearch = max(ef_search, k)
    elif index == "faiss_ivf":
        lists = ivf_lists or int(max(1, min(4 * np.sqrt(size), size // 39)))
        searcher = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists,
                                      faiss.METRIC_INNER_PRODUCT)
        searcher.train(corpus)
        searcher.nprobe = min(ivf_probes, lists)
    else:
        raise ValueError(f"unknown FAISS index {index!r}; faiss_hnsw or faiss_ivf.")
    searcher.add(corpus)
    scores, indices = searcher.search(queries, k)
    scores[indices < 0] = -np.inf
    return indices.astype(np.int64), scores


def search_neighbours(queries: np.ndarray, corpus: np.ndarray, k: int, index: str = "exact",
                      partitioner=None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k neighbours by the chosen index (RETRIEVAL_INDEXES)."""
    if index == "exact":
        return nearest_neighbours(queries, corpus, k, partitioner)
    return ann_neighbours(queries, corpus, k, index)


# ------------------------------------------------------------------------------- LLM scoring


def expected_grade(llm, prompts: Sequence[str]) -> np.ndarray:
    """Expected grade per prompt under the LLM's distribution over the grades 0..3 as the
    answer: each grade's probability from log p(" g" | prompt), renormalised over the grades
    (an LLM with `option_log_probs` scores all grades from one pass of each prompt; any other
    makes one log_likelihood call for all prompts x grades). The prompts end where the grade goes
    (e.g. "...\nRating:"). The LLM judge of every stage (relevance, query realism)."""
    answers = [f" {g}" for g in GRADES]
    if hasattr(llm, "option_log_probs"):  # one pass per prompt for all grades (GemmaDecoder)
        log_probs = np.asarray(llm.option_log_probs(list(prompts), answers), np.float64)
    else:
        log_probs = np.asarray(llm.log_likelihood([p for p in prompts for _ in GRADES],
                                                  [a for _ in prompts for a in answers]),
                               np.float64).reshape(len(prompts), len(GRADES))
    # A log-probability is <= 0 and not NaN, and some grade must be possible: otherwise the
    # LLM (a misbehaving server, a broken model) gave no grade on the scale; NaN marks it.
    usable = (np.all(~np.isnan(log_probs) & (log_probs <= 1e-6), axis=1)
              & np.any(np.isfinite(log_probs), axis=1))
    safe = np.where(usable[:, None], log_probs, 0.0)
    probs = np.exp(safe - safe.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return np.where(usable, probs @ np.asarray(GRADES, np.float64), np.nan)


GRADE_OUTSIDE_SCALE = "grade_outside_scale"


def count_unusable_grades(grades: np.ndarray, counter: resumable.KindCounter, what: str) -> None:
    """Counts (and logs the first of) the NaN grades of `expected_grade`."""
    for _ in range(int(np.isnan(grades).sum())):
        counter.count(GRADE_OUTSIDE_SCALE,
                      f"{what}: the LLM's log-probabilities of the grades {GRADES} are not "
                      "log-probabilities (NaN or > 0) or all -inf; the item gets no grade and "
                      "is dropped (a server or model fault: check the LLM)")


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


def _processes() -> tuple[int, int]:
    """(this process's index, the process count) of a JAX job; (0, 1) without JAX."""
    if "jax" not in sys.modules:
        return 0, 1
    import jax

    return jax.process_index(), jax.process_count()


def part_path(out_path: Path, process: int, count: int) -> Path:
    """Where process `process` of `count` writes its queries' lines before the merge."""
    return out_path.with_name(f"{out_path.name}.part-{process:05d}-of-{count:05d}")


def _sum_over_processes(values: list[int]) -> list[int]:
    if "jax" not in sys.modules or _processes()[1] == 1:
        return values
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray(values, np.int64))
    return np.asarray(gathered).reshape(-1, len(values)).sum(axis=0).tolist()


MINE_COUNTS = ("queries_mined", "neighbours_scored", "negatives_chosen",
               "queries_without_a_negative", "queries_with_unknown_positives",
               "passages_cut_for_the_llm", GRADE_OUTSIDE_SCALE)


@dataclasses.dataclass(frozen=True)
class MiningItem:
    """One query's work for the LLM, self-contained (a Beam element): its retrieved candidates
    (id, similarity), best first, without its positives, and the texts of the candidates and
    positives (choose_negatives compares texts)."""

    query: MiningQuery
    candidates: tuple[tuple[str, float], ...]
    texts: Mapping[str, str]
    unknown_positives: bool = False


def retrieve_candidates(queries: Sequence[MiningQuery], corpus: Mapping[str, str],
                        embed: Callable[[Sequence[str], str], np.ndarray],
                        config: MiningConfig = MiningConfig(), partitioner=None
                        ) -> list[MiningItem]:
    """Step 1 for every query: embed the corpus (non-empty passages) and the queries, retrieve
    the top-k (RETRIEVAL_INDEXES), drop the positives. A collective in a multi-process job."""
    corpus_ids = [i for i, text in corpus.items() if text and text.strip()]
    corpus_embeddings = np.asarray(embed([corpus[i] for i in corpus_ids], "document"))
    query_embeddings = np.asarray(embed([q.text for q in queries], "query"))
    # The positives take slots of the top k; retrieve enough that k others remain.
    extra = max(len(q.positive_ids) for q in queries)
    neighbours, similarities = search_neighbours(
        query_embeddings, corpus_embeddings, config.top_k + extra, config.index, partitioner)
    items = []
    for query, row, row_similarities in zip(queries, neighbours, similarities):
        # -1: a slot an approximate index could not fill.
        candidates = tuple((corpus_ids[i], float(s)) for i, s in zip(row, row_similarities)
                           if i >= 0 and corpus_ids[i] not in query.positive_ids)[:config.top_k]
        texts = {i: corpus[i] for i in (*(c for c, _ in candidates), *query.positive_ids)
                 if i in corpus}
        items.append(MiningItem(query, candidates, texts,
                                any(p not in corpus for p in query.positive_ids)))
    return items


def mine_one(item: MiningItem, llm, config: MiningConfig, cuts: resumable.KindCounter) -> dict:
    """Steps 2-4 for one query: the LLM's two scores of every candidate, RRF, the choice. The
    output line {query_id, negative_ids, candidates: [{id, similarity, relevance,
    query_log_likelihood, fused_rank}]}."""
    candidates = [c for c, _ in item.candidates]
    passages = []
    for candidate in candidates:
        text = item.texts[candidate]
        if len(text) > config.max_passage_chars:
            cuts.count("passages_cut_for_the_llm",
                       f"passage {candidate!r} has {len(text)} characters; passages longer "
                       f"than {config.max_passage_chars} are cut for the LLM prompts "
                       "(MiningConfig.max_passage_chars)")
            text = text[:config.max_passage_chars]
        passages.append(text)
    if passages:
        relevance = graded_relevance(llm, item.query.text, passages)
        likelihood = query_likelihood(llm, item.query.text, passages)
    else:  # nothing retrieved besides the positives
        relevance = likelihood = np.zeros(0)
    # A candidate the LLM gave no usable score is neither ranked nor ever chosen.
    count_unusable_grades(relevance, cuts, f"query {item.query.query_id!r}")
    scored = np.flatnonzero(~np.isnan(relevance) & ~np.isnan(likelihood)
                            & (likelihood <= 1e-6))
    fused = reciprocal_rank_fusion([relevance[scored], likelihood[scored]], config.rrf_k)
    chosen = choose_negatives([candidates[i] for i in scored], fused, item.query.positive_ids,
                              item.texts, config.min_rank, config.num_negatives)
    fused_rank = dict(zip(scored.tolist(), ranks(fused).tolist()))

    def number(value, digits):
        return round(float(value), digits) if np.isfinite(value) else None

    return {
        "query_id": item.query.query_id, "negative_ids": chosen,
        "candidates": [
            {"id": c, "similarity": round(similarity, 6), "relevance": number(r, 6),
             "query_log_likelihood": number(q, 4), "fused_rank": fused_rank.get(i)}
            for i, ((c, similarity), r, q) in enumerate(zip(item.candidates, relevance,
                                                            likelihood))],
    }


def count_mined(item: MiningItem, record: Mapping) -> dict[str, int]:
    """What one mined query adds to the summary (MINE_COUNTS, without the cuts)."""
    return {"queries_mined": 1, "neighbours_scored": len(record["candidates"]),
            "negatives_chosen": len(record["negative_ids"]),
            "queries_without_a_negative": int(not record["negative_ids"]),
            "queries_with_unknown_positives": int(item.unknown_positives)}


def pending_queries(queries: Sequence[MiningQuery], corpus: Mapping[str, str], done: set[str]
                    ) -> tuple[list[MiningQuery], dict]:
    """The queries not yet done, and the summary's input counts."""
    empty = sum(1 for text in corpus.values() if not (text and text.strip()))
    if empty:
        log.warning("%d empty corpus passages skipped (never retrieved or chosen).", empty)
    todo = [q for q in queries if q.query_id not in done]
    return todo, {"queries": len(queries), "already_done": len(queries) - len(todo),
                  "empty_passages_skipped": empty}


def mine_hard_negatives(queries: Sequence[MiningQuery], corpus: Mapping[str, str],
                        embed: Callable[[Sequence[str], str], np.ndarray], llm,
                        out_path: str | Path, config: MiningConfig = MiningConfig(),
                        partitioner=None) -> dict:
    """Runs the stage (module docstring); returns the summary it also writes.

    embed(texts, role) -> [N, E] embeddings, role 'query' or 'document' (e.g. a gemb
    TextEncoder's encode); llm: anything with log_likelihood(prompts, continuations)
    (gemb.llm: GemmaDecoder in process, or an OpenAI-compatible server).

    In a job of several JAX processes every process calls this with the same arguments (on a
    filesystem they share): the corpus and the queries are embedded by all of them together (a
    TextEncoder splits rows over processes), the neighbours are searched once, and process p
    scores queries p, p + P, ... with its own LLM into its own part file; process 0 then merges
    the parts into `out_path` in query order and writes the summed summary. A crashed job
    rerun skips what the merged output and every part hold."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    process, process_count = _processes()
    own_path = out_path if process_count == 1 else part_path(out_path, process, process_count)
    # Every process reads every part, so all agree on what is left before they embed together
    # (and no process writes before all have embedded).
    done = resumable.done_ids(out_path, key="query_id")
    for other in range(process_count if process_count > 1 else 0):
        done |= resumable.done_ids(part_path(out_path, other, process_count), key="query_id")
    todo, counts = pending_queries(queries, corpus, done)
    mined = dict.fromkeys(MINE_COUNTS, 0)
    if todo:
        items = retrieve_candidates(todo, corpus, embed, config, partitioner)
        mine = items[process::process_count]
        cuts = resumable.KindCounter(log, "LLM input or score")
        with resumable.AppendWriter(own_path) as out, Progress(
                len(mine), "mining hard negatives", unit="query text") as progress:
            for item in mine:
                record = mine_one(item, llm, config, cuts)
                out.write(record)
                for name, value in count_mined(item, record).items():
                    mined[name] += value
                progress.update(1)
        mined["passages_cut_for_the_llm"] = cuts["passages_cut_for_the_llm"]
        mined[GRADE_OUTSIDE_SCALE] = cuts[GRADE_OUTSIDE_SCALE]
    totals = dict(zip(mined, _sum_over_processes(list(mined.values()))))
    summary = {"config": dataclasses.asdict(config), **counts, **totals}
    if process_count > 1:
        summary["processes"] = process_count
        import gemb.distributed as distributed

        distributed.sync_processes(f"mined {out_path}")
        if process == 0:
            _merge_parts(queries, out_path, process_count)
        distributed.sync_processes(f"merged {out_path}")
    if process == 0:
        resumable.write_summary(out_path, summary)
    return summary


def _merge_parts(queries: Sequence[MiningQuery], out_path: Path, process_count: int) -> None:
    """The merged output (what it held, then every part's lines) in query order, written to a
    temporary file and renamed over `out_path`; then the parts are removed."""
    records = {str(r["query_id"]): r for r in resumable.read_records(out_path)}
    parts = [part_path(out_path, p, process_count) for p in range(process_count)]
    for part in parts:
        records.update((str(r["query_id"]), r) for r in resumable.read_records(part))
    order = {q.query_id: i for i, q in enumerate(queries)}
    merged = out_path.with_name(out_path.name + ".merging")
    with merged.open("w", encoding="utf-8") as handle:
        for query_id in sorted(records, key=lambda q: (order.get(q, len(order)), q)):
            handle.write(json.dumps(records[query_id]) + "\n")
    os.replace(merged, out_path)
    for part in parts:
        part.unlink(missing_ok=True)


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


def restrict_corpus(queries: Sequence[MiningQuery], corpus: Mapping[str, str],
                    exclude_ids: set[str] = frozenset(), size: int | None = None, seed: int = 0
                    ) -> dict[str, str]:
    """The corpus to mine from: without `exclude_ids` (e.g. the evaluation split's relevant
    documents, so that they never become training negatives), and, with `size`, cut to the
    queries' positives plus random other documents (seeded) up to `size`: a reduced run that
    still retrieves among distractors (CPU trials)."""
    positives = {p for q in queries for p in q.positive_ids if p in corpus}
    others = sorted(d for d in corpus if d not in positives and d not in exclude_ids)
    if size is not None:
        if size < len(positives):
            raise ValueError(f"corpus_size={size} is smaller than the {len(positives)} positives "
                             "of the queries mined; raise it or mine fewer queries.")
        picked = np.random.default_rng(seed).permutation(len(others))[:size - len(positives)]
        others = [others[i] for i in sorted(picked)]
    keep = positives | set(others)
    return {d: text for d, text in corpus.items() if d in keep}


def relevant_ids(folder: str, split: str) -> set[str]:
    """The documents relevant (score > 0) to some query of a BEIR folder's qrels/{split}.tsv."""
    from gemb.data import sources

    return {raw.value["corpus-id"] for raw in sources.read_tsv(f"{folder.rstrip('/')}/qrels/{split}.tsv")
            if float(raw.value.get("score", 0) or 0) > 0}


def build_parser():
    import argparse

    from gemb.llm.interface import add_llm_argument

    parser = argparse.ArgumentParser(
        prog="gemb data mine-negatives",
        description="Hard negatives for a BEIR folder's queries: retrieve with a gemb model, "
                    "score with an LLM (graded relevance + query likelihood), fuse with RRF, "
                    "keep the lowest-ranked. Resumable; writes JSONL for read_beir's "
                    "hard_negatives_path and summary.json beside it. Several JAX processes "
                    "(a multi-host launch) share the work; --out must then be on a shared "
                    "filesystem.")
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
    parser.add_argument("--index", choices=RETRIEVAL_INDEXES, default="exact",
                        help="exact (sharded matmul) or a FAISS index for large corpora")
    parser.add_argument("--max_queries", type=int)
    parser.add_argument("--exclude_split", action="append", default=[],
                        help="a qrels split (e.g. test) whose relevant documents are left out of "
                             "the corpus, so they never become training negatives (repeatable)")
    parser.add_argument("--corpus_size", type=int,
                        help="mine among the queries' positives plus random other documents "
                             "up to this many (a reduced run; default: the whole corpus)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --corpus_size's sample")
    parser.add_argument("--max_length", type=int, default=256,
                        help="tokens per text for the embedder")
    return parser


def config_from_args(args) -> MiningConfig:
    return MiningConfig(args.top_k, args.min_rank, args.num_negatives,
                        max_passage_chars=args.max_passage_chars, index=args.index)


def inputs_from_args(args):
    """(queries, corpus, embed, partitioner) of the command line: the BEIR folder's training
    queries, the corpus (--exclude_split, --corpus_size), the embedder's encode and a
    Partitioner over every device when there are several."""
    import jax

    from gemb.embed import load_encoder
    from gemb.partitioning import mesh
    from gemb.partitioning.partitioner import Partitioner

    queries, corpus = read_beir_queries(args.beir, args.split, args.max_queries)
    if args.exclude_split or args.corpus_size:
        excluded = set().union(*(relevant_ids(args.beir, split) for split in args.exclude_split))
        corpus = restrict_corpus(queries, corpus, excluded, args.corpus_size, args.seed)
        log.info("mining among %d documents (%d relevant to %s left out)", len(corpus),
                 len(excluded), args.exclude_split or "no split")
    encoder = load_encoder(args.embedder, max_length=args.max_length)
    partitioner = Partitioner(mesh.create_mesh()) if jax.device_count() > 1 else None
    return queries, corpus, lambda texts, role: encoder.encode(texts, role=role), partitioner


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from gemb import distributed

    try:
        # Under a multi-process launcher every process joins the job (see mine_hard_negatives).
        distributed.initialize()
    except distributed.DistributedSetupError as error:
        print(f"gemb data mine-negatives: error: {error}", file=sys.stderr)
        return 2
    from gemb.llm.interface import llm_from_args

    queries, corpus, embed, partitioner = inputs_from_args(args)
    summary = mine_hard_negatives(queries, corpus, embed, llm_from_args(args), args.out,
                                  config_from_args(args), partitioner=partitioner)
    if distributed.is_chief():
        print(json.dumps(summary), flush=True)
    return 0
