"""The bookkeeping every LLM data stage shares: resumable JSONL outputs and bad-input counts.

A stage writes one JSON line per finished item, keyed by the item's id, and flushes every line,
so a crash loses at most the item in progress. Run again on the same output, it reads the ids
already written (`done_ids`) and skips them: nothing finished is repeated, and the output ends
up line for line the same as an uninterrupted run's. A crash can leave a torn last line (no
newline); readers ignore it and `AppendWriter` cuts it off before appending, so the rewritten
item starts on a line of its own.

Bad inputs (a missing field, an empty text, an unparseable LLM reply, ...) are counted by kind
with `KindCounter`: the first of each kind is logged as a warning with what was wrong, every one
is counted, and the counts go into `summary.json` beside the output (`write_summary`).

Stages that judge items write two such files in one folder, `kept.jsonl` and `dropped.jsonl`
(`KeptAndDropped`); an item is done when it is in either. Their inputs are JSONL files read by
`read_input_records` (local or gs://), each record's id its "id" field or else its line number.

Outputs are local files (appending needs a local disk; gs:// objects cannot be appended to).
"""

from __future__ import annotations

import collections
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"
_CHUNK = 1 << 16


def read_records(path: str | os.PathLike) -> Iterator[dict]:
    """The complete JSON objects of an output file, in order (none when it does not exist). A
    line that does not parse (the torn last line a crash leaves) is skipped."""
    path = Path(path)
    if not path.exists():
        return
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


def done_ids(path: str | os.PathLike, key: str = "id") -> set[str]:
    """The ids (`record[key]`, as strings) already written to an output file."""
    return {str(record[key]) for record in read_records(path) if key in record}


