"""The non-retrieval evaluators against hand-computed cases, and the encoder checks."""

import numpy as np
import pytest

from gemb.eval import (
    bitext,
    classification,
    clustering,
    encoders,
    pair_classification,
    reranking,
    sts,
    summarization,
)


class LookupEncoder:
    """Returns a fixed vector per text, so every similarity is known in advance."""

    def __init__(self, vectors):
        self.vectors = {text: np.asarray(v, dtype=np.float32) for text, v in vectors.items()}

    def encode(self, texts, role):
        return np.stack([self.vectors[t] for t in texts])


def unit(angle):
    return [np.cos(angle), np.sin(angle)]


# ------------------------------------------------------------------------------- encoder checks


@pytest.mark.parametrize("bad, message", [
    (lambda texts, role: np.zeros((len(texts) - 1, 4)), r"shape \(2, 4\) for 3 texts"),
    (lambda texts, role: np.zeros(len(texts)), r"shape \(3,\) for 3 texts"),
    (lambda texts, role: np.zeros((len(texts), 0)), r"dim > 0"),
    (lambda texts, role: np.full((len(texts), 2), np.nan), "NaN or infinite"),
    (lambda texts, role: [["a", "b"]] * len(texts), "expected a float array"),
])
def test_wrong_encoder_output_is_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        encoders.embed(bad, ["a", "bb", "ccc"], "query")


def test_embed_rejects_bad_roles_empty_input_and_non_strings():
    ok = lambda texts, role: np.ones((len(texts), 2))
    with pytest.raises(ValueError, match="role must be"):
        encoders.embed(ok, ["a"], "passage")
    with pytest.raises(ValueError, match="empty"):
        encoders.embed(ok, [], "query")
    with pytest.raises(TypeError, match="text 1 is int"):
        encoders.embed(ok, ["a", 3], "query")
    with pytest.raises(TypeError, match="not an encoder"):
        encoders.embed(object(), ["a"], "query")


def test_task_keyword_is_passed_only_to_encoders_that_accept_it():
    seen = []

    def with_task(texts, role, task=None):
        seen.append(task)
        return np.ones((len(texts), 2))

    encoders.embed(with_task, ["a"], "query", task="sentence_similarity")
    encoders.embed(lambda texts, role: np.ones((len(texts), 2)), ["a"], "query", task="x")
    assert seen == ["sentence_similarity"]


def test_batched_encoder_sorts_by_length_and_restores_order():
    batches = []

    def encode(texts, role):
        batches.append(list(texts))
        return np.array([[len(t), 0.0] for t in texts])

    texts = ["aa", "a", "aaaa", "aaa", "aaaaa"]
    out = encoders.BatchedEncoder(encode, batch_size=2, show_progress=False).encode(texts, "query")
    assert batches == [["aaaaa", "aaaa"], ["aaa", "aa"], ["a"]]
    np.testing.assert_array_equal(out[:, 0], [2, 1, 4, 3, 5])


def test_batched_encoder_reports_the_bad_batch():
    def encode(texts, role):
        return np.ones((len(texts), 3 if len(texts[0]) > 2 else 4))

    with pytest.raises(ValueError, match="dimension 4 for one batch and 3"):
        encoders.BatchedEncoder(encode, batch_size=1, show_progress=False).encode(
            ["aaa", "a"], "query")


def test_embedding_cache_reuses_rows(tmp_path, hashing_encoder):
    cache = encoders.EmbeddingCache(tmp_path, encoder_key="hashing")
    first = cache.embed(hashing_encoder, ["a b", "c"], "document")
    second = cache.embed(hashing_encoder, ["a b", "c"], "document")
    np.testing.assert_array_equal(first, second)
    assert len(hashing_encoder.calls) == 1
    cache.embed(hashing_encoder, ["a b", "c"], "query")  # another role: another entry
    assert len(hashing_encoder.calls) == 2


# ------------------------------------------------------------------------------------------- STS


