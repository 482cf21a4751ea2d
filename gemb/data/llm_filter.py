"""LLM filtering of labelled pairs: an LLM judge grades each (query, positive) pair and the pairs
it finds irrelevant (wrong positives in a human-labelled set) are dropped.

The judge is hard-negative mining's graded relevance (gemb.data.hard_negatives): the expected
grade 0..3 under the LLM's probabilities of " 0" .. " 3" after RELEVANCE_PROMPT,

    Rate how well the passage answers the search query, from 0 (irrelevant) to 3 (answers it
    exactly).
    Query: {query}
    Passage: {passage}
    Rating:

Pairs graded at or above `threshold` (1.5 by default: the midpoint of the scale) go to
`kept.jsonl`, the others to `dropped.jsonl` with reason "below_threshold", both as the input
record plus "id" and "relevance", so the dropped ones can be inspected and the threshold chosen
from them. Negatives, when a record has them, pass through unjudged.

Input: JSONL records {id?, query, positive, negatives?}; a record's id is its "id" or else its
line number ("line:N"). kept.jsonl is a jsonl source as it is (fields query / positive /
negatives: gemb.data.sources.PairBuilder, or TripletBuilder(negatives_list_field="negatives")).
The stage resumes after a crash (gemb.data.resumable): ids already in either output file are
skipped. Bad records are counted by kind and the first of each kind logged: missing_field,
wrong_type, empty_text, duplicate_id, unparseable_record, undecodable_bytes (all skipped), and
over_long_text (a query or positive longer than max_chars: cut to max_chars in the prompt, kept
whole in the output). summary.json beside the outputs has the counts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from gemb.data import resumable
from gemb.data.hard_negatives import (GRADE_OUTSIDE_SCALE, RELEVANCE_PROMPT,
                                      count_unusable_grades, expected_grade)
from gemb.progress import Progress

log = logging.getLogger(__name__)

TEXT_FIELDS = ("query", "positive")


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """threshold: pairs with expected relevance >= this are kept (grades 0..3). max_chars:
    texts are cut to this many characters in the LLM prompt. batch_size: pairs per
    log_likelihood call (x4 prompts: one per grade)."""

    threshold: float = 1.5
    max_chars: int = 2000
    batch_size: int = 16

    def __post_init__(self):
        if not 0 <= self.threshold <= 3:
            raise ValueError(f"threshold={self.threshold} must be within the grades 0..3.")
        if self.max_chars < 1 or self.batch_size < 1:
            raise ValueError(f"{self}: max_chars and batch_size must be >= 1.")


def check_text(record: Mapping[str, Any], field: str, max_chars: int, where: str,
               bad: resumable.KindCounter) -> Optional[str]:
    """record[field] as the LLM sees it (cut to max_chars), or None (counted in `bad`) when the
    record cannot be used."""
    if field not in record:
        bad.count("missing_field", f"{where}: no {field!r} field (fields: {sorted(record)})")
        return None
    text = record[field]
    if not isinstance(text, str):
        bad.count("wrong_type", f"{where}: {field!r} is a {type(text).__name__}, not text")
        return None
    if not text.strip():
        bad.count("empty_text", f"{where}: {field!r} is empty")
        return None
    if len(text) > max_chars:
        bad.count("over_long_text", f"{where}: {field!r} has {len(text)} characters; cut to "
                                    f"max_chars={max_chars} for the LLM (kept whole in the output)")
        text = text[:max_chars]
    return text


def with_id(record: Mapping[str, Any], item_id: str) -> dict:
    """The record with its item id as the first field (its own "id" when it has one)."""
    own = record.get("id")
    return {"id": item_id if own is None else own,
            **{k: v for k, v in record.items() if k != "id"}}


def _check_pair(record, config: FilterConfig, where: str, bad: resumable.KindCounter):
    texts = []
    for field in TEXT_FIELDS:
        text = check_text(record, field, config.max_chars, where, bad)
        if text is None:
            return None
        texts.append(text)
    negatives = record.get("negatives")
    if negatives is not None and not (isinstance(negatives, list)
                                      and all(isinstance(n, str) for n in negatives)):
        bad.count("wrong_type", f"{where}: 'negatives' must be a list of texts, got "
                                f"{json.dumps(negatives)[:200]}")
        return None
    return texts


def check_pair(number: int, record: Optional[dict], input_path: str, config: FilterConfig,
               bad: resumable.KindCounter) -> Optional[tuple[str, tuple[dict, str, str]]]:
    """One input line -> (its id, the batch item (record with its id, query, passage as the
    LLM sees them)), or None (counted in `bad`) when it cannot be judged. Duplicate ids are
    the caller's."""
    texts = None if record is None else _check_pair(record, config, f"{input_path}:{number}",
                                                    bad)
    if texts is None:
        return None
    item_id = resumable.record_id(record, number)
    return item_id, (with_id(record, item_id), *texts)


