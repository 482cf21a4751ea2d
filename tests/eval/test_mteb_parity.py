"""gemb's evaluators against mteb's own, through the adapter, on local tasks (no network).

Each test builds an mteb task whose load_data returns data already in memory, runs it with
mteb.evaluate on GembMtebEncoder, runs gemb's evaluator on the same data with the same encoder,
and compares the scores. A fast hashing encoder keeps these quick; the slow test repeats the
STSBenchmark comparison with the real all-MiniLM-L6-v2.
"""

import csv
import gzip

import numpy as np
import pytest

mteb = pytest.importorskip("mteb")
datasets = pytest.importorskip("datasets")

from datasets import Dataset, DatasetDict  # noqa: E402
from mteb.abstasks import (  # noqa: E402
    AbsTaskBitextMining,
    AbsTaskClassification,
    AbsTaskClustering,
    AbsTaskClusteringLegacy,
    AbsTaskPairClassification,
    AbsTaskRetrieval,
    AbsTaskSTS,
    AbsTaskSummarization,
)
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402

from gemb.eval import (  # noqa: E402
    bitext,
    classification,
    clustering,
    mteb_adapter,
    pair_classification,
    reranking,
    retrieval,
    sts,
    summarization,
    tasks,
)

METADATA = dict(
    description="A local task for parity tests.", reference="https://example.com",
    dataset={"path": "NA", "revision": "NA"}, category="t2t", eval_splits=["test"],
    eval_langs=["eng-Latn"], date=("2020-01-01", "2020-01-01"), dialect=[], domains=[],
    task_subtypes=[], license="cc-by-4.0", annotations_creators="derived", modalities=["text"],
    sample_creation="found", bibtex_citation="")


def local_task(base, task_type, main_score, dataset, **attributes):
    """An instance of a subclass of `base` whose load_data hands mteb `dataset`."""

    def load_data(self, num_proc=None, **kwargs):
        self.dataset = dataset
        self.data_loaded = True

    name = f"Local{task_type}{len(attributes)}"
    cls = type(name, (base,), {
        "metadata": TaskMetadata(type=task_type, name=name, main_score=main_score, **METADATA),
        "load_data": load_data, **attributes})
    return cls()


def mteb_scores(encoder, task):
    result = mteb.evaluate(mteb_adapter.GembMtebEncoder(encoder), task, cache=None,
                           co2_tracker=False, show_progress_bar=False)
    (task_result,) = result.task_results
    (scores,) = task_result.scores["test"]
    return scores


def test_adapter_passes_roles_and_meta(hashing_encoder):
    seen = []

    def encode(texts, role, task=None):
        seen.append((role, task))
        return hashing_encoder.encode(texts, role)

    adapter = mteb_adapter.GembMtebEncoder(encode)
    assert adapter.mteb_model_meta.name.startswith("gemb/")
    task = local_task(AbsTaskSTS, "STS", "cosine_spearman", DatasetDict({"test": Dataset.from_dict(
        {"sentence1": ["a b", "c d", "e"], "sentence2": ["a", "d", "f"], "score": [1, 2, 0]})}),
        min_score=0, max_score=5)
    mteb_scores(encode, task)
    assert set(seen) == {("query", "sentence_similarity")}


@pytest.mark.needs_shared
def test_sts_equals_mteb_on_stsbenchmark(shared_data, hashing_encoder):
    data = tasks.load_stsbenchmark()
    task = local_task(AbsTaskSTS, "STS", "cosine_spearman", DatasetDict({"test": Dataset.from_dict(
        {"sentence1": data.sentences1, "sentence2": data.sentences2, "score": data.scores})}),
        min_score=0, max_score=5)
    theirs = mteb_scores(hashing_encoder, task)
    ours = sts.evaluate_sts(hashing_encoder, data)
    for name in ("cosine_spearman", "cosine_pearson", "manhattan_spearman", "euclidean_pearson"):
        assert ours[name] == pytest.approx(theirs[name], abs=1e-6), name
    assert abs(ours["main_score"] - theirs["main_score"]) < 1e-4


