"""Packed batches across hosts: each row's embedding comes from its own host's tokens."""

import json
import sys
from pathlib import Path

import pytest

import mp_harness as harness

SCRIPT = Path(__file__).with_name("packed_rows_script.py")


@pytest.mark.slow
def test_packed_rows_embed_their_own_hosts_texts():
    results = harness.run_python([str(SCRIPT)], 2)
    measured = [json.loads(next(line[len("RESULT "):] for line in r.output.splitlines()
                                if line.startswith("RESULT "))) for r in results]
    for process, values in enumerate(measured):
        assert values["block"] == process
        rows = values["rows_per_role"]["query"]
        # Host 1's slots point past host 0's rows: into the global batch, at its own block.
        if process:
            assert values["max_slot"] >= rows * 4 * process, values
        assert values["max_abs_diff"] <= 1e-5, values
        assert values["min_diff_to_other_blocks"] > 1e-3, values
    print(measured, file=sys.stderr)
