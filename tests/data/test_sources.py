import gzip
import json

import numpy as np
import pytest
import seqio

from gemb.data import quality, sources, tasks, templates
from gemb.data.quality import QualityPolicy

POLICY = QualityPolicy()


def test_jsonl_reader_handles_gzip_blank_lines_and_locations(tmp_path):
    path = tmp_path / "pairs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"query": "q1", "positive": "p1"}) + "\n\n")
        handle.write(json.dumps([1, 2]) + "\n")
    records = list(sources.read_jsonl(str(path)))
    assert [r.location for r in records] == [f"{path}:1", f"{path}:3"]
    assert records[0].value == {"query": "q1", "positive": "p1"} and records[0].error is None
    assert records[1].error.reason == "unparseable_record"


def test_tsv_keeps_quotes_and_reports_short_rows(tmp_path):
    path = tmp_path / "sts.tsv"
    path.write_text('g\tf\t2012\t1\t4.5\tHe said "hi".\tHe said hello.\ng\tf\t2012\t2\t1.0\tonly one\n')
    columns = ("genre", "file", "year", "id", "score", "sentence1", "sentence2")
    records = list(sources.read_tsv(str(path), columns=columns))
    assert records[0].value["sentence1"] == 'He said "hi".'
    builder = sources.StsPairBuilder(threshold=4.0)
    assert builder(records[0].value, POLICY) == sources.Example('He said "hi".', "He said hello.")
    with pytest.raises(quality.RejectRecord) as error:
        builder(records[1].value, POLICY)
    assert error.value.reason == "missing_field"


def test_sts_threshold_filters_without_counting_bad():
    builder = sources.StsPairBuilder(threshold=4.0)
    assert builder({"sentence1": "a", "sentence2": "b", "score": "3.9"}, POLICY) is None
    assert builder({"sentence1": "a", "sentence2": "b", "score": 4}, POLICY) == sources.Example("a", "b")
    with pytest.raises(quality.RejectRecord, match="not a number"):
        builder({"sentence1": "a", "sentence2": "b", "score": "high"}, POLICY)


