"""Task specs, TYPE:PATH loaders and the registered ../shared/data tasks."""

import json

import pytest

from gemb.eval import tasks


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_plain_tsv_keeps_quotes_as_text(tmp_path):
    # STS-style data: quotes are part of the text and are not csv escapes.
    path = write(tmp_path / "s.tsv", 'sentence1\tsentence2\tscore\n"Hi," she said.\tHello\t4.5\n'
                                     'A "quoted" word\tB\t1\n')
    data = tasks.load_sts_file(path)
    assert data.sentences1 == ['"Hi," she said.', 'A "quoted" word']
    assert data.scores == [4.5, 1.0]


def test_csv_quoted_tsv_is_unquoted(tmp_path):
    import csv
    import io

    rows = [["sentence1", "sentence2", "score"], ['He said "hi"', "tab\there", "2"],
            ["plain", "multi\nline", "3"]]
    buffer = io.StringIO()
    csv.writer(buffer, delimiter="\t", lineterminator="\n").writerows(rows)
    data = tasks.load_sts_file(write(tmp_path / "q.tsv", buffer.getvalue()))
    assert data.sentences1 == ['He said "hi"', "plain"]
    assert data.sentences2 == ["tab\there", "multi\nline"]


def test_tsv_header_and_row_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tasks.load_sts_file(tmp_path / "missing.tsv")
    with pytest.raises(ValueError, match="needs a header line with columns sentence1, sentence2, "
                                         "score"):
        tasks.load_sts_file(write(tmp_path / "a.tsv", "a\tb\tc\nx\ty\t1\n"))
    with pytest.raises(ValueError, match="is empty"):
        tasks.load_sts_file(write(tmp_path / "b.tsv", "\n"))
    with pytest.raises(ValueError, match="score 'high' is not a number"):
        tasks.load_sts_file(write(tmp_path / "c.tsv", "sentence1\tsentence2\tscore\na\tb\thigh\n"
                                                      "c\td\t1\n"))


def test_classification_dir(tmp_path):
    write(tmp_path / "cls" / "train.tsv", "text\tlabel\na\t1\nb\t0\nc\t1\n")
    write(tmp_path / "cls" / "test.tsv", "label\ttext\n0\td\n")  # column order does not matter
    data = tasks.load_classification_dir(tmp_path / "cls")
    assert data.train_labels == [1, 0, 1] and data.test_texts == ["d"] and data.test_labels == [0]
    write(tmp_path / "one" / "train.tsv", "text\tlabel\na\tx\nb\tx\n")
    write(tmp_path / "one" / "test.tsv", "text\tlabel\nc\tx\n")
    with pytest.raises(ValueError, match="single label 'x'"):
        tasks.load_classification_dir(tmp_path / "one")
    with pytest.raises(FileNotFoundError, match="test.tsv does not exist"):
        write(tmp_path / "half" / "train.tsv", "text\tlabel\na\tx\nb\ty\n")
        tasks.load_classification_dir(tmp_path / "half")


def test_pair_clustering_bitext_reranking_summarization_loaders(tmp_path):
    pair = tasks.load_pair_file(write(tmp_path / "p.tsv",
                                      "sentence1\tsentence2\tlabel\na\tb\t1\nc\td\t0.0\n"))
    assert pair.labels == [1, 0]
    cluster = tasks.load_clustering_file(write(tmp_path / "c.tsv",
                                               "text\tlabel\tset\na\tx\t1\nb\ty\t1\nc\tx\t2\n"))
    assert cluster.sets() == [[0, 1], [2]]
    write(tmp_path / "bt" / "src.txt", "hello\nworld\n")
    write(tmp_path / "bt" / "tgt.txt", "hallo\nwelt\n")
    assert tasks.load_bitext_dir(tmp_path / "bt").targets == ["hallo", "welt"]
    write(tmp_path / "bad" / "src.txt", "a\nb\n")
    write(tmp_path / "bad" / "tgt.txt", "a\n")
    with pytest.raises(ValueError, match="2 source lines but 1 target lines"):
        tasks.load_bitext_dir(tmp_path / "bad")
    rerank = write(tmp_path / "r.jsonl",
                   json.dumps({"query": "q", "positive": ["p"], "negative": ["n"]}) + "\n")
    assert tasks.load_reranking_file(rerank).examples[0].positives == ["p"]
    with pytest.raises(ValueError, match="missing \\['negative'\\]"):
        tasks.load_reranking_file(write(tmp_path / "r2.jsonl",
                                        json.dumps({"query": "q", "positive": ["p"]}) + "\n"))
    summ = write(tmp_path / "s.jsonl", json.dumps(
        {"human_summaries": ["h"], "machine_summaries": ["a", "b"], "relevance": [1, 2]}) + "\n")
    assert tasks.load_summarization_file(summ).examples[0].relevance == [1.0, 2.0]