def test_sts_spearman_and_pearson_of_cosine():
    # Cosines 1, cos(0.5), cos(1.0), cos(1.5): decreasing. Gold 5, 3, 4, 0.
    vectors = {"x": unit(0.0)}
    for i, angle in enumerate([0.0, 0.5, 1.0, 1.5]):
        vectors[f"y{i}"] = unit(angle)
    data = sts.STSData(["x"] * 4, [f"y{i}" for i in range(4)], [5, 3, 4, 0])
    result = sts.evaluate_sts(LookupEncoder(vectors), data)
    # ranks of cosine: 4,3,2,1; of gold: 4,2,3,1 -> Spearman 1 - 6*(0+1+1+0)/(4*15) = 0.8
    assert result["cosine_spearman"] == pytest.approx(0.8)
    cosines = np.cos([0.0, 0.5, 1.0, 1.5])
    assert result["cosine_pearson"] == pytest.approx(np.corrcoef(cosines, [5, 3, 4, 0])[0, 1],
                                                     rel=1e-5)
    assert result["main_score"] == result["cosine_spearman"]


def test_sts_data_errors():
    with pytest.raises(ValueError, match="differ in length"):
        sts.STSData(["a"], ["b", "c"], [1.0])
    with pytest.raises(ValueError, match="every gold score is 3"):
        sts.STSData(["a", "b"], ["c", "d"], [3.0, 3.0])


# -------------------------------------------------------------------------------- classification


def test_undersampling_follows_mtebs_random_state_sequence():
    labels = ["a", "b"] * 10
    experiments = classification.undersample_experiments(labels, n_experiments=3,
                                                         samples_per_label=2, seed=42)
    order = list(range(20))
    for selected in experiments:
        np.random.RandomState(42).shuffle(order)  # the same permutation, applied again
        expected = [i for i in order if labels[i] == "a"][:2] + \
                   [i for i in order if labels[i] == "b"][:2]
        assert sorted(selected) == sorted(expected)
        assert [labels[i] for i in selected].count("a") == 2


def test_undersampling_equals_mtebs_own():
    pytest.importorskip("mteb")
    datasets = pytest.importorskip("datasets")
    from mteb.abstasks.classification import AbsTaskClassification

    labels = [i % 5 for i in range(60)]
    dataset = datasets.Dataset.from_dict({"text": [str(i) for i in range(60)], "label": labels})

    class Probe(AbsTaskClassification):
        metadata = None

        def __init__(self):  # noqa: D107 - only the sampler is used
            self.seed = 42
            self.samples_per_label = 3

    probe, idxs, theirs = Probe(), None, []
    for i in range(4):
        _, idxs, selected = probe._undersample_data(dataset, i, idxs)
        theirs.append(selected)
    ours = classification.undersample_experiments(labels, 4, 3, 42)
    assert ours == theirs


def test_classification_on_separable_data_is_perfect(hashing_encoder):
    train = [f"apple fruit {i}" for i in range(10)] + [f"car engine {i}" for i in range(10)]
    test = ["apple fruit", "car engine", "fruit apple 3", "engine car 7"]
    data = classification.ClassificationData(train, [0] * 10 + [1] * 10, test, [0, 1, 0, 1])
    result = classification.evaluate_classification(hashing_encoder, data, n_experiments=3,
                                                    samples_per_label=4)
    assert result["accuracy"] == 1.0 and result["main_score"] == 1.0
    assert result["ap"] == 1.0  # binary: AP is reported
    assert len(result["scores_per_experiment"]) == 3
    assert result["num_train_embedded"] <= 20


def test_classification_single_class_is_an_error():
    with pytest.raises(ValueError, match="single label 'x'"):
        classification.ClassificationData(["a", "b"], ["x", "x"], ["c"], ["x"])
    with pytest.raises(ValueError, match="differ|train texts but"):
        classification.ClassificationData(["a"], ["x", "y"], ["c"], ["x"])


# ----------------------------------------------------------------------------------- clustering