@pytest.mark.slow  # about 20 s on 2 busy cores: 3 x 2 logistic regressions over 77 labels
@pytest.mark.needs_shared
def test_classification_equals_mteb_on_banking77(shared_data, hashing_encoder):
    data = tasks.load_banking77()
    names = sorted(set(data.train_labels))  # mteb's datasets hold integer labels
    as_int = {name: i for i, name in enumerate(names)}
    task = local_task(AbsTaskClassification, "Classification", "accuracy", DatasetDict({
        "train": Dataset.from_dict({"text": data.train_texts,
                                    "label": [as_int[y] for y in data.train_labels]}),
        "test": Dataset.from_dict({"text": data.test_texts,
                                   "label": [as_int[y] for y in data.test_labels]})}),
        n_experiments=3)  # fewer than MTEB's 10 to keep the test short; the sampling is the same
    theirs = mteb_scores(hashing_encoder, task)
    ours = classification.evaluate_classification(hashing_encoder, data, n_experiments=3)
    for name in ("accuracy", "f1", "f1_weighted"):
        assert ours[name] == pytest.approx(theirs[name], abs=1e-9), name


def _mteb_retrieval_task(corpus_ids, corpus_texts, queries, qrels, top_ranked=None,
                         task_type="Retrieval", main_score="ndcg_at_10", **attributes):
    split = RetrievalSplitData(
        corpus=Dataset.from_dict({"id": corpus_ids, "text": corpus_texts,
                                  "title": [""] * len(corpus_ids)}),
        queries=Dataset.from_dict({"id": list(queries), "text": list(queries.values())}),
        relevant_docs=qrels, top_ranked=top_ranked)
    return local_task(AbsTaskRetrieval, task_type, main_score, {"default": {"test": split}},
                      **attributes)


RETRIEVAL_METRICS = ("ndcg_at_1", "ndcg_at_10", "map_at_10", "map_at_1000", "recall_at_10",
                     "precision_at_3", "mrr_at_10", "hit_rate_at_5")


def test_retrieval_equals_mteb_on_tricky_cases(hashing_encoder):
    # Duplicate documents (exact ties, broken by id), graded relevance, a query whose qrels are
    # all 0, a relevant document missing from the corpus, a query without qrels.
    corpus_ids = ["d01", "d02", "d03", "d04", "d05", "d06", "d07", "d08"]
    corpus_texts = ["red apples and pears", "red apples and pears", "fast cars", "slow cars",
                    "apple pie recipe", "car engines", "fruit salad", "red apples and pears"]
    queries = {"q1": "red apples", "q2": "cars", "q3": "apple recipe", "q4": "engines",
               "q5": "nothing judged"}
    qrels = {"q1": {"d02": 2, "d01": 1, "d08": 1}, "q2": {"d03": 1, "d04": 2, "d99": 1},
             "q3": {"d05": 0, "d07": 0}, "q4": {"d06": 3}}
    theirs = mteb_scores(hashing_encoder, _mteb_retrieval_task(corpus_ids, corpus_texts, queries,
                                                               qrels))
    data = retrieval.RetrievalData(corpus_ids, corpus_texts,
                                   {q: t for q, t in queries.items() if q in qrels}, qrels)
    ours = retrieval.evaluate_retrieval(hashing_encoder, data)
    for name in RETRIEVAL_METRICS:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-9), name


@pytest.mark.needs_shared
def test_retrieval_equals_mteb_on_cosqa(shared_data, hashing_encoder):
    data = tasks.load_cosqa()
    theirs = mteb_scores(hashing_encoder, _mteb_retrieval_task(
        data.corpus_ids, data.corpus_texts, data.queries, data.qrels))
    ours = retrieval.evaluate_retrieval(hashing_encoder, data)
    for name in RETRIEVAL_METRICS:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-9), name


