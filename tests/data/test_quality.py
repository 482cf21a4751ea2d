"""Each bad-data reason: counted per task and reason, first record logged, skip or fatal."""

import json
import logging

import pytest

from gemb.data import quality, sources
from gemb.data.quality import BadDataError, QualityPolicy

GOOD = {"query": "what is a list", "positive": "a list holds values"}


def _source(tmp_path, name, lines, policy, builder=None):
    path = tmp_path / f"{name}.jsonl"
    with open(path, "wb") as handle:
        for line in lines:
            handle.write(line if isinstance(line, bytes) else json.dumps(line).encode())
            handle.write(b"\n")
    return sources.InMemoryExampleSource(
        name, {"train": lambda: sources.read_jsonl(str(path))}, builder or sources.PairBuilder(), policy=policy
    ), str(path)


BAD_CASES = {
    "empty_text": {"query": "   ", "positive": "x"},
    "missing_field": {"query": "only a query"},
    "wrong_type": {"query": 42, "positive": "x"},
    "undecodable_bytes": b'{"query": "bad \xff\xfe bytes", "positive": "x"}',
    "over_long_text": {"query": "y" * 101, "positive": "x"},
    "unparseable_record": b"{not json",
}


@pytest.mark.parametrize("reason", sorted(BAD_CASES))
def test_bad_record_is_counted_logged_and_skipped(tmp_path, caplog, reason):
    policy = QualityPolicy(on_bad_data="skip", max_chars=100)
    task = f"quality_{reason}"
    source, path = _source(tmp_path, task, [GOOD, BAD_CASES[reason], GOOD, BAD_CASES[reason]], policy)
    with caplog.at_level(logging.WARNING, logger="gemb.data.quality"):
        examples = source.examples("train")
    assert len(examples["query"]) == 2  # the good records survive
    report = quality.report_for(task, "train")
    assert report.counts == {reason: 2}
    assert report.records_seen == 4 and report.examples_kept == 2
    assert quality.bad_data_counts()[task] == {reason: 2}
    # The first offender is logged once, with where it is and what it holds.
    messages = [r.getMessage() for r in caplog.records if task in r.getMessage()]
    assert len(messages) == 1
    assert reason in messages[0] and f"{path}:2" in messages[0] and "Record:" in messages[0]
    assert report.first_offender[reason][0] == f"{path}:2"


@pytest.mark.parametrize("reason", sorted(BAD_CASES))
def test_bad_record_is_fatal_when_asked(tmp_path, reason):
    policy = QualityPolicy(on_bad_data="fatal", max_chars=100)
    task = f"quality_fatal_{reason}"
    source, path = _source(tmp_path, task, [GOOD, BAD_CASES[reason]], policy)
    with pytest.raises(BadDataError) as error:
        source.examples("train")
    message = str(error.value)
    assert task in message and reason in message and f"{path}:2" in message
    assert "on_bad_data='skip'" in message  # says what to do
    assert quality.report_for(task, "train").counts == {reason: 1}


def test_wrong_type_in_a_list_of_negatives(tmp_path):
    builder = sources.TripletBuilder(negatives_list_field="negatives")
    record = {**GOOD, "negatives": ["fine", 3]}
    source, _ = _source(tmp_path, "quality_neg_type", [record, {**GOOD, "negatives": "not a list"},
                                                      {**GOOD, "negatives": ["ok"]}],
                        QualityPolicy(), builder)
    assert len(source.examples("train")["query"]) == 1
    assert quality.report_for("quality_neg_type", "train").counts == {"wrong_type": 2}


def test_a_source_with_nothing_usable_says_so(tmp_path):
    source, _ = _source(tmp_path, "quality_empty", [BAD_CASES["missing_field"]], QualityPolicy())
    with pytest.raises(ValueError, match="no usable examples"):
        source.examples("train")


def test_policy_is_validated():
    with pytest.raises(ValueError, match="on_bad_data"):
        QualityPolicy(on_bad_data="ignore")
