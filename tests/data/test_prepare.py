"""`gemb data prepare`: the Beam pipeline equals the in-process reference byte for byte, counts
bad records exactly as the in-memory reader does, is idempotent, and writes the token ids the
in-memory seqio path would feed the model."""

import json

import numpy as np
import pytest

from gemb.data import batching, prepare, prepared, sources, streaming, tasks, templates
from gemb.data.quality import QualityPolicy

MAX_CHARS = 120


def _raw_lines(words):
    """JSONL lines with every kind of bad record among good ones (and duplicates)."""
    rng = np.random.default_rng(0)
    good = [{"query": " ".join(rng.choice(words, 5)), "positive": " ".join(rng.choice(words, 9)),
             "negatives": [" ".join(rng.choice(words, 4))]} for _ in range(40)]
    lines = [json.dumps(record).encode() for record in good]
    lines += [
        json.dumps({"query": "   ", "positive": "a text"}).encode(),             # empty_text
        json.dumps({"positive": "no query here"}).encode(),                      # missing_field
        json.dumps({"query": 7, "positive": "a number is no text"}).encode(),     # wrong_type
        b'{"query": "bad \xff\xfe bytes", "positive": "text"}',                   # undecodable
        json.dumps({"query": "long", "positive": "x" * (MAX_CHARS + 1)}).encode(),  # over_long
        b"{not json",                                                             # unparseable
        json.dumps(good[3]).encode(), json.dumps(good[7]).encode(),               # duplicates
    ]
    return lines


WORDS = ("the a man woman dog cat plays runs reads writes code function returns list value "
         "file string number bank card account money question answer python data").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw")
    lines = _raw_lines(WORDS)
    (folder / "part-0.jsonl").write_bytes(b"\n".join(lines[:25]) + b"\n")
    (folder / "part-1.jsonl").write_bytes(b"\n".join(lines[25:]) + b"\n")
    return folder


def _spec(corpus, tokenizer, dedupe=True):
    return prepare.PrepareSpec(
        task="toy_pairs",
        source=sources.SourceSpec.of("jsonl", {"train": str(corpus / "part-*.jsonl")}),
        builder=sources.TripletBuilder(negatives_list_field="negatives", min_negatives=0),
        template=templates.default_template("search"), tokenizer=tokenizer,
        num_negatives=1, policy=QualityPolicy(max_chars=MAX_CHARS), dedupe=dedupe)