def test_csv_with_header_and_quoted_newlines(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('text,category\n"two\nlines",card_arrival\nplain,top_up\n', encoding="utf-8")
    records = list(sources.read_csv(str(path)))
    assert [r.value for r in records] == [
        {"text": "two\nlines", "category": "card_arrival"}, {"text": "plain", "category": "top_up"}]
    assert records[1].location.endswith(":4")


def test_classification_as_retrieval():
    builder = sources.ClassificationBuilder(text_field="text", label_field="category",
                                            labels=("card_arrival", "top_up", "lost_card"),
                                            num_label_negatives=2)
    example = builder({"text": "where is my card", "category": "card_arrival"}, POLICY)
    assert example.query == "where is my card" and example.positive == "card arrival"
    assert len(example.negatives) == 2 and "card arrival" not in example.negatives
    assert example == builder({"text": "where is my card", "category": "card_arrival"}, POLICY)  # deterministic
    plain = sources.ClassificationBuilder(label_texts={"1": "positive review"})
    assert plain({"text": "great", "label": np.int64(1)}, POLICY).positive == "positive review"
    with pytest.raises(quality.RejectRecord) as error:
        plain({"text": "great", "label": [1]}, POLICY)
    assert error.value.reason == "wrong_type"


def test_beir_folder_pairs_with_listed_negatives(tmp_path):
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    corpus = [{"_id": "d1", "title": "T1", "text": "doc one"}, {"_id": "d2", "title": "", "text": "doc two"},
              {"_id": "d3", "text": "doc three"}]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "first"}) + "\n"
                                          + json.dumps({"_id": "q2", "text": "second"}) + "\n")
    (folder / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\nq2\td3\t2\nq2\tmissing\t1\n")
    hard = tmp_path / "hard.jsonl"
    hard.write_text(json.dumps({"query_id": "q2", "negative_ids": ["d1"]}) + "\n")
    records = list(sources.read_beir(str(folder), "train", hard_negatives_path=str(hard)))
    by_doc = {r.value["corpus_id"]: r.value for r in records}
    assert by_doc["d1"]["query"] == "first" and by_doc["d1"]["positive_title"] == "T1"
    assert by_doc["d1"]["negatives"] == ["doc two"]
    assert by_doc["d3"]["negatives"] == ["doc one"] and by_doc["d3"]["negative_titles"] == ["T1"]
    assert "positive" not in by_doc["missing"]  # reported by the builder, not dropped silently
    builder = sources.TripletBuilder(title_field="positive_title", negatives_list_field="negatives",
                                     negative_titles_field="negative_titles")
    example = builder(by_doc["d3"], POLICY)
    assert example.negatives == ("doc one",) and example.negative_titles == ("T1",)
    with pytest.raises(quality.RejectRecord) as error:
        builder(by_doc["missing"], POLICY)
    assert error.value.reason == "missing_field"


def test_tfds_reader_with_mocked_dataset():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        records = list(sources.read_tfds("imdb_reviews", "train"))
    assert len(records) == 4 and records[0].location == "tfds:imdb_reviews[train]#0"
    example = sources.ClassificationBuilder()(records[0].value, POLICY)  # bytes text, int label
    assert isinstance(example.query, str) and example.positive in ("0", "1")


def test_negative_slots_are_padded_and_counted(tmp_path, byte_vocab, make_toy_task):
    task = make_toy_task("sources_negatives", tmp_path, byte_vocab, 30, num_negatives=3)
    examples = task.source.examples("train")
    assert examples["negatives"].shape == (30, 3)
    for used, negatives in zip(examples["num_negatives"], examples["negatives"]):
        assert all(negatives[:used]) and not any(negatives[used:])


def test_two_hosts_read_disjoint_examples_that_cover_the_task(tmp_path, byte_vocab, make_toy_task):
    task = make_toy_task("sources_hosts", tmp_path, byte_vocab, 41)
    lengths = {"query": 64, "positive": 64, "negatives": [None, 64]}

    def queries(index):
        ds = task.get_dataset(lengths, shuffle=True, seed=3, shard_info=seqio.ShardInfo(index, 2))
        return [byte_vocab.decode(ex["query"].tolist()) for ex in ds.as_numpy_iterator()]

    host0, host1 = queries(0), queries(1)
    assert not set(host0) & set(host1)
    assert len(host0) + len(host1) == 41 and len(set(host0) | set(host1)) == 41
    assert all(q.startswith("task: search result | query: sources_hosts q ") for q in host0)


def test_task_dataset_is_templated_tokenised_and_trimmed(tmp_path, sentencepiece_vocab, make_toy_task):
    task = make_toy_task("sources_pipeline", tmp_path, sentencepiece_vocab, 20, num_negatives=2)
    ds = task.get_dataset({"query": 6, "positive": 300, "negatives": [None, 5]}, shuffle=False)
    raw = task.source.examples("train")
    template = templates.default_template("search")
    for i, ex in enumerate(ds.as_numpy_iterator()):
        assert ex["query"].dtype == np.int32 and len(ex["query"]) <= 6
        assert ex["positive"].tolist() == sentencepiece_vocab.encode(template.document(raw["positive"][i]))
        negatives = ex["negatives"]
        used = raw["num_negatives"][i]
        assert negatives.shape[0] == 2
        assert all(0 < len(n) <= 5 for n in negatives[:used]) and all(len(n) == 0 for n in negatives[used:])


def test_registration_replaces_and_reads_lazily(tmp_path, byte_vocab):
    calls = []

    def reader():
        calls.append(1)
        return iter([sources.RawRecord("x:1", {"query": "a", "positive": "b"})])

    for _ in range(2):
        tasks.add_embedding_task("sources_lazy", {"train": reader}, sources.PairBuilder(), byte_vocab,
                                 templates.default_template("search"))
    assert calls == []
    assert seqio.TaskRegistry.get("sources_lazy").num_input_examples("train") == 1
    assert calls == [1]