def test_clustering_perfect_clusters_and_single_label_sets():
    vectors = {f"a{i}": [10.0, 0.1 * i] for i in range(5)}
    vectors.update({f"b{i}": [0.0, 10.0 + 0.1 * i] for i in range(5)})
    vectors.update({f"c{i}": [5.0, 5.0] for i in range(3)})
    texts = [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)] + [f"c{i}" for i in range(3)]
    labels = ["A"] * 5 + ["B"] * 5 + ["C"] * 3
    sets = ["s1"] * 10 + ["s2"] * 3  # s2 holds one label only: MTEB scores it 1.0 unclustered
    data = clustering.ClusteringData(texts, labels, sets)
    result = clustering.evaluate_clustering(LookupEncoder(vectors), data)
    assert result["v_measures"] == [pytest.approx(1.0), 1.0]
    assert result["main_score"] == pytest.approx(1.0)


def test_clustering_v_measure_by_hand():
    # Gold [0,0,1,1], predicted [0,0,0,1]: homogeneity 1 - H(C|K)/H(C), completeness 1 - ...
    from sklearn.metrics import v_measure_score

    assert v_measure_score([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(
        2 * (1 - 0.6887219 / 1) * (1 - 0.5 / 0.8112781) /
        ((1 - 0.6887219) + (1 - 0.5 / 0.8112781)), rel=1e-6)


def test_clustering_errors_and_fast_protocol(hashing_encoder):
    with pytest.raises(ValueError, match="single class"):
        clustering.ClusteringData(["a", "b"], ["x", "x"])
    texts = [f"apple {i}" for i in range(20)] + [f"car {i}" for i in range(20)]
    data = clustering.ClusteringData(texts, [0] * 20 + [1] * 20)
    result = clustering.evaluate_clustering(hashing_encoder, data, protocol="fast",
                                            fast_experiments=4, fast_sample_size=256)
    assert len(result["v_measures"]) == 4 and 0 <= result["main_score"] <= 1
    with pytest.raises(ValueError, match="protocol"):
        clustering.evaluate_clustering(hashing_encoder, data, protocol="other")


# ---------------------------------------------------------------------------- pair classification


def test_pair_classification_ap_and_thresholds_by_hand():
    scores, labels = [0.9, 0.8, 0.7], [1, 0, 1]
    metrics = pair_classification.pair_metrics(scores, labels)
    assert metrics["ap"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    # MTEB never puts the threshold below the lowest score (everything positive), so the best
    # F1 is at 0.85: P 1, R 1/2.
    assert metrics["f1"] == pytest.approx(2 / 3)
    # Ties: 0.9 holds a positive and a negative; no threshold may split them.
    tied = pair_classification.pair_metrics([0.9, 0.9, 0.1], [1, 0, 1])
    assert tied["ap"] == pytest.approx(0.5 * 0.5 + 0.5 * (2 / 3))
    # The only threshold lies between 0.9 and 0.1: one pair of three is right. Splitting the
    # tie (2/3 right) would depend on row order, which MTEB forbids.
    assert tied["accuracy"] == pytest.approx(1 / 3)
    # Distances: smaller means more similar.
    distances = pair_classification.pair_metrics([0.1, 0.2, 0.3], [1, 0, 1],
                                                 high_score_more_similar=False)
    assert distances["ap"] == pytest.approx(metrics["ap"])


def test_pair_classification_end_to_end_and_errors():
    vectors = {"x": unit(0), "p": unit(0.1), "n": unit(1.4), "q": unit(0.5)}
    data = pair_classification.PairData(["x", "x", "x"], ["p", "n", "q"], [1, 0, 1])
    result = pair_classification.evaluate_pair_classification(LookupEncoder(vectors), data)
    assert result["cosine_ap"] == pytest.approx(1.0)
    assert result["main_score"] == result["max_ap"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="both positive"):
        pair_classification.PairData(["a"], ["b"], [1])
    with pytest.raises(ValueError, match="must be 0 or 1"):
        pair_classification.PairData(["a", "b"], ["b", "c"], [1, 2])


# ----------------------------------------------------------------------------------------- bitext


def test_bitext_f1_by_hand():
    vectors = {"s0": unit(0), "s1": unit(0.05), "s2": unit(1.5),
               "t0": unit(0), "t1": unit(0.7), "t2": unit(1.5)}
    data = bitext.BitextData(["s0", "s1", "s2"], ["t0", "t1", "t2"])
    result = bitext.evaluate_bitext(LookupEncoder(vectors), data)
    # Predictions [0, 0, 2] for gold [0, 1, 2]: per-class F1 2/3, 0, 1 (support 1 each).
    assert result["f1"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert result["precision"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert result["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="aligned line by line"):
        bitext.BitextData(["a"], ["b", "c"])


def test_bitext_ties_go_to_the_first_target():
    vectors = {"s0": unit(0), "s1": unit(1.0), "t0": unit(1.0), "t1": unit(1.0)}
    result = bitext.evaluate_bitext(LookupEncoder(vectors), bitext.BitextData(["s0", "s1"],
                                                                              ["t0", "t1"]))
    assert result["accuracy"] == 0.5  # both pick t0


# -------------------------------------------------------------------------------------- reranking


def test_reranking_map_and_mrr_by_hand():
    vectors = {"q": unit(0), "p1": unit(0.3), "p2": unit(1.2), "n1": unit(0.1), "n2": unit(0.9),
               "q2": unit(0), "only": unit(0)}
    data = reranking.RerankingData([
        reranking.RerankingExample("q", ["p1", "p2"], ["n1", "n2"]),
        reranking.RerankingExample("q2", ["only"], []),  # skipped: no negative
    ])
    assert data.skipped == 1
    result = reranking.evaluate_reranking(LookupEncoder(vectors), data)
    # Ranking n1, p1, n2, p2: AP = (1/2 + 2/4) / 2, first positive at rank 2.
    assert result["map_at_1000"] == pytest.approx(0.5)
    assert result["mrr_at_10"] == pytest.approx(0.5)
    assert result["main_score"] == result["map_at_1000"]
    with pytest.raises(ValueError, match="nothing to rerank"):
        reranking.RerankingData([reranking.RerankingExample("q", ["a"], [])])


# ---------------------------------------------------------------------------------- summarization


def test_summarization_spearman_of_max_cosine():
    vectors = {"h1": unit(0), "h2": unit(1.5), "m1": unit(0.1), "m2": unit(0.6), "m3": unit(0.9),
               "k1": unit(0), "k2": unit(0)}
    data = summarization.SummarizationData([
        summarization.SummarizationExample(["h1", "h2"], ["m1", "m2", "m3"], [3, 1, 2]),
        summarization.SummarizationExample(["h1"], ["k1", "k2"], [1, 2]),  # equal predictions
    ])
    result = summarization.evaluate_summarization(LookupEncoder(vectors), data)
    # max cosines: m1 cos(.1), m2 cos(.6) (to h1; h2 gives cos(.9)), m3 cos(.6) (to h2):
    # predictions rank m1 > m2 = m3; gold 3, 1, 2 -> Spearman of [3, 1.5, 1.5] and [3, 1, 2].
    from scipy.stats import spearmanr

    expected = spearmanr([3, 1, 2], [np.cos(0.1), np.cos(0.6), np.cos(0.6)]).statistic
    assert result["cosine_spearman"] == pytest.approx(expected, abs=1e-6)
    assert result["num_skipped_texts"] == 1


def test_an_encoder_that_batches_itself_gets_the_whole_list():
    calls = []

    class SelfBatching:
        batches_itself = True
        name = "self-batching"

        def encode(self, texts, role, task=None, progress=None):
            calls.append((len(texts), role, task, progress))
            return np.ones((len(texts), 3), np.float32)

    out = encoders.BatchedEncoder(SelfBatching(), batch_size=2, show_progress=False).encode(
        ["a", "bb", "ccc", "dddd", "e"], "document", task="search")
    assert out.shape == (5, 3)
    assert calls == [(5, "document", "search", False)]


def test_model_fingerprint_changes_when_the_weights_do(tmp_path):
    import os

    (tmp_path / "params").mkdir()
    weights = tmp_path / "params" / "shard0"
    weights.write_bytes(b"old weights")
    first = encoders.model_fingerprint(str(tmp_path))
    assert encoders.model_fingerprint(str(tmp_path)) == first
    weights.write_bytes(b"new weights, longer")
    assert encoders.model_fingerprint(str(tmp_path)) != first
    second = encoders.model_fingerprint(str(tmp_path))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size, rewritten
    assert encoders.model_fingerprint(str(tmp_path)) != second
