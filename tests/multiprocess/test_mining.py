"""The LLM data path as a job of two JAX processes: hard-negative mining writes what one
process writes, with the LLM work split between them and a crashed job's finished part skipped
on the rerun; gemb's decoder sharded across both processes equals one device."""

import json
from pathlib import Path

import pytest

import mining_script
import mp_harness as harness

SCRIPT = Path(__file__).with_name("mining_script.py")


@pytest.mark.slow
def test_two_processes_mine_as_one_and_shard_the_decoder(tmp_path):
    alone = tmp_path / "one" / "negatives.jsonl"
    one, calls = mining_script.mine(alone)  # the reference: this process alone
    assert one["queries_mined"] == 9 and calls == 18

    # A job that crashed after process 1 finished one query: its part file holds that line.
    shared = tmp_path / "two" / "negatives.jsonl"
    shared.parent.mkdir()
    first_line = alone.read_text().splitlines()[1]  # q1: process 1's first query
    (shared.parent / "negatives.jsonl.part-00001-of-00002").write_text(first_line + "\n")
    results = [json.loads(next(line[len("RESULT "):] for line in r.output.splitlines()
                               if line.startswith("RESULT ")))
               for r in harness.run_python([str(SCRIPT), str(shared)], 2)]

    assert shared.read_text() == alone.read_text()  # merged, in query order
    assert not list(shared.parent.glob("*.part-*"))  # the parts are gone after the merge
    summary = json.loads((shared.parent / "summary.json").read_text())
    assert summary["already_done"] == 1 and summary["queries_mined"] == 8
    assert summary["negatives_chosen"] == one["negatives_chosen"] - 1
    # 8 queries left, split 4 and 4 (2 LLM calls per query), none scored twice.
    assert sorted(r["llm_calls"] for r in results) == [8, 8]

    for result in results:
        decoder = result["decoder"]
        assert decoder["same_tokens"] and decoder["params_span_processes"], decoder
        assert decoder["max_score_diff"] <= 1e-4, decoder
