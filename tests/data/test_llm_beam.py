"""The LLM stages as Beam pipelines (gemb.data.llm_beam) on the DirectRunner's in-process engine:
on the same inputs and the same deterministic stand-in LLMs as the in-process tests, the
pipeline's kept / dropped (and lists) records, sorted by id, equal the in-process stage's
exactly, and so do the summary's counts; one pipeline per stage (Beam starts slowly)."""

import json

import numpy as np
import pytest

from gemb.data import llm_beam, llm_filter, prepare, synthetic
from gemb.data import synthetic_classification as sc

from test_llm_stages import FILTER_CONFIG, PAIRS, PASSAGES, RuleLLM, _write_jsonl
from test_synthetic_classification import CONFIG as CLASSIFICATION_CONFIG
from test_synthetic_classification import TASK, ListWriterLLM

pytest.importorskip("apache_beam")

NUM_SHARDS = 3


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _shards(folder, kind):
    """The records of a kind's shards (every shard exists; each in input order), and their
    union sorted by id."""
    names = [llm_beam.shard_name(kind, i, NUM_SHARDS) for i in range(NUM_SHARDS)]
    assert all((folder / name).exists() for name in names), sorted(p.name for p in folder.iterdir())
    records = []
    for index, name in enumerate(names):
        shard = _lines(folder / name)
        assert all(llm_beam.shard_of(r["id"], NUM_SHARDS) == index for r in shard)
        records += shard
    return sorted(records, key=lambda r: str(r["id"]))


def _by_id(path):
    return sorted(_lines(path), key=lambda r: str(r["id"]))


def _same_outputs(reference, beam_folder, kinds, summary, beam_summary, keys):
    for kind in kinds:
        want = _by_id(reference / f"{kind}.jsonl")
        assert _shards(beam_folder, kind) == want, kind
    for key in keys:
        assert beam_summary[key] == summary[key], key
    assert beam_summary["runner"] == "beam"
    assert json.loads((beam_folder / "summary.json").read_text()) == beam_summary


def test_filter_pairs_pipeline_equals_the_in_process_stage(tmp_path):
    source = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:7] + [""] + PAIRS[7:])
    summary = llm_filter.filter_pairs(str(source), RuleLLM(), str(tmp_path / "reference"),
                                      FILTER_CONFIG)
    beam_summary = llm_beam.filter_pairs(str(source), RuleLLM(), str(tmp_path / "beam"),
                                         FILTER_CONFIG, num_shards=NUM_SHARDS)
    _same_outputs(tmp_path / "reference", tmp_path / "beam", ("kept", "dropped"), summary,
                  beam_summary, ("read", "scored", "kept", "dropped", "drop_rate",
                                 "dropped_by_reason", "bad_records", "bad_replies", "config"))
    assert beam_summary["kept"] == 5 and beam_summary["bad_records"]["duplicate_id"] == 1


def test_synthesize_queries_pipeline_equals_the_in_process_stage(tmp_path):
    source = _write_jsonl(tmp_path / "passages.jsonl",
                          PASSAGES + [{"id": "p1", "text": "again => again SEED"}])
    config = synthetic.SynthesisConfig(batch_size=2)
    summary = synthetic.synthesize_queries(str(source), RuleLLM(), str(tmp_path / "reference"),
                                           config)
    beam_summary = llm_beam.synthesize_queries(str(source), RuleLLM(), str(tmp_path / "beam"),
                                               config, num_shards=NUM_SHARDS)
    _same_outputs(tmp_path / "reference", tmp_path / "beam", ("kept", "dropped"), summary,
                  beam_summary, ("read", "generated", "kept", "dropped", "drop_rate",
                                 "dropped_by_reason", "bad_passages", "bad_replies"))
    assert beam_summary["kept"] == 4 and beam_summary["bad_replies"] == {
        "unparseable_reply": 2, "grade_outside_scale": 0}


