"""Bad-data accounting: every rejected record is counted, and the first of each kind is logged.

Records are checked in Python, where a source turns its raw records (JSON objects, TSV/CSV rows,
TFDS examples) into examples, before anything reaches TensorFlow. The reasons:

  empty_text         a text field is empty or only whitespace
  missing_field      a field the task needs is absent (or a TSV row has too few columns)
  wrong_type         a field holds a number, list, null ... where text is expected
  undecodable_bytes  the text was not valid UTF-8 (files are decoded with surrogateescape, so
                     the bad bytes survive as lone surrogates and are caught here)
  over_long_text     a text field is longer than `QualityPolicy.max_chars` characters
  unparseable_record a line that is not valid JSON / not a JSON object, or a score that is not
                     a number

Counts are kept per task and per reason in a `QualityReport` (one per task and split, reachable
through `report_for` / `all_reports`). With `on_bad_data="skip"` a bad record is dropped, counted,
and the first one of each reason is logged as a warning with the record itself; with "fatal" the
first bad record raises `BadDataError` naming the task, the place and what to do.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from typing import Any, Mapping, Optional


log = logging.getLogger(__name__)

REASONS = (
    "empty_text",
    "missing_field",
    "wrong_type",
    "undecodable_bytes",
    "over_long_text",
    "unparseable_record",
)
ON_BAD_DATA = ("skip", "fatal")
# How much of an offending record a log line or an error message shows.
_RECORD_PREVIEW_CHARS = 300


class BadDataError(ValueError):
    """A bad record under on_bad_data='fatal'."""


@dataclasses.dataclass(frozen=True)
class QualityPolicy:
    """What a task does with bad records.

    Attributes:
      on_bad_data: "skip" (count, log the first of each reason, drop) or "fatal" (raise).
      max_chars: texts longer than this (in characters) are over-long. Tokenisation truncates
        anyway; a text this long is almost always a parsing accident (a whole file in one field).
    """

    on_bad_data: str = "skip"
    max_chars: int = 100_000

    def __post_init__(self):
        if self.on_bad_data not in ON_BAD_DATA:
            raise ValueError(f"on_bad_data must be one of {ON_BAD_DATA}, got {self.on_bad_data!r}")
        if self.max_chars <= 0:
            raise ValueError(f"max_chars must be positive, got {self.max_chars}")


class RejectRecord(Exception):
    """Raised by example builders for a bad record; the source counts it and moves on."""

    def __init__(self, reason: str, field: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown bad-data reason {reason!r}; known: {REASONS}")
        super().__init__(f"{reason} in field {field!r}" + (f": {detail}" if detail else ""))
        self.reason = reason
        self.field = field
        self.detail = detail


def preview(record: Any) -> str:
    text = repr(record)
    if len(text) > _RECORD_PREVIEW_CHARS:
        text = text[:_RECORD_PREVIEW_CHARS] + f"... ({len(text)} chars)"
    return text


class QualityReport:
    """Per-reason counts and the first offending record of each reason, for one task split."""

    def __init__(self, task: str, split: str, policy: QualityPolicy):
        self.task = task
        self.split = split
        self.policy = policy
        self.records_seen = 0
        self.examples_kept = 0
        self.counts: collections.Counter[str] = collections.Counter()
        self.first_offender: dict[str, tuple[str, str, str]] = {}  # reason -> (location, message, record)

    @property
    def num_bad(self) -> int:
        return sum(self.counts.values())

    def reject(self, error: RejectRecord, location: str, record: Any) -> None:
        """Counts one bad record; raises under the fatal policy, logs the first of each reason."""
        self.counts[error.reason] += 1
        message = (
            f"task {self.task!r} ({self.split}): bad record at {location}: {error}. "
            f"Record: {preview(record)}"
        )
        if self.policy.on_bad_data == "fatal":
            raise BadDataError(
                message + ". Fix or remove the record, or set QualityPolicy.on_bad_data='skip' to "
                "drop bad records (they are counted and the first of each kind is logged)."
            )
        if error.reason not in self.first_offender:
            self.first_offender[error.reason] = (location, str(error), preview(record))
            log.warning(
                "%s Skipped (on_bad_data='skip'); further %s records of this task are counted, "
                "not logged.",
                message,
                error.reason,
            )

    def as_dict(self) -> dict:
        return {
            "task": self.task,
            "split": self.split,
            "records_seen": self.records_seen,
            "examples_kept": self.examples_kept,
            "bad": {reason: self.counts[reason] for reason in REASONS if self.counts[reason]},
        }

    def summary(self) -> str:
        bad = ", ".join(f"{r}={n}" for r, n in self.as_dict()["bad"].items()) or "none"
        return (
            f"task {self.task!r} ({self.split}): {self.examples_kept} of {self.records_seen} records "
            f"kept; bad: {bad}"
        )


_REPORTS: dict[tuple[str, str], QualityReport] = {}
_LOCK = threading.Lock()


def new_report(task: str, split: str, policy: QualityPolicy) -> QualityReport:
    """A fresh report for a task split (replacing an older one: counts are per build)."""
    report = QualityReport(task, split, policy)
    with _LOCK:
        _REPORTS[(task, split)] = report
    return report


def report_for(task: str, split: str) -> Optional[QualityReport]:
    return _REPORTS.get((task, split))


def all_reports() -> dict[tuple[str, str], QualityReport]:
    with _LOCK:
        return dict(_REPORTS)


def bad_data_counts() -> dict[str, dict[str, int]]:
    """{task: {reason: count}} over every split read so far (for logs and metrics)."""
    totals: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for (task, _), report in all_reports().items():
        totals[task].update(report.counts)
    return {task: dict(counts) for task, counts in totals.items()}


def check_text(record: Mapping[str, Any], field: str, policy: QualityPolicy, allow_empty: bool = False) -> str:
    """The text in `record[field]`, or RejectRecord with the reason it cannot be used."""
    if not isinstance(record, Mapping):
        raise RejectRecord("unparseable_record", field, f"record is a {type(record).__name__}, not an object")
    if field not in record:
        raise RejectRecord("missing_field", field, f"fields present: {sorted(map(str, record))}")
    return check_text_value(record[field], field, policy, allow_empty)


def check_text_value(value: Any, field: str, policy: QualityPolicy, allow_empty: bool = False) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise RejectRecord("undecodable_bytes", field, str(error)) from None
    if not isinstance(value, str):
        raise RejectRecord("wrong_type", field, f"expected text, got {type(value).__name__} {preview(value)}")
    if _has_lone_surrogate(value):
        raise RejectRecord("undecodable_bytes", field, "text holds bytes that are not valid UTF-8")
    if not allow_empty and not value.strip():
        raise RejectRecord("empty_text", field)
    if len(value) > policy.max_chars:
        raise RejectRecord("over_long_text", field, f"{len(value)} characters > max_chars={policy.max_chars}")
    return value


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True