def _files(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_beam_pipeline_equals_the_in_process_reference_and_is_idempotent(
        corpus, sentencepiece_vocab, tmp_path):
    spec = _spec(corpus, sentencepiece_vocab.sentencepiece_model_file)
    reference = prepare.prepare_in_process(spec, tmp_path / "reference", num_shards=3)
    beam_info = prepare.run_pipeline(spec, str(tmp_path / "beam"), num_shards=3)
    prepare.run_pipeline(spec, str(tmp_path / "again"), num_shards=3)
    assert _files(tmp_path / "beam") == _files(tmp_path / "reference") == _files(tmp_path / "again")
    split = beam_info.splits["train"]
    assert split.records_seen == 48 and split.duplicates_dropped == 2
    assert split.num_examples == 40 == sum(split.shard_sizes) and len(split.shard_sizes) == 3
    assert reference.vocabulary["sha256"] and reference.template["task_description"]


def test_bad_record_counts_equal_the_in_memory_reader(corpus, sentencepiece_vocab, tmp_path):
    spec = _spec(corpus, sentencepiece_vocab.sentencepiece_model_file)
    info = prepare.run_pipeline(spec, str(tmp_path / "beam"), num_shards=2)
    source = sources.InMemoryExampleSource("toy_pairs_in_memory", spec.source.readers(),
                                           spec.builder, num_negatives=1, policy=spec.policy)
    source.examples("train")
    from gemb.data import quality

    report = quality.report_for("toy_pairs_in_memory", "train")
    assert info.splits["train"].bad_records == report.as_dict()["bad"]
    assert set(report.as_dict()["bad"]) == {"empty_text", "missing_field", "wrong_type",
                                             "undecodable_bytes", "over_long_text",
                                             "unparseable_record"}
    assert report.records_seen == info.splits["train"].records_seen


def test_prepared_ids_equal_the_in_memory_seqio_ids(corpus, sentencepiece_vocab, tmp_path):
    spec = _spec(corpus, sentencepiece_vocab.sentencepiece_model_file, dedupe=False)
    prepare.prepare_in_process(spec, tmp_path / "prepared", num_shards=2)
    stream = streaming.PreparedStream(streaming.PreparedTask("toy", str(tmp_path / "prepared")),
                                      "train", 0, 0, 1, 42, 0)
    ours = sorted(_example_key(e.query, e.positive, e.negatives) for e in stream.next_examples())

    task = tasks.add_embedding_task("toy_pairs_seqio", spec.source.readers(), spec.builder,
                                    sentencepiece_vocab, spec.template, num_negatives=1,
                                    policy=spec.policy)
    batcher = batching.TaskHomogeneousBatcher([(task, 1.0)], batch_size=42,
                                              shard_info=batching.ShardInfo(0, 1))
    batch = batcher.next_token_batch()
    negatives = batch.negatives.sequences()
    theirs = sorted(_example_key(q, p, tuple(negatives[i:i + 1][:batch.num_negatives[i]]))
                    for i, (q, p) in enumerate(zip(batch.query.sequences(),
                                                   batch.positive.sequences())))
    assert ours == theirs


def _example_key(query, positive, negatives):
    return (tuple(np.asarray(query).tolist()), tuple(np.asarray(positive).tolist()),
            tuple(tuple(np.asarray(n).tolist()) for n in negatives))


def test_an_empty_result_and_a_bad_folder_are_named(corpus, sentencepiece_vocab, tmp_path):
    spec = _spec(corpus, sentencepiece_vocab.sentencepiece_model_file)
    empty = prepare.PrepareSpec(**{**spec.__dict__, "builder": sources.PairBuilder(
        query_field="nothing_has_this_field")})
    with pytest.raises(ValueError, match="kept no examples"):
        prepare.prepare_in_process(empty, tmp_path / "empty", num_shards=2)
    with pytest.raises(FileNotFoundError, match="not a prepared task folder"):
        prepared.read_info(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "info.json").write_text('{"format": "something else"}')
    with pytest.raises(prepared.PreparedDataError, match="prepare the task again"):
        prepared.read_info(tmp_path / "bad")


def test_source_options_bring_mined_negatives_into_a_beir_task(tmp_path):
    """`--source_option` passes a reader's options: a BEIR folder's dev qrels with the
    negatives `gemb data mine-negatives` wrote, as the CoSQA fine-tune uses them."""
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": f"d{i}", "text": f"passage {i}"}) + "\n" for i in range(4)))
    (folder / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"q{i}", "text": f"query {i}"}) + "\n" for i in range(2)))
    (folder / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\n")
    mined = tmp_path / "negatives.jsonl"
    mined.write_text(json.dumps({"query_id": "q0", "negative_ids": ["d3"]}) + "\n")
    args = prepare._parser().parse_args([
        "--name", "mined", "--format", "beir", "--split", f"train={folder}",
        "--source_option", "split_name=dev", "--source_option", f"hard_negatives_path={mined}",
        "--source_option", "max_negatives=1", "--negatives_field", "negatives",
        "--num_negatives", "1", "--tokenizer", "unused", "--output", "unused", "--num_shards", "1"])
    spec = prepare.spec_from_args(args)
    assert dict(spec.source.options)["max_negatives"] == 1  # JSON values keep their type
    records = [r.value for unit in spec.source.units("train") for r in unit()]
    assert [(r["query"], r["negatives"]) for r in records] == [
        ("query 0", ["passage 3"]), ("query 1", [])]
    # A query without a mined negative is rejected by the triplet builder, and counted.
    from gemb.data.quality import RejectRecord

    assert spec.builder(records[0], QualityPolicy()).negatives == ("passage 3",)
    with pytest.raises(RejectRecord, match="0 negatives < min_negatives=1"):
        spec.builder(records[1], QualityPolicy())
    with pytest.raises(SystemExit, match="not KEY=VALUE"):
        prepare.spec_from_args(prepare._parser().parse_args([
            "--name", "x", "--format", "beir", "--split", f"train={folder}", "--source_option",
            "oops", "--tokenizer", "t", "--output", "o", "--num_shards", "1"]))
