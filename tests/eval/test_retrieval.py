"""Retrieval metrics against hand-computed values and (when installed) pytrec_eval."""

import json
import math
import random

import numpy as np
import pytest

from gemb.eval import retrieval

LOG2_3 = math.log2(3)


def test_ties_are_broken_by_document_id_descending():
    assert retrieval.rank_documents({"d1": 0.5, "d3": 0.5, "d2": 0.9, "d10": 0.5}) == \
        ["d2", "d3", "d10", "d1"]
    # Three documents tie; trec_eval orders them d3, d2, d1, so the relevant d1 is at rank 3.
    scores = retrieval.retrieval_scores({"q": {"d1": 0.5, "d2": 0.5, "d3": 0.5}},
                                        {"q": {"d1": 1}}, k_values=(1, 3))
    assert scores["ndcg_at_1"] == 0.0
    assert scores["ndcg_at_3"] == pytest.approx(1 / 2)  # 1 / log2(3 + 1)
    assert scores["mrr_at_3"] == pytest.approx(1 / 3)
    assert scores["map_at_3"] == pytest.approx(round(1 / 3, 5))


def test_graded_relevance_uses_linear_gains():
    # Ranking: d4 (rel 1), d1 (not judged), d3 (rel 2).
    scores = retrieval.retrieval_scores({"q": {"d4": 0.9, "d1": 0.5, "d3": 0.1}},
                                        {"q": {"d3": 2, "d4": 1}}, k_values=(1, 3))
    dcg3 = 1 / 1 + 2 / 2  # rel / log2(rank + 1)
    idcg3 = 2 / 1 + 1 / LOG2_3
    assert scores["ndcg_at_3"] == pytest.approx(round(dcg3 / idcg3, 5))
    assert scores["ndcg_at_1"] == pytest.approx(0.5)  # 1 / 2
    assert scores["map_at_3"] == pytest.approx(round((1 / 1 + 2 / 3) / 2, 5))
    assert scores["recall_at_1"] == pytest.approx(0.5)
    assert scores["precision_at_3"] == pytest.approx(round(2 / 3, 5))


def test_query_without_relevant_documents_counts_as_zero_and_query_without_qrels_is_skipped():
    results = {"q1": {"d1": 0.9}, "q2": {"d1": 0.9}, "q3": {"d1": 0.9}}
    qrels = {"q1": {"d1": 1}, "q2": {"d1": 0}}  # q2: judged, nothing relevant; q3: no qrels
    scores = retrieval.retrieval_scores(results, qrels, k_values=(10,))
    assert scores["num_queries"] == 2
    assert scores["ndcg_at_10"] == pytest.approx(0.5)
    assert scores["recall_at_10"] == pytest.approx(0.5)
    assert scores["mrr_at_10"] == pytest.approx(0.5)


def test_relevant_documents_missing_from_the_ranking_lower_the_ideal():
    # "dX" is relevant but was never retrieved (e.g. not in the corpus): it stays in the ideal.
    scores = retrieval.retrieval_scores({"q": {"d1": 0.9}}, {"q": {"d1": 1, "dX": 1}},
                                        k_values=(10,))
    assert scores["ndcg_at_10"] == pytest.approx(round(1 / (1 + 1 / LOG2_3), 5))
    assert scores["recall_at_10"] == pytest.approx(0.5)
    assert scores["map_at_10"] == pytest.approx(0.5)


def test_negative_relevance_gives_no_gain():
    scores = retrieval.retrieval_scores({"q": {"d1": 0.9, "d2": 0.8}}, {"q": {"d1": -1, "d2": 1}},
                                        k_values=(3,))
    assert scores["ndcg_at_3"] == pytest.approx(round(1 / LOG2_3, 5))


def test_ignore_identical_ids_drops_the_query_itself():
    results = {"q1": {"q1": 0.99, "d1": 0.5}}
    qrels = {"q1": {"d1": 1}}
    assert retrieval.retrieval_scores(results, qrels, (1,))["ndcg_at_1"] == 0.0
    assert retrieval.retrieval_scores(results, qrels, (1,),
                                      ignore_identical_ids=True)["ndcg_at_1"] == 1.0


def test_no_scorable_query_is_an_error():
    with pytest.raises(ValueError, match="no query has both"):
        retrieval.retrieval_scores({"a": {"d": 1.0}}, {"b": {"d": 1}})