def test_synthesize_classification_pipeline_equals_the_in_process_stage(tmp_path):
    summary = sc.synthesize_classification(TASK, ListWriterLLM(), str(tmp_path / "reference"),
                                           CLASSIFICATION_CONFIG)
    beam_summary = llm_beam.synthesize_classification(
        TASK, ListWriterLLM(), str(tmp_path / "beam"), CLASSIFICATION_CONFIG,
        num_shards=NUM_SHARDS)
    _same_outputs(tmp_path / "reference", tmp_path / "beam", ("lists", "kept", "dropped"),
                  summary, beam_summary,
                  ("labels", "lists_generated", "lists_unparseable", "items_listed",
                   "items_sampled", "texts_generated", "kept", "dropped", "drop_rate",
                   "dropped_by_reason", "bad_replies", "task", "config"))
    assert beam_summary["kept"] == 6 and beam_summary["bad_replies"] == {"unparseable_reply": 5}


def test_cli_usage(capsys):
    assert prepare.main(["beam"]) == 2
    assert "gemb data beam {filter-pairs,synthesize-queries" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the stage's own flags, checked before Beam starts
        prepare.main(["beam", "filter-pairs", "--input", "x.jsonl", "--out", "o"])
    assert "--llm" in capsys.readouterr().err


def test_cli_with_a_model_folder_loads_it_once_per_worker(tmp_path_factory, tmp_path,
                                                          monkeypatch, capsys):
    """`gemb data beam filter-pairs --llm MODEL_DIR`: the TINY decoder is loaded once (in the
    DoFn's setup) for several batches, and grades as the in-process command does."""
    from tiny_checkpoints import write_tiny_llm_folder

    from gemb.llm import decoder

    model_folder = write_tiny_llm_folder(tmp_path_factory, ["0", "1", "2", "3", "Rating"])
    loads = []
    load = decoder.GemmaDecoder.from_model_dir.__func__

    def counted(cls, *args, **kwargs):
        loads.append(args)
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(decoder.GemmaDecoder, "from_model_dir", classmethod(counted))
    source = _write_jsonl(tmp_path / "pairs.jsonl", [
        {"id": f"r{i}", "query": "what is the capital of france",
         "positive": " ".join(["paris is the capital", "of france", "python code"][: i % 3 + 1])}
        for i in range(5)])
    common = ["--input", str(source), "--llm", str(model_folder), "--batch_size", "2"]
    assert prepare.main(["filter-pairs", *common, "--out", str(tmp_path / "reference")]) == 0
    assert len(loads) == 1
    assert prepare.main(["beam", "filter-pairs", *common, "--out", str(tmp_path / "beam"),
                         "--num_shards", "2", "--", "--direct_num_workers=1"]) == 0
    assert len(loads) == 2  # one worker: one load for all its batches
    beam_summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert beam_summary["scored"] == 5 and beam_summary["num_shards"] == 2
    reference = {r["id"]: r for name in ("kept.jsonl", "dropped.jsonl")
                 for r in _lines(tmp_path / "reference" / name)}
    records = {r["id"]: r for kind in ("kept", "dropped") for i in range(2)
               for r in _lines(tmp_path / "beam" / llm_beam.shard_name(kind, i, 2))}
    assert sorted(records) == sorted(reference)
    for identifier, record in records.items():  # batches may differ: equal up to float noise
        assert record["relevance"] == pytest.approx(reference[identifier]["relevance"],
                                                    abs=1e-4)
        assert {k: v for k, v in record.items() if k != "relevance"} == {
            k: v for k, v in reference[identifier].items() if k != "relevance"}