def judge_batch(llm, batch: Sequence[tuple[dict, str, str]], config: FilterConfig,
                replies: Optional[resumable.KindCounter] = None
                ) -> list[tuple[dict, Optional[str]]]:
    """Grade some pairs (record, query, passage): (record + relevance, None) to keep or
    (record + relevance, "below_threshold") to drop, in order; a pair the LLM gave no grade on
    the scale is dropped as "grade_outside_scale" (relevance None; counted in `replies`). The
    one per-batch step of the in-process stage and of the Beam pipeline (gemb.data.llm_beam)."""
    grades = expected_grade(llm, [RELEVANCE_PROMPT.format(query=q, passage=p)
                                  for _, q, p in batch])
    if replies is not None:
        count_unusable_grades(grades, replies, "filter-pairs")
    out = []
    for (record, _, _), grade in zip(batch, grades):
        if np.isnan(grade):
            out.append(({**record, "relevance": None}, GRADE_OUTSIDE_SCALE))
            continue
        scored = {**record, "relevance": round(float(grade), 6)}
        out.append((scored, None if grade >= config.threshold else "below_threshold"))
    return out


def filter_pairs(input_path: str, llm, out_dir: str, config: FilterConfig = FilterConfig(),
                 max_records: Optional[int] = None) -> dict:
    """Runs the stage (module docstring) over the first max_records records; returns the
    summary it also writes. llm: anything with log_likelihood (gemb.llm.interface.LLM)."""
    bad = resumable.KindCounter(log, "bad record")
    replies = resumable.KindCounter(log, "bad LLM reply")
    counts = {"read": 0, "already_done": 0, "scored": 0}
    total = resumable.count_input_lines(input_path, max_records)

    with resumable.KeptAndDropped(out_dir) as output, Progress(
            total, "filtering pairs", unit="record") as progress:
        # Earlier runs' unusable grades too (their pairs are in dropped.jsonl).
        replies.counts[GRADE_OUTSIDE_SCALE] = output.dropped_by_reason.get(GRADE_OUTSIDE_SCALE, 0)

        def judge(batch):
            for record, reason in judge_batch(llm, batch, config, replies):
                if reason is None:
                    output.keep(record)
                else:
                    output.drop(record, reason)
            counts["scored"] += len(batch)
            progress.update(len(batch))

        def check(number, record):
            return check_pair(number, record, input_path, config, bad)

        resumable.process_in_batches(input_path, check, output.done, counts, bad, progress,
                                     config.batch_size, judge, max_records)

    summary = {"stage": "filter-pairs", "input": str(input_path),
               "config": dataclasses.asdict(config), **counts, **output.totals(),
               "bad_records": bad.as_dict(),
               "bad_replies": {GRADE_OUTSIDE_SCALE: 0, **replies.as_dict()}}
    output.write_summary(summary)
    return summary


def build_parser():
    """The stage's flags (also `gemb data beam filter-pairs`'s)."""
    import argparse

    from gemb.llm.interface import add_llm_argument

    parser = argparse.ArgumentParser(
        prog="gemb data filter-pairs",
        description="Grade each (query, positive) pair's relevance 0..3 with an LLM and keep "
                    "those at or above --threshold: DIR/kept.jsonl (a jsonl source for gemb "
                    "train), DIR/dropped.jsonl (with their grades), DIR/summary.json. "
                    "Resumable: rerun the same command after a crash.")
    parser.add_argument("--input", required=True,
                        help="JSONL of {id?, query, positive, negatives?} (local or gs://)")
    add_llm_argument(parser)
    parser.add_argument("--out", required=True, help="output folder (local)")
    parser.add_argument("--threshold", type=float, default=FilterConfig.threshold)
    parser.add_argument("--max_chars", type=int, default=FilterConfig.max_chars)
    parser.add_argument("--batch_size", type=int, default=FilterConfig.batch_size)
    parser.add_argument("--max_records", type=int)
    return parser


def config_from_args(args) -> FilterConfig:
    return FilterConfig(args.threshold, args.max_chars, args.batch_size)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from gemb.llm.interface import llm_from_args

    summary = filter_pairs(args.input, llm_from_args(args), args.out, config_from_args(args),
                           args.max_records)
    print(json.dumps(summary), flush=True)
    return 0