def test_matches_pytrec_eval_on_random_runs():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = random.Random(0)
    k_values = (1, 3, 5, 10)
    for _ in range(10):
        docs = [f"d{i}" for i in range(30)]
        qrels, run = {}, {}
        for q in range(12):
            judged = rng.sample(docs + ["missing1", "missing2"], rng.randint(1, 6))
            qrels[f"q{q}"] = {d: rng.choice([-1, 0, 1, 2, 3]) for d in judged}
            # Scores rounded to one decimal: many ties.
            run[f"q{q}"] = {d: round(rng.random(), 1) for d in rng.sample(docs, rng.randint(0, 20))}
        measures = {f"{m}.{','.join(map(str, k_values))}"
                    for m in ("ndcg_cut", "map_cut", "recall", "P", "success")}
        reference = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
        ours = retrieval.retrieval_scores(run, qrels, k_values)
        for k in k_values:
            for theirs, mine in (("ndcg_cut", "ndcg_at"), ("map_cut", "map_at"),
                                 ("recall", "recall_at"), ("P", "precision_at"),
                                 ("success", "hit_rate_at")):
                expected = round(np.mean([v[f"{theirs}_{k}"] for v in reference.values()]), 5)
                assert ours[f"{mine}_{k}"] == pytest.approx(expected, abs=1e-12), (theirs, k)


def test_search_top_k_is_exact_and_sorted():
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(7, 16)).astype(np.float32)
    docs = rng.normal(size=(50, 16)).astype(np.float32)
    for max_chunk in (50, 1 << 20):  # several query blocks, and one
        indices, scores = retrieval.search_top_k(queries, docs, top_k=5,
                                                 max_chunk_elements=max_chunk)
        full = retrieval.normalize_rows(queries) @ retrieval.normalize_rows(docs).T
        np.testing.assert_array_equal(indices, np.argsort(-full, axis=1)[:, :5])
        np.testing.assert_allclose(scores, np.sort(full, axis=1)[:, ::-1][:, :5], rtol=1e-6)
    indices, _ = retrieval.search_top_k(queries, docs[:3], top_k=1000)
    assert indices.shape == (7, 3)


def _write_beir(folder, corpus, queries, qrels, split="test"):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as handle:
        for record in corpus:
            handle.write(json.dumps(record) + "\n")
    with open(folder / "queries.jsonl", "w") as handle:
        for record in queries:
            handle.write(json.dumps(record) + "\n")
    (folder / "qrels").mkdir(exist_ok=True)
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in qrels]
    (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def test_load_beir_and_evaluate(tmp_path, hashing_encoder):
    folder = _write_beir(
        tmp_path / "toy",
        [{"_id": "d1", "title": "Cats", "text": "cats purr"}, {"_id": 2, "text": " dogs bark "},
         {"_id": "d3", "title": "", "text": "birds sing"}],
        [{"_id": "q1", "text": "cats"}, {"_id": "q2", "text": "dogs"},
         {"_id": "q3", "text": "unjudged query"}],
        [("q1", "d1", 1), ("q2", "2", 1)])
    data = retrieval.load_beir(folder)
    assert data.corpus_texts == ["Cats cats purr", "dogs bark", "birds sing"]
    assert data.corpus_ids == ["d1", "2", "d3"]
    assert set(data.queries) == {"q1", "q2"}  # q3 has no qrels: not evaluated
    scores = retrieval.evaluate_retrieval(hashing_encoder, data)
    assert scores["num_queries"] == 2 and scores["main_score"] == scores["ndcg_at_10"]
    assert 0 < scores["main_score"] <= 1
    roles = {role for _, role in hashing_encoder.calls}
    assert roles == {"query", "document"}


def test_load_beir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        retrieval.load_beir(tmp_path / "nowhere")
    folder = _write_beir(tmp_path / "a", [{"_id": "d1", "text": "x"}], [{"_id": "q", "text": "y"}],
                         [("q", "d1", 1), ("q", "ghost", 1)])
    with pytest.raises(ValueError, match=r"1 document\(s\) that are not in corpus.jsonl.*ghost"):
        retrieval.load_beir(folder)
    data = retrieval.load_beir(folder, missing_docs="count")
    assert data.qrels["q"] == {"d1": 1, "ghost": 1} and data.notes
    with pytest.raises(FileNotFoundError, match="qrels for split 'dev'"):
        retrieval.load_beir(folder, split="dev")
    empty = _write_beir(tmp_path / "b", [], [{"_id": "q", "text": "y"}], [("q", "d1", 1)])
    with pytest.raises(ValueError, match="corpus is empty"):
        retrieval.load_beir(empty)
    duplicated = _write_beir(tmp_path / "c", [{"_id": "d1", "text": "x"}, {"_id": "d1", "text": "z"}],
                             [{"_id": "q", "text": "y"}], [("q", "d1", 1)])
    with pytest.raises(ValueError, match="appears twice"):
        retrieval.load_beir(duplicated)
    no_queries = _write_beir(tmp_path / "d", [{"_id": "d1", "text": "x"}],
                             [{"_id": "other", "text": "y"}], [("q", "d1", 1)])
    with pytest.raises(ValueError, match="no query has qrels"):
        retrieval.load_beir(no_queries)
    (tmp_path / "e").mkdir()
    with pytest.raises(FileNotFoundError, match="no corpus file"):
        retrieval.load_beir(tmp_path / "e")