def cut_torn_tail(path: str | os.PathLike) -> int:
    """Cuts a last line that has no newline (a crash mid-write) off the file; returns the number
    of bytes removed (0 when the file is whole or absent)."""
    path = Path(path)
    if not path.exists():
        return 0
    with path.open("rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return 0
        end = size  # scan back, a chunk at a time, for the last newline
        keep = 0
        while end > 0:
            start = max(0, end - _CHUNK)
            handle.seek(start)
            newline = handle.read(end - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        handle.truncate(keep)
    log.warning("%s: cut a torn last line of %d bytes (a crash mid-write); its item is redone.",
                path, size - keep)
    return size - keep


class AppendWriter:
    """Appends JSON records to a file, one per line, flushed as each is written (a context
    manager). Opening cuts a torn last line off first."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut_torn_tail(self.path)
        self._handle = self.path.open("a", encoding="utf-8")
        self.written = 0

    def write(self, record: Mapping[str, Any]) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        self.written += 1

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "AppendWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def write_summary(output_path: str | os.PathLike, counts: Mapping[str, Any]) -> Path:
    """Writes `counts` as summary.json beside `output_path` (a file; for an output folder, pass
    a file inside it); returns the summary's path."""
    summary_path = Path(output_path).parent / SUMMARY_NAME
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(dict(counts), indent=2) + "\n", encoding="utf-8")
    return summary_path


class KindCounter:
    """Counts occurrences by kind and logs the first of each kind (with its detail) as a
    warning, so a million bad records make one log line per kind and exact counts."""

    def __init__(self, logger: logging.Logger = log, what: str = "bad input"):
        self.logger = logger
        self.what = what
        self.counts: collections.Counter[str] = collections.Counter()

    def count(self, kind: str, detail: str = "") -> None:
        self.counts[kind] += 1
        if self.counts[kind] == 1:
            self.logger.warning("%s (%s): %s [only the first of this kind is logged; all are "
                                "counted in %s]", self.what, kind, detail or kind, SUMMARY_NAME)

    def __getitem__(self, kind: str) -> int:
        return self.counts[kind]

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


# ------------------------------------------------------------------------- inputs and outputs


def count_input_lines(path: str | os.PathLike, max_records: Optional[int] = None) -> int:
    """Non-blank lines of an input file (at most max_records): the total a progress bar shows."""
    from gemb import paths

    count = 0
    with paths.as_path(path).open("rb") as handle:
        for line in handle:
            if line.strip():
                count += 1
                if max_records is not None and count >= max_records:
                    break
    return count


def read_input_records(path: str | os.PathLike, bad: KindCounter,
                       max_records: Optional[int] = None
                       ) -> Iterator[tuple[int, Optional[dict]]]:
    """(1-based line number, JSON object) per non-blank line of a JSONL file (local or gs://),
    the first max_records of them. A line that is not UTF-8 or not a JSON object is counted in
    `bad` (undecodable_bytes / unparseable_record) and comes as (line number, None)."""
    from gemb import paths

    read = 0
    with paths.as_path(path).open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            if max_records is not None and read >= max_records:
                return
            read += 1
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                bad.count("undecodable_bytes", f"{where}: not UTF-8 ({error})")
                yield number, None
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                bad.count("unparseable_record", f"{where}: invalid JSON ({error})")
                yield number, None
                continue
            if not isinstance(record, dict):
                bad.count("unparseable_record",
                          f"{where}: a JSON {type(record).__name__}, not an object")
                yield number, None
                continue
            yield number, record


def process_in_batches(input_path: str | os.PathLike, check, done: set[str],
                       counts: dict[str, int], bad: KindCounter, progress, batch_size: int,
                       process, max_records: Optional[int] = None) -> None:
    """The loop every stage runs over its input: read each record, `check(number, record)` it
    (-> (id, item), or None when it is bad and was counted), drop a repeated id (the first is
    kept) and ids already `done`, and call `process(batch)` on every `batch_size` items left.
    Skipped records advance `progress` here; processed ones are `process`'s to count."""
    seen: set[str] = set()
    batch: list = []
    for number, record in read_input_records(input_path, bad, max_records):
        counts["read"] += 1
        checked = check(number, record)
        if checked is not None and checked[0] in seen:
            bad.count("duplicate_id", f"{input_path}:{number}: id {checked[0]!r} again "
                                      "(the first is kept)")
            checked = None
        if checked is None:
            progress.update(1)
            continue
        item_id, item = checked
        seen.add(item_id)
        if item_id in done:
            counts["already_done"] += 1
            progress.update(1)
            continue
        batch.append(item)
        if len(batch) == batch_size:
            process(batch)
            batch = []
    if batch:
        process(batch)


def record_id(record: Mapping[str, Any], line_number: int) -> str:
    """An input record's item id: its "id" field (as a string), else "line:N"."""
    value = record.get("id")
    return f"line:{line_number}" if value is None else str(value)


def kept_and_dropped_totals(kept: int, dropped_by_reason: Mapping[str, int]) -> dict[str, Any]:
    """A judging stage's summary totals: kept, dropped, drop_rate, dropped_by_reason."""
    dropped = sum(dropped_by_reason.values())
    judged = kept + dropped
    return {"kept": kept, "dropped": dropped,
            "drop_rate": round(dropped / judged, 6) if judged else 0.0,
            "dropped_by_reason": dict(sorted(dropped_by_reason.items()))}


class KeptAndDropped:
    """An output folder of `kept.jsonl` and `dropped.jsonl`, records keyed by "id" (a context
    manager). `done` holds the ids in either file when it was opened; the totals count both
    files, earlier runs included, and the dropped ones by their "reason"."""

    KEPT, DROPPED = "kept.jsonl", "dropped.jsonl"

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.kept_path = self.out_dir / self.KEPT
        self.dropped_path = self.out_dir / self.DROPPED
        kept = done_ids(self.kept_path)
        self.dropped_by_reason: collections.Counter[str] = collections.Counter()
        dropped = set()
        for record in read_records(self.dropped_path):
            if "id" in record:
                dropped.add(str(record["id"]))
                self.dropped_by_reason[str(record.get("reason"))] += 1
        self.done = kept | dropped
        self.kept = len(kept)
        self._kept_out: Optional[AppendWriter] = None
        self._dropped_out: Optional[AppendWriter] = None

    def __enter__(self) -> "KeptAndDropped":
        self._kept_out = AppendWriter(self.kept_path)
        self._dropped_out = AppendWriter(self.dropped_path)
        return self

    def __exit__(self, *exc_info) -> None:
        for writer in (self._kept_out, self._dropped_out):
            if writer is not None:
                writer.close()

    def keep(self, record: Mapping[str, Any]) -> None:
        self._kept_out.write(record)
        self.kept += 1

    def drop(self, record: Mapping[str, Any], reason: str) -> None:
        self._dropped_out.write({**record, "reason": reason})
        self.dropped_by_reason[reason] += 1

    def totals(self) -> dict[str, Any]:
        return kept_and_dropped_totals(self.kept, self.dropped_by_reason)

    def write_summary(self, counts: Mapping[str, Any]) -> Path:
        return write_summary(self.kept_path, counts)
