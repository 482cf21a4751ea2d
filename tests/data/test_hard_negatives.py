"""Hard-negative mining: RRF and the lowest-rank choice against hand-computed values, positives
(and their copies) never chosen, exact retrieval (sharded too), and a crash-resumable stage."""

import json

import numpy as np
import pytest

from gemb.data import hard_negatives as mining


def test_rrf_and_lowest_rank_choice_by_hand():
    ids = ["a", "b", "c", "d", "e"]
    relevance = np.array([3.0, 1.0, 2.0, 0.5, 2.5])          # ranks a1 e2 c3 b4 d5
    likelihood = np.array([-10.0, -30.0, -5.0, -20.0, -25.0])  # ranks c1 a2 d3 e4 b5
    fused = mining.reciprocal_rank_fusion([relevance, likelihood], k=60)
    by_hand = [1 / 61 + 1 / 62, 1 / 64 + 1 / 65, 1 / 63 + 1 / 61, 1 / 65 + 1 / 63,
               1 / 62 + 1 / 64]
    np.testing.assert_allclose(fused, by_hand, rtol=1e-12)
    # Fused order: a, c, e, d, b. The lowest-ranked is b, then d.
    texts = {i: f"text {i}" for i in ids}
    assert mining.choose_negatives(ids, fused, (), texts, min_rank=0, count=1) == ["b"]
    assert mining.choose_negatives(ids, fused, (), texts, min_rank=1, count=2) == ["b", "d"]
    # Only a, c, e, d, b exist: with min_rank=3 only d and b are eligible.
    assert mining.choose_negatives(ids, fused, (), texts, min_rank=3, count=5) == ["b", "d"]


def test_a_positive_or_a_copy_of_it_is_never_chosen():
    ids = ["pos", "x", "copy_of_pos", "y"]
    texts = {"pos": "def add(a, b):\n    return a + b", "x": "def sub(a, b): return a - b",
             "copy_of_pos": "def add(a, b):    return a + b  ", "y": "print(1)"}
    fused = np.array([0.1, 0.3, 0.0, 0.2])  # the copy of the positive is the lowest-ranked
    assert mining.choose_negatives(ids, fused, ("pos",), texts, 0, 1) == ["y"]
    assert mining.choose_negatives(ids, fused, ("pos",), texts, 0, 4) == ["y", "x"]


@pytest.mark.parametrize("sharded", [False, True], ids=["one_device", "eight_devices"])
def test_nearest_neighbours_are_exact(sharded):
    rng = np.random.default_rng(0)
    # 203 rows: not a multiple of the 8 devices (the padding rows must never be found).
    queries, corpus = rng.normal(size=(37, 16)), rng.normal(size=(203, 16))
    partitioner = None
    if sharded:
        from gemb.partitioning import mesh, partitioner as partitioner_lib

        partitioner = partitioner_lib.Partitioner(mesh.create_mesh((8, 1, 1)))
    index, scores = mining.nearest_neighbours(queries, corpus, 5, partitioner, block=16)
    want = np.argsort(-(queries @ corpus.T), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(index, want)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ corpus.T, want, 1),
                               rtol=1e-5)