def test_ignore_identical_ids_equals_mteb(hashing_encoder):
    corpus_ids = ["a", "b", "c"]
    corpus_texts = ["apples", "apples and pears", "cars"]
    queries = {"a": "apples", "c": "cars and apples"}
    qrels = {"a": {"b": 1}, "c": {"b": 1}}
    theirs = mteb_scores(hashing_encoder, _mteb_retrieval_task(
        corpus_ids, corpus_texts, queries, qrels, ignore_identical_ids=True))
    ours = retrieval.evaluate_retrieval(hashing_encoder, retrieval.RetrievalData(
        corpus_ids, corpus_texts, queries, qrels), ignore_identical_ids=True)
    for name in RETRIEVAL_METRICS:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-9), name


def test_reranking_equals_mteb(hashing_encoder):
    examples = [
        reranking.RerankingExample("red apples", ["apples red", "apple pie"],
                                   ["cars", "red cars", "pears"]),
        reranking.RerankingExample("fast cars", ["car racing"], ["slow car", "apples", "cats"]),
        reranking.RerankingExample("cats", ["dogs and cats", "a cat"], ["fish", "birds sing"]),
    ]
    corpus_ids, corpus_texts, queries, qrels, top_ranked = [], [], {}, {}, {}
    for q, example in enumerate(examples):
        queries[f"q{q}"] = example.query
        candidates = [(t, 1) for t in example.positives] + [(t, 0) for t in example.negatives]
        qrels[f"q{q}"], top_ranked[f"q{q}"] = {}, []
        for c, (text, relevance) in enumerate(candidates):
            doc_id = f"q{q}-{c:06d}"
            corpus_ids.append(doc_id)
            corpus_texts.append(text)
            qrels[f"q{q}"][doc_id] = relevance
            top_ranked[f"q{q}"].append(doc_id)
    theirs = mteb_scores(hashing_encoder, _mteb_retrieval_task(
        corpus_ids, corpus_texts, queries, qrels, top_ranked=top_ranked, task_type="Reranking",
        main_score="map_at_1000"))
    ours = reranking.evaluate_reranking(hashing_encoder, reranking.RerankingData(examples))
    for name in ("map_at_1000", "mrr_at_10", "ndcg_at_10"):
        assert ours[name] == pytest.approx(theirs[name], abs=1e-9), name


def _snli_pairs(shared_data, limit=1500):
    with gzip.open(shared_data / "snli_triplets" / "snli_dev_test_pairs.tsv.gz", "rt",
                   encoding="utf-8") as handle:
        rows = [line.rstrip("\n").split("\t") for line in handle][1:]
    rows = [r for r in rows if r[3] in ("entailment", "contradiction")][:limit]
    return pair_classification.PairData([r[1] for r in rows], [r[2] for r in rows],
                                        [int(r[3] == "entailment") for r in rows])


@pytest.mark.needs_shared
def test_pair_classification_equals_mteb(shared_data, hashing_encoder):
    data = _snli_pairs(shared_data)
    task = local_task(AbsTaskPairClassification, "PairClassification", "max_ap",
                      DatasetDict({"test": Dataset.from_dict({
                          "sentence1": data.sentences1, "sentence2": data.sentences2,
                          "labels": data.labels})}))
    theirs = mteb_scores(hashing_encoder, task)
    ours = pair_classification.evaluate_pair_classification(hashing_encoder, data)
    for name in ("max_ap", "cosine_ap", "cosine_accuracy", "cosine_f1", "manhattan_ap",
                 "euclidean_f1", "dot_ap", "max_accuracy"):
        assert ours[name] == pytest.approx(theirs[name], abs=1e-9), name