def test_parse_task_specs_and_options(tmp_path):
    task = tasks.parse_task(f"retrieval:{tmp_path}/scifact?split=dev&ignore_identical_ids=1"
                            "&main_score=recall_at_100&name=SciFact")
    assert (task.name, task.task_type) == ("SciFact", "retrieval")
    assert task.options == {"ignore_identical_ids": True, "main_score": "recall_at_100"}
    assert tasks.parse_task(f"sts:{tmp_path}/sick.tsv").name == "sick"
    assert tasks.parse_task("stsb").name == "STSBenchmark"
    assert tasks.parse_task("BANKING77").name == "Banking77Classification"
    assert tasks.parse_task("pair:x.tsv?prompt_task=search").prompt_task == "search"
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.parse_task("nope")
    with pytest.raises(ValueError, match="unknown option 'split'"):
        tasks.parse_task("sts:x.tsv?split=dev")
    with pytest.raises(ValueError, match="must be an integer"):
        tasks.parse_task("classification:d?n_experiments=many")
    with pytest.raises(ValueError, match="both be filed as"):
        tasks.parse_task_list("sts:a/x.tsv,sts:b/x.tsv")


def test_missing_files_surface_when_the_task_runs(tmp_path, hashing_encoder):
    task = tasks.parse_task(f"retrieval:{tmp_path}/none")  # parsing never touches the disk
    with pytest.raises(FileNotFoundError, match="does not exist"):
        task.evaluate(hashing_encoder)


@pytest.mark.needs_shared
def test_registered_tasks_load_the_shared_data(shared_data):
    stsb = tasks.load_stsbenchmark()
    assert len(stsb.scores) == 1379
    # The figure mteb's descriptive statistics give for STSBenchmark test.
    assert sum(len(a) + len(b) for a, b in zip(stsb.sentences1, stsb.sentences2)) == 147886
    banking = tasks.load_banking77()
    assert (len(banking.train_texts), len(banking.test_texts)) == (10003, 3080)
    assert len(set(banking.train_labels)) == 77
    cosqa = tasks.load_cosqa()
    assert (len(cosqa.corpus_ids), len(cosqa.queries)) == (6267, 500)
    assert len(tasks.load_cosqa("dev").queries) == 500
    multi = tasks.load_stsb_multi_mt()
    assert sorted(multi) == sorted(tasks.STSB_MULTI_MT_LANGUAGES)
    assert all(len(d.scores) == 1379 for d in multi.values())


@pytest.mark.needs_shared
def test_registered_sts_task_with_a_fake_encoder(shared_data, hashing_encoder):
    result = tasks.parse_task("STSBenchmark").evaluate(hashing_encoder)
    assert 0.2 < result["main_score"] < 0.9 and result["num_pairs"] == 1379


def test_retrieval_subsample_keeps_every_kept_querys_documents():
    from gemb.eval import retrieval

    data = retrieval.RetrievalData(
        corpus_ids=[f"d{i}" for i in range(100)], corpus_texts=[f"t{i}" for i in range(100)],
        queries={f"q{i}": f"query {i}" for i in range(30)},
        qrels={f"q{i}": {f"d{i}": 1, f"d{i + 30}": 0} for i in range(30)}, source="toy")
    sample = retrieval.subsample(data, num_queries=10, corpus_size=25, seed=3)
    assert len(sample.queries) == 10 and len(sample.corpus_ids) == 25
    relevant = {d for q in sample.queries for d, s in data.qrels[q].items() if s > 0}
    assert relevant <= set(sample.corpus_ids)
    assert [sample.corpus_texts[i] for i in range(25)] == [
        "t" + d[1:] for d in sample.corpus_ids]  # ids and texts stay paired, in corpus order
    assert sample.corpus_ids == retrieval.subsample(data, 10, 25, seed=3).corpus_ids
    assert sample.corpus_ids != retrieval.subsample(data, 10, 25, seed=4).corpus_ids
    assert "comparable only with runs on the same sample" in sample.notes[-1]
    with pytest.raises(ValueError, match="smaller than the 10 documents relevant"):
        retrieval.subsample(data, num_queries=10, corpus_size=5)


@pytest.mark.needs_shared
def test_cosqa_takes_a_seeded_sample(shared_data):
    task = tasks.parse_task("CoSQA-CoCLR?num_queries=50&corpus_size=300&seed=1&name=cosqa_s")
    data = task.load()
    assert task.name == "cosqa_s" and (len(data.queries), len(data.corpus_ids)) == (50, 300)
    assert set(data.qrels) == set(data.queries)
    with pytest.raises(ValueError, match="unknown option 'corpus'"):
        tasks.parse_task("CoSQA-CoCLR?corpus=3")


@pytest.mark.needs_shared
def test_stsb_multi_mt_takes_some_languages(shared_data, hashing_encoder):
    task = tasks.parse_task("STSBenchmarkMultilingualSTS?languages=de+zh")
    assert sorted(task.load()) == ["de", "zh"]
    assert task.reference_name is None and "not MTEB's" in task.description
    full = tasks.parse_task("STSBenchmarkMultilingualSTS")
    assert full.reference_name == "STSBenchmarkMultilingualSTS"
    # The mean over the named languages is the mean of their scores alone.
    per_language = {lang: tasks.parse_task(f"STSBenchmarkMultilingualSTS?languages={lang}")
                    .evaluate(hashing_encoder)["main_score"] for lang in ("de", "zh")}
    both = task.evaluate(hashing_encoder)["main_score"]
    assert both == pytest.approx((per_language["de"] + per_language["zh"]) / 2)
    with pytest.raises(ValueError, match="unknown \\['xx'\\]; choose from de\\+en"):
        tasks.parse_task("STSBenchmarkMultilingualSTS?languages=de+xx")