def test_mine_negatives_pipeline_equals_the_in_process_stage(tmp_path):
    from gemb.data import hard_negatives as mining
    from gemb.data import sources
    from test_hard_negatives import WordOverlapLLM, _bag_of_words_embed, _corpus_and_queries

    corpus, queries = _corpus_and_queries()
    config = mining.MiningConfig(top_k=6, min_rank=2, num_negatives=2, max_passage_chars=15)
    reference = tmp_path / "reference" / "negatives.jsonl"
    summary = mining.mine_hard_negatives(queries, corpus, _bag_of_words_embed, WordOverlapLLM(),
                                         reference, config)
    beam_summary = llm_beam.mine_negatives(queries, corpus, _bag_of_words_embed,
                                           WordOverlapLLM(), str(tmp_path / "beam"), config,
                                           num_shards=NUM_SHARDS)
    records = []
    for index in range(NUM_SHARDS):
        shard = _lines(tmp_path / "beam" / llm_beam.shard_name("negatives", index, NUM_SHARDS))
        assert all(llm_beam.shard_of(r["query_id"], NUM_SHARDS) == index for r in shard)
        records += shard
    assert sorted(records, key=lambda r: r["query_id"]) == sorted(
        _lines(reference), key=lambda r: r["query_id"])
    for key in ("queries", "queries_mined", "neighbours_scored", "negatives_chosen",
                "empty_passages_skipped", "passages_cut_for_the_llm",
                "queries_without_a_negative", "config"):
        assert beam_summary[key] == summary[key], key
    assert summary["passages_cut_for_the_llm"] > 0 and beam_summary["runner"] == "beam"

    # The shards' glob is a hard_negatives_path.
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": i, "text": t}) + "\n" for i, t in corpus.items()))
    (folder / "queries.jsonl").write_text("".join(
        json.dumps({"_id": q.query_id, "text": q.text}) + "\n" for q in queries))
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q.query_id}\t{q.positive_ids[0]}\t1\n" for q in queries))
    via_shards = [r.value["negatives"] for r in sources.read_beir(
        str(folder), "train", hard_negatives_path=str(tmp_path / "beam" / "negatives-*.jsonl"))]
    via_file = [r.value["negatives"] for r in sources.read_beir(
        str(folder), "train", hard_negatives_path=str(reference))]
    assert via_shards == via_file and all(len(n) == 2 for n in via_file)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        list(sources.read_beir(str(folder), "train", hard_negatives_path=str(tmp_path / "no*")))


def test_mine_negatives_commands_with_a_model_folder(tmp_path_factory, tmp_path, capsys):
    """`gemb data mine-negatives` and `gemb data beam mine-negatives` with a TINY folder as
    embedder and LLM, a FAISS index, a reduced corpus and the test split's documents left out:
    the same negatives, never a test document."""
    from tiny_checkpoints import write_tiny_llm_folder

    model_folder = write_tiny_llm_folder(tmp_path_factory, ["Rating", "Passage", "Query"])
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    words = [f"w{i}" for i in range(40, 80)]
    rng = np.random.default_rng(0)
    docs = {f"d{i}": " ".join(rng.choice(words, 8)) for i in range(60)}
    (folder / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": i, "text": t}) + "\n" for i, t in docs.items()))
    (folder / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"q{i}", "text": docs[f"d{i}"][:20]}) + "\n" for i in range(12)))
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t1\n" for i in range(8)))
    test_docs = {f"d{i}" for i in range(8, 12)} | {f"d{i}" for i in range(50, 60)}
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{8 + i % 4}\t{d}\t1\n" for i, d in enumerate(sorted(test_docs))))
    common = ["--beir", str(folder), "--split", "train", "--embedder", str(model_folder),
              "--llm", str(model_folder), "--exclude_split", "test", "--corpus_size", "30",
              "--index", "faiss_hnsw", "--top_k", "4", "--min_rank", "1", "--max_length", "16"]
    out = tmp_path / "mined" / "negatives.jsonl"
    assert prepare.main(["mine-negatives", *common, "--out", str(out)]) == 0
    assert prepare.main(["beam", "mine-negatives", *common, "--out", str(tmp_path / "beam"),
                         "--num_shards", "2"]) == 0
    summary = json.loads((out.parent / "summary.json").read_text())
    assert summary["queries_mined"] == 8 and summary["neighbours_scored"] == 8 * 4
    reference = {r["query_id"]: r for r in _lines(out)}
    mined = {r["query_id"]: r for i in range(2)
             for r in _lines(tmp_path / "beam" / llm_beam.shard_name("negatives", i, 2))}
    assert sorted(mined) == sorted(reference)
    for query_id, record in reference.items():
        assert not {c["id"] for c in record["candidates"]} & test_docs
        assert mined[query_id]["negative_ids"] == record["negative_ids"]
        assert [c["id"] for c in mined[query_id]["candidates"]] == [
            c["id"] for c in record["candidates"]]