@pytest.mark.needs_shared
def test_clustering_legacy_and_fast_equal_mteb(shared_data, hashing_encoder):
    banking = tasks.load_banking77()
    kept = sorted(set(banking.test_labels))[:8]  # 8 intents, 40 texts each
    rows = [i for i, label in enumerate(banking.test_labels) if label in kept]
    texts = [banking.test_texts[i] for i in rows]
    labels = [banking.test_labels[i] for i in rows]
    half = len(texts) // 2
    sets = [0] * half + [1] * (len(texts) - half)
    legacy = local_task(AbsTaskClusteringLegacy, "Clustering", "v_measure", DatasetDict({
        "test": Dataset.from_dict({"sentences": [texts[:half], texts[half:]],
                                   "labels": [labels[:half], labels[half:]]})}))
    theirs = mteb_scores(hashing_encoder, legacy)
    ours = clustering.evaluate_clustering(hashing_encoder,
                                          clustering.ClusteringData(texts, labels, sets))
    assert ours["v_measure"] == pytest.approx(theirs["v_measure"], abs=1e-9)

    fast = local_task(AbsTaskClustering, "Clustering", "v_measure", DatasetDict({
        "test": Dataset.from_dict({"sentences": texts, "labels": labels})}),
        max_fraction_of_documents_to_embed=None, max_documents_per_cluster=256, n_clusters=3)
    theirs = mteb_scores(hashing_encoder, fast)
    ours = clustering.evaluate_clustering(hashing_encoder, clustering.ClusteringData(texts, labels),
                                          protocol="fast", fast_experiments=3,
                                          fast_sample_size=256)
    assert ours["v_measure"] == pytest.approx(theirs["v_measure"], abs=1e-9)


@pytest.mark.needs_shared
def test_bitext_equals_mteb(shared_data, hashing_encoder):
    with open(shared_data / "stsb_multi_mt" / "stsb-de-test.csv", newline="",
              encoding="utf-8") as handle:
        german = [row[0] for row in csv.reader(handle)][:400]
    english = tasks.load_stsbenchmark().sentences1[:400]
    task = local_task(AbsTaskBitextMining, "BitextMining", "f1", DatasetDict({
        "test": Dataset.from_dict({"sentence1": english, "sentence2": german})}))
    theirs = mteb_scores(hashing_encoder, task)
    ours = bitext.evaluate_bitext(hashing_encoder, bitext.BitextData(english, german))
    for name in ("f1", "precision", "recall", "accuracy"):
        assert ours[name] == pytest.approx(theirs[name], abs=1e-9), name


def test_summarization_equals_mteb(hashing_encoder):
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat dog ran far away quick brown fox jumps over lazy".split()
    examples = []
    for _ in range(12):
        def sentence():
            return " ".join(rng.choice(words, size=rng.integers(3, 8)))
        examples.append(summarization.SummarizationExample(
            [sentence() for _ in range(3)], [sentence() for _ in range(6)],
            [float(x) for x in rng.integers(1, 6, size=6)]))
    task = local_task(AbsTaskSummarization, "Summarization", "cosine_spearman", DatasetDict({
        "test": Dataset.from_dict({
            "text": ["source"] * len(examples),
            "human_summaries": [e.human_summaries for e in examples],
            "machine_summaries": [e.machine_summaries for e in examples],
            "relevance": [e.relevance for e in examples]})}), min_score=0, max_score=5)
    theirs = mteb_scores(hashing_encoder, task)
    ours = summarization.evaluate_summarization(hashing_encoder,
                                                summarization.SummarizationData(examples))
    # mteb's cosine goes through torch float32 here, so agreement is to float32 precision.
    for name in ("cosine_spearman", "cosine_pearson", "dot_spearman"):
        assert ours[name] == pytest.approx(theirs[name], abs=1e-6), name


@pytest.mark.slow
@pytest.mark.needs_shared
def test_minilm_stsbenchmark_equals_mteb_and_the_published_score(shared_data, minilm_encoder):
    data = tasks.load_stsbenchmark()
    ours = sts.evaluate_sts(minilm_encoder, data)
    task = local_task(AbsTaskSTS, "STS", "cosine_spearman", DatasetDict({"test": Dataset.from_dict(
        {"sentence1": data.sentences1, "sentence2": data.sentences2, "score": data.scores})}),
        min_score=0, max_score=5)
    theirs = mteb_scores(minilm_encoder, task)
    assert abs(ours["main_score"] - theirs["main_score"]) < 1e-4
    assert 100 * ours["main_score"] == pytest.approx(82.03, abs=0.10)