class WordOverlapLLM:
    """A deterministic stand-in for an LLM's log-likelihoods (the stage's bookkeeping is under
    test here; the real decoder's scores are tested in tests/llm): the continuation is more
    likely the more of its words the prompt contains. Fails after `fail_after` calls."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def log_likelihood(self, prompts, continuations):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        return np.array([len(set(p.split()) & set(c.split())) - len(c.split())
                         for p, c in zip(prompts, continuations)], np.float64)

    def generate(self, prompts, sampling=None):
        raise AssertionError("mining only scores; it never generates")


def _bag_of_words_embed(texts, role):
    del role
    vocabulary = [f"w{i}" for i in range(12)]
    vectors = np.array([[t.split().count(w) for w in vocabulary] for t in texts], np.float64)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)


def _corpus_and_queries():
    rng = np.random.default_rng(1)
    corpus = {f"d{i}": " ".join(f"w{j}" for j in rng.integers(0, 12, 6)) for i in range(40)}
    corpus["empty"] = "   "
    corpus["d_copy"] = corpus["d0"] + "  "
    queries = [mining.MiningQuery(f"q{i}", " ".join(corpus[f"d{i}"].split()[:3]), (f"d{i}",))
               for i in range(8)]
    return corpus, queries


def test_stage_writes_readable_negatives_and_resumes_after_a_crash(tmp_path):
    corpus, queries = _corpus_and_queries()
    config = mining.MiningConfig(top_k=6, min_rank=2, num_negatives=2)
    whole = mining.mine_hard_negatives(queries, corpus, _bag_of_words_embed, WordOverlapLLM(),
                                       tmp_path / "whole" / "negatives.jsonl", config)
    assert whole["queries_mined"] == 8 and whole["neighbours_scored"] == 8 * 6
    assert whole["negatives_chosen"] == 16 and whole["empty_passages_skipped"] == 1
    lines = [json.loads(l) for l in (tmp_path / "whole" / "negatives.jsonl").open()]
    for line, query in zip(lines, queries):
        assert set(line["negative_ids"]).isdisjoint({"d0", "d_copy"} if query.query_id == "q0"
                                                    else set(query.positive_ids))
        assert "empty" not in line["negative_ids"]
        fused_rank = {c["id"]: c["fused_rank"] for c in line["candidates"]}
        # The chosen ones are the lowest fused ranks among the eligible candidates.
        assert all(fused_rank[n] > 2 for n in line["negative_ids"])
    assert json.loads((tmp_path / "whole" / "summary.json").read_text())["queries_mined"] == 8

    # Crash after 3 queries (2 LLM calls each), then rerun: nothing repeated, the same result.
    out = tmp_path / "resumed" / "negatives.jsonl"
    with pytest.raises(RuntimeError, match="simulated crash"):
        mining.mine_hard_negatives(queries, corpus, _bag_of_words_embed,
                                   WordOverlapLLM(fail_after=6), out, config)
    assert len(out.read_text().splitlines()) == 3
    llm = WordOverlapLLM()
    summary = mining.mine_hard_negatives(queries, corpus, _bag_of_words_embed, llm, out, config)
    assert summary["already_done"] == 3 and summary["queries_mined"] == 5 and llm.calls == 10
    assert out.read_text() == (tmp_path / "whole" / "negatives.jsonl").read_text()


def test_stage_output_feeds_read_beir(tmp_path):
    from gemb.data import sources

    corpus, queries = _corpus_and_queries()
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    with (folder / "corpus.jsonl").open("w") as f:
        for doc_id, text in corpus.items():
            f.write(json.dumps({"_id": doc_id, "text": text}) + "\n")
    with (folder / "queries.jsonl").open("w") as f:
        for q in queries:
            f.write(json.dumps({"_id": q.query_id, "text": q.text}) + "\n")
    (folder / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q.query_id}\t{q.positive_ids[0]}\t1\n"
                                                 for q in queries))
    out = tmp_path / "mined" / "negatives.jsonl"
    mining.mine_hard_negatives(queries, corpus, _bag_of_words_embed, WordOverlapLLM(), out,
                               mining.MiningConfig(top_k=5, min_rank=1, num_negatives=1))
    records = [r.value for r in sources.read_beir(str(folder), "train",
                                                   hard_negatives_path=str(out))]
    chosen = {json.loads(l)["query_id"]: json.loads(l)["negative_ids"] for l in out.open()}
    assert len(records) == 8
    for record in records:
        assert record["negatives"] == [corpus[i] for i in chosen[record["query_id"]]]


def _clustered(rng, size, dim=32, clusters=20):
    centres = rng.normal(size=(clusters, dim))
    points = centres[rng.integers(0, clusters, size)] + 0.3 * rng.normal(size=(size, dim))
    return points / np.linalg.norm(points, axis=1, keepdims=True)


@pytest.mark.parametrize("index", ["faiss_hnsw", "faiss_ivf"])
def test_faiss_indexes_find_the_exact_neighbours(index):
    rng = np.random.default_rng(0)
    corpus, queries = _clustered(rng, 3000), _clustered(rng, 100)
    exact, _ = mining.nearest_neighbours(queries, corpus, 10)
    approx, scores = mining.ann_neighbours(queries, corpus, 10, index)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.9, recall
    # Scores are the inner products of what was found, best first.
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, corpus[approx]),
                               rtol=1e-4, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_an_unfilled_ivf_slot_is_never_a_candidate(tmp_path):
    rng = np.random.default_rng(0)
    corpus = _clustered(rng, 200)
    # 50 lists, one probed: a list holds ~4 points, fewer than k = 20.
    index, scores = mining.ann_neighbours(corpus[:5], corpus, 20, "faiss_ivf", ivf_lists=50,
                                          ivf_probes=1)
    assert (index < 0).any() and np.all(np.isneginf(scores[index < 0]))

    # Through the stage: the -1 slots are dropped, not read as the corpus' last passage.
    corpus_texts, queries = _corpus_and_queries()
    summary = mining.mine_hard_negatives(
        queries, corpus_texts, _bag_of_words_embed, WordOverlapLLM(), tmp_path / "n.jsonl",
        mining.MiningConfig(top_k=6, min_rank=1, index="faiss_hnsw"))
    exact = mining.mine_hard_negatives(
        queries, corpus_texts, _bag_of_words_embed, WordOverlapLLM(), tmp_path / "e.jsonl",
        mining.MiningConfig(top_k=6, min_rank=1))
    assert summary["negatives_chosen"] == exact["negatives_chosen"] == 8


def test_restrict_corpus_keeps_positives_and_leaves_out_excluded_documents():
    corpus = {f"d{i}": f"text {i}" for i in range(100)}
    queries = [mining.MiningQuery("q1", "a", ("d1", "d2")), mining.MiningQuery("q2", "b", ("d3",))]
    excluded = {f"d{i}" for i in range(50, 100)} | {"d2"}
    reduced = mining.restrict_corpus(queries, corpus, excluded, size=20, seed=0)
    assert len(reduced) == 20 and {"d1", "d2", "d3"} <= set(reduced)  # a positive stays
    assert not (set(reduced) - {"d2"}) & excluded
    assert reduced == mining.restrict_corpus(queries, corpus, excluded, size=20, seed=0)
    assert set(mining.restrict_corpus(queries, corpus, excluded)) == set(corpus) - excluded | {"d2"}
    with pytest.raises(ValueError, match="smaller than the 3 positives"):
        mining.restrict_corpus(queries, corpus, size=2)
    with pytest.raises(ValueError, match="unknown index"):
        mining.MiningConfig(index="annoy")
