"""The LLM stages as Beam pipelines (gemb.data.llm_beam) on the DirectRunner's in-process engine:
on the same inputs and the same deterministic stand-in LLMs as the in-process tests, the
pipeline's kept / dropped (and lists) records, sorted by id, equal the in-process stage's
exactly, and so do the summary's counts; one pipeline per stage (Beam starts slowly)."""

import json

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
                                 "dropped_by_reason", "bad_records", "config"))
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
    assert beam_summary["kept"] == 4 and beam_summary["bad_replies"] == {"unparseable_reply": 2}


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
