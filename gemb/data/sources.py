"""Where training examples come from: file readers, example builders and a seqio DataSource.

Three layers, each small:

1. Readers turn a storage format into `RawRecord`s (a location for messages plus the record):
   `read_jsonl`, `read_tsv`, `read_csv` (any tf.io.gfile path: local, gs://, ...; .gz works),
   `read_beir` (corpus / queries / qrels folders -> one record per relevant pair, with the
   qrels' zero-score documents and an optional hard-negative file as negatives), `read_tfds`,
   and `read_docstring_code` (the offline corpus of gemb.data.code_corpus).
2. Example builders turn a raw record into one embedding example, or reject it with a reason
   (gemb.data.quality): `PairBuilder` (query, positive), `TripletBuilder` (k hard negatives),
   `ClassificationBuilder` (text -> label text, optionally other labels as negatives) and
   `StsPairBuilder` (a sentence pair becomes a positive pair when its score reaches a threshold).
3. `InMemoryExampleSource` is the seqio DataSource: it reads and checks every record of a split once,
   keeps the examples in memory as numpy string arrays, and serves them as a tf.data dataset
   (seqio sharding and shuffling included) or, for the resumable batcher, by index.

An example has the string features below (EXAMPLE_FEATURES); K, the number of negative slots, is
fixed per task so every example of a task has the same shape:

  query            []   the query text (no prompt yet: templates are a preprocessor)
  positive         []   the relevant document text
  positive_title   []   its title ("" when none)
  negatives        [K]  hard-negative document texts ("" in unused slots)
  negative_titles  [K]
  num_negatives    []   int32, how many leading slots of `negatives` are used

Sources hold every example in memory: right for fine-tuning sets (thousands to millions of
pairs), not for web-scale pre-finetuning streams, which need a file-sharded source.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from gemb.data import quality
from gemb.data.quality import QualityPolicy, RejectRecord

log = logging.getLogger(__name__)

QUERY = "query"
POSITIVE = "positive"
POSITIVE_TITLE = "positive_title"
NEGATIVES = "negatives"
NEGATIVE_TITLES = "negative_titles"
NUM_NEGATIVES = "num_negatives"
EXAMPLE_FEATURES = (QUERY, POSITIVE, POSITIVE_TITLE, NEGATIVES, NEGATIVE_TITLES, NUM_NEGATIVES)


class RawRecord(NamedTuple):
    """One record as read. `error` is set when the reader could not even parse it."""

    location: str
    value: Any
    error: Optional[RejectRecord] = None


@dataclasses.dataclass(frozen=True)
class Example:
    query: str
    positive: str
    positive_title: str = ""
    negatives: tuple[str, ...] = ()
    negative_titles: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Readers


def _open_binary(path: str):
    # tf.io.gfile reads local, gs://, ... paths alike.
    handle = tf.io.gfile.GFile(path, "rb")
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=handle, mode="rb")
    return handle


def _decoded_lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) with invalid UTF-8 kept as lone surrogates.

    surrogateescape keeps a line with bad bytes readable so that the record is counted and
    reported as undecodable_bytes instead of stopping the whole file.
    """
    with _open_binary(path) as handle:
        for number, raw in enumerate(handle, start=1):
            yield number, raw.decode("utf-8", "surrogateescape").rstrip("\r\n")


def read_jsonl(path: str) -> Iterator[RawRecord]:
    """One JSON object per line; blank lines are ignored."""
    for number, line in _decoded_lines(path):
        if not line.strip():
            continue
        location = f"{path}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            yield RawRecord(location, line, RejectRecord("unparseable_record", "<line>", f"invalid JSON: {error}"))
            continue
        if not isinstance(value, dict):
            yield RawRecord(
                location, value, RejectRecord("unparseable_record", "<line>", f"a JSON {type(value).__name__}, not an object")
            )
            continue
        yield RawRecord(location, value)


def read_tsv(path: str, columns: Optional[Sequence[str]] = None, skip_header: bool = False) -> Iterator[RawRecord]:
    """Tab-separated rows without quoting (quotes are text, as in STSb and SNLI).

    columns: names of the columns in order; None takes them from the first row (the header).
    A row with fewer columns than names lacks the trailing fields (reported as missing_field by
    the builder); extra columns are kept under their index.
    """
    names = list(columns) if columns is not None else None
    for number, line in _decoded_lines(path):
        if not line:
            continue
        cells = line.split("\t")
        if names is None:
            names = cells
            continue
        if skip_header and number == 1:
            continue
        record = {names[i] if i < len(names) else str(i): cell for i, cell in enumerate(cells)}
        yield RawRecord(f"{path}:{number}", record)


def read_csv(path: str, columns: Optional[Sequence[str]] = None, **csv_options) -> Iterator[RawRecord]:
    """CSV (excel dialect by default); columns=None reads names from the header row."""
    with _open_binary(path) as handle:
        # GFile is not an io.RawIOBase, so decode the whole file (sources are read into memory
        # anyway); surrogateescape as in _decoded_lines.
        text = handle.read().decode("utf-8", "surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""), **csv_options)
    names = list(columns) if columns is not None else None
    for cells in reader:
        if names is None:
            names = cells
            continue
        if not cells:
            continue
        record = {names[i] if i < len(names) else str(i): cell for i, cell in enumerate(cells)}
        # reader.line_num is the physical line where the row ended (quoted fields span lines).
        yield RawRecord(f"{path}:{reader.line_num}", record)


def _beir_file(folder: str, stem: str) -> str:
    for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
        path = f"{folder.rstrip('/')}/{name}"
        if tf.io.gfile.exists(path):
            return path
    raise FileNotFoundError(f"BEIR folder {folder!r} has no {stem}.jsonl(.gz)")


def read_beir(
    folder: str,
    split: str,
    hard_negatives_path: Optional[str] = None,
    max_negatives: Optional[int] = None,
) -> Iterator[RawRecord]:
    """Relevant (query, document) pairs of a BEIR folder: corpus, queries and qrels/{split}.tsv.

    Each query-document pair with score > 0 becomes one record {query, positive,
    positive_title, negatives, negative_titles}. Negatives are the query's documents with score
    <= 0 in the qrels and, when `hard_negatives_path` is given, the ids listed there (JSONL
    objects {"query_id": ..., "negative_ids": [...]}; a file or a glob of shards), in that
    order.
    """
    corpus: dict[str, tuple[str, str]] = {}
    for raw in read_jsonl(_beir_file(folder, "corpus")):
        if raw.error is None and "_id" in raw.value:
            corpus[str(raw.value["_id"])] = (raw.value.get("text"), raw.value.get("title") or "")
    queries: dict[str, Any] = {}
    for raw in read_jsonl(_beir_file(folder, "queries")):
        if raw.error is None and "_id" in raw.value:
            queries[str(raw.value["_id"])] = raw.value.get("text")

    qrels_path = f"{folder.rstrip('/')}/qrels/{split}.tsv"
    relevant: dict[str, list[tuple[str, str]]] = {}
    negative_ids: dict[str, list[str]] = {}
    problems: list[RawRecord] = []
    for raw in read_tsv(qrels_path):
        row = raw.value
        try:
            query_id, doc_id, score = row["query-id"], row["corpus-id"], float(row["score"])
        except (KeyError, ValueError) as error:
            problems.append(RawRecord(raw.location, row, RejectRecord("unparseable_record", "score", f"bad qrels row: {error}")))
            continue
        if score > 0:
            relevant.setdefault(query_id, []).append((doc_id, raw.location))
        else:
            negative_ids.setdefault(query_id, []).append(doc_id)
    if hard_negatives_path:
        # A file, or a glob of shards (`gemb data beam mine-negatives` writes negatives-*.jsonl).
        mined_files = sorted(tf.io.gfile.glob(hard_negatives_path))
        if not mined_files:
            raise FileNotFoundError(f"hard_negatives_path {hard_negatives_path!r} matches no "
                                    "file; give the JSONL `gemb data mine-negatives` wrote.")
        for raw in (r for path in mined_files for r in read_jsonl(path)):
            if raw.error is None:
                ids = raw.value.get("negative_ids") or []
                negative_ids.setdefault(str(raw.value.get("query_id")), []).extend(str(i) for i in ids)

    yield from problems
    for query_id, docs in relevant.items():
        negatives = [corpus[d] for d in negative_ids.get(query_id, []) if d in corpus]
        if max_negatives is not None:
            negatives = negatives[:max_negatives]
        for doc_id, location in docs:
            record: dict[str, Any] = {"query_id": query_id, "corpus_id": doc_id}
            # Absent ids leave the field out, so the builder reports them as missing_field.
            if query_id in queries:
                record["query"] = queries[query_id]
            if doc_id in corpus:
                record["positive"], record["positive_title"] = corpus[doc_id]
            record["negatives"] = [text for text, _ in negatives]
            record["negative_titles"] = [title for _, title in negatives]
            yield RawRecord(location, record)


def read_tfds(name: str, split: str, data_dir: Optional[str] = None, download: bool = False) -> Iterator[RawRecord]:
    """Examples of a TFDS dataset as dicts of Python values (bytes stay bytes until checked)."""
    import tensorflow_datasets as tfds

    dataset = tfds.load(name, split=split, data_dir=data_dir, download=download, shuffle_files=False)
    for index, example in enumerate(tfds.as_numpy(dataset)):
        record = {key: (value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value)
                  for key, value in example.items()}
        yield RawRecord(f"tfds:{name}[{split}]#{index}", record)


def read_docstring_code(split: str) -> Iterator[RawRecord]:
    """The offline docstring -> code corpus (built and cached on first use)."""
    from gemb.data import code_corpus

    for index, record in enumerate(code_corpus.read_split(split)):
        yield RawRecord(f"docstring_code[{split}]#{index}:{record['module']}.{record['qualname']}", record)


# ---------------------------------------------------------------------------------------------
# Source specs: a task's raw records as data (picklable), for in-memory reads and Beam jobs alike

SOURCE_FORMATS = ("jsonl", "tsv", "csv", "beir", "tfds", "docstring_code")


@dataclasses.dataclass(frozen=True)
class ReadUnit:
    """One piece of a split a worker reads alone: a file (jsonl / tsv / csv), a BEIR folder's
    split, a TFDS split or the docstring corpus' split. Calling it yields its RawRecords."""

    format: str
    location: str  # a file path, a BEIR folder, a TFDS name or a docstring-corpus split
    split: str
    options: tuple[tuple[str, Any], ...] = ()

    def __call__(self) -> Iterator[RawRecord]:
        options = dict(self.options)
        if self.format == "jsonl":
            return read_jsonl(self.location)
        if self.format == "tsv":
            return read_tsv(self.location, **options)
        if self.format == "csv":
            return read_csv(self.location, **options)
        if self.format == "beir":
            # split_name: the qrels file to read, when the task's split is named otherwise.
            return read_beir(self.location, options.pop("split_name", self.split), **options)
        if self.format == "tfds":
            return read_tfds(self.location, self.split, **options)
        return read_docstring_code(self.split)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """Where a task's raw records are: a format and, per split, file paths or globs (local or
    gs://; jsonl / tsv / csv), a BEIR folder, a TFDS name, or nothing (docstring_code).

    options: the reader's keyword arguments (tsv `columns`, beir `hard_negatives_path`, tfds
    `data_dir`, ...), as (name, value) pairs so the spec stays hashable.
    """

    format: str
    splits: tuple[tuple[str, tuple[str, ...]], ...]
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.format not in SOURCE_FORMATS:
            raise ValueError(f"unknown source format {self.format!r}; known: {SOURCE_FORMATS}")

    @classmethod
    def of(cls, format: str, splits: Mapping[str, Any], **options) -> "SourceSpec":
        """SourceSpec.of("jsonl", {"train": "data/*.jsonl"}, ...): a single location or a list."""
        normalised = tuple((split, (where,) if isinstance(where, str) else tuple(where))
                           for split, where in splits.items())
        return cls(format, normalised, tuple(sorted(options.items())))

    @property
    def split_names(self) -> tuple[str, ...]:
        return tuple(split for split, _ in self.splits)

    def units(self, split: str) -> list[ReadUnit]:
        """The split's read units in a fixed order (globs expanded and sorted)."""
        locations = dict(self.splits).get(split)
        if locations is None:
            raise ValueError(f"the source has no split {split!r}; it has {self.split_names}")
        if self.format in ("jsonl", "tsv", "csv"):
            files: list[str] = []
            for pattern in locations:
                matched = sorted(tf.io.gfile.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
                if not matched:
                    raise FileNotFoundError(f"{pattern} matches no file (split {split!r}).")
                files.extend(matched)
            locations = tuple(files)
        return [ReadUnit(self.format, location, split, self.options) for location in locations]

    def readers(self) -> dict[str, "RecordReader"]:
        """{split: a function returning the split's RawRecords} (InMemoryExampleSource's readers)."""

        def reader(split):
            def read():
                for unit in self.units(split):
                    yield from unit()
            return read

        return {split: reader(split) for split in self.split_names}


# ---------------------------------------------------------------------------------------------
# Example builders: raw record -> Example, None (filtered on purpose), or RejectRecord.


@dataclasses.dataclass(frozen=True)
class PairBuilder:
    """(query, positive) with an optional document title field."""

    query_field: str = "query"
    positive_field: str = "positive"
    title_field: Optional[str] = None

    def __call__(self, record: Mapping[str, Any], policy: QualityPolicy) -> Optional[Example]:
        query = quality.check_text(record, self.query_field, policy)
        positive = quality.check_text(record, self.positive_field, policy)
        title = _optional_title(record, self.title_field, policy)
        return Example(query, positive, title)


@dataclasses.dataclass(frozen=True)
class TripletBuilder:
    """(query, positive, k hard negatives).

    negative_fields: one field per negative (a TSV triplet's "negative" column), or
    negatives_list_field: a field holding a list of negative texts (BEIR, JSONL), with
    negative_titles_field for their titles. A record must have at least `min_negatives`.
    """

    query_field: str = "query"
    positive_field: str = "positive"
    title_field: Optional[str] = None
    negative_fields: tuple[str, ...] = ()
    negatives_list_field: Optional[str] = None
    negative_titles_field: Optional[str] = None
    min_negatives: int = 1

    def __call__(self, record: Mapping[str, Any], policy: QualityPolicy) -> Optional[Example]:
        query = quality.check_text(record, self.query_field, policy)
        positive = quality.check_text(record, self.positive_field, policy)
        title = _optional_title(record, self.title_field, policy)
        negatives = [quality.check_text(record, f, policy) for f in self.negative_fields]
        titles = [""] * len(negatives)
        if self.negatives_list_field is not None:
            listed = record.get(self.negatives_list_field, [])
            if not isinstance(listed, (list, tuple)):
                raise RejectRecord("wrong_type", self.negatives_list_field, f"expected a list, got {type(listed).__name__}")
            negatives += [quality.check_text_value(v, self.negatives_list_field, policy) for v in listed]
            listed_titles = record.get(self.negative_titles_field, []) if self.negative_titles_field else []
            listed_titles = list(listed_titles) + [""] * (len(listed) - len(listed_titles))
            titles += [quality.check_text_value(t, self.negative_titles_field, policy, allow_empty=True)
                       for t in listed_titles[: len(listed)]]
        if len(negatives) < self.min_negatives:
            field = self.negatives_list_field or ",".join(self.negative_fields) or "negatives"
            raise RejectRecord("missing_field", field, f"{len(negatives)} negatives < min_negatives={self.min_negatives}")
        return Example(query, positive, title, tuple(negatives), tuple(titles))


def label_to_text(label: str) -> str:
    """'card_arrival' -> 'card arrival': label ids read better to the model as words."""
    return " ".join(str(label).replace("_", " ").split())


@dataclasses.dataclass(frozen=True)
class ClassificationBuilder:
    """Classification as retrieval: the text is the query, its label's text the positive.

    Many examples share a positive (there are few labels), which is why the loss masks
    duplicate positives through the token hashes. With `labels` and num_label_negatives > 0,
    other labels become hard negatives, picked by a hash of the text (deterministic).
    """

    text_field: str = "text"
    label_field: str = "label"
    label_texts: Optional[Mapping[str, str]] = None
    labels: tuple[str, ...] = ()
    num_label_negatives: int = 0

    def __call__(self, record: Mapping[str, Any], policy: QualityPolicy) -> Optional[Example]:
        text = quality.check_text(record, self.text_field, policy)
        if self.label_field not in record:
            raise RejectRecord("missing_field", self.label_field)
        label = record[self.label_field]
        if isinstance(label, bytes):
            label = quality.check_text_value(label, self.label_field, policy)
        if isinstance(label, bool) or not isinstance(label, (str, int, np.integer)):
            raise RejectRecord("wrong_type", self.label_field, f"expected a label, got {type(label).__name__}")
        label = str(label)
        if not label.strip():
            raise RejectRecord("empty_text", self.label_field)
        positive = (self.label_texts or {}).get(label, label_to_text(label))
        negatives: tuple[str, ...] = ()
        if self.num_label_negatives and self.labels:
            others = [l for l in self.labels if l != label]
            start = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big") % max(len(others), 1)
            picked = [others[(start + i) % len(others)] for i in range(min(self.num_label_negatives, len(others)))]
            negatives = tuple((self.label_texts or {}).get(l, label_to_text(l)) for l in picked)
        return Example(text, positive, "", negatives, ("",) * len(negatives))


@dataclasses.dataclass(frozen=True)
class StsPairBuilder:
    """A scored sentence pair becomes a positive pair when score >= threshold, else it is skipped.

    Pairs below the threshold are not bad data; they are simply not positives, so they are
    filtered without being counted as bad.
    """

    first_field: str = "sentence1"
    second_field: str = "sentence2"
    score_field: str = "score"
    threshold: float = 4.0

    def __call__(self, record: Mapping[str, Any], policy: QualityPolicy) -> Optional[Example]:
        first = quality.check_text(record, self.first_field, policy)
        second = quality.check_text(record, self.second_field, policy)
        if self.score_field not in record:
            raise RejectRecord("missing_field", self.score_field)
        raw_score = record[self.score_field]
        if isinstance(raw_score, bool) or not isinstance(raw_score, (str, bytes, int, float, np.number)):
            raise RejectRecord("wrong_type", self.score_field, f"expected a number, got {type(raw_score).__name__}")
        try:
            score = float(raw_score)
        except ValueError:
            raise RejectRecord("unparseable_record", self.score_field, f"score {raw_score!r} is not a number") from None
        if score < self.threshold:
            return None
        return Example(first, second)


def _optional_title(record: Mapping[str, Any], field: Optional[str], policy: QualityPolicy) -> str:
    if field is None or record.get(field) is None:
        return ""
    return quality.check_text_value(record[field], field, policy, allow_empty=True)


ExampleBuilder = Callable[[Mapping[str, Any], QualityPolicy], Optional[Example]]
RecordReader = Callable[[], Iterable[RawRecord]]


# ---------------------------------------------------------------------------------------------
# The seqio DataSource


class InMemoryExampleSource(seqio.DataSource):
    """Reads and checks every record of a split once; serves examples from memory.

    Args:
      task_name: for bad-data reports and messages.
      readers: {split: a function returning the split's RawRecords}.
      builder: raw record -> Example (see the builders above).
      num_negatives: K, the negative slots of every example; extra negatives are dropped.
      policy: bad-data policy; None uses the default QualityPolicy().
    """

    def __init__(
        self,
        task_name: str,
        readers: Mapping[str, RecordReader],
        builder: ExampleBuilder,
        num_negatives: int = 0,
        policy: Optional[QualityPolicy] = None,
    ):
        # The whole split is shuffled here, so seqio needs no shuffle buffer on top.
        super().__init__(splits=tuple(readers), performs_internal_shuffling=True)
        self.task_name = task_name
        self.readers = dict(readers)
        self.builder = builder
        self.num_negatives = num_negatives
        self.policy = policy
        self._examples: dict[str, dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str) -> Sequence[str]:
        return [split]

    def num_input_examples(self, split: str) -> int:
        return len(self.examples(split)[QUERY])

    def examples(self, split: str) -> dict[str, np.ndarray]:
        """Every example of the split as numpy arrays (EXAMPLE_FEATURES), read once.

        Reading happens on first use, not at registration, so registering a task costs nothing.
        """
        if split not in self.readers:
            raise ValueError(f"task {self.task_name!r} has no split {split!r}; splits: {sorted(self.readers)}")
        with self._lock:
            if split not in self._examples:
                self._examples[split] = self._read(split)
            return self._examples[split]

    def _read(self, split: str) -> dict[str, np.ndarray]:
        policy = self.policy or QualityPolicy()
        report = quality.new_report(self.task_name, split, policy)
        kept: list[Example] = []
        filtered = 0
        for raw in self.readers[split]():
            report.records_seen += 1
            try:
                if raw.error is not None:
                    raise raw.error
                example = self.builder(raw.value, policy)
            except RejectRecord as error:
                report.reject(error, raw.location, raw.value)
                continue
            if example is None:
                filtered += 1
                continue
            kept.append(example)
        report.examples_kept = len(kept)
        log.info("%s; %d filtered by the task's rules", report.summary(), filtered)
        if not kept:
            raise ValueError(
                f"task {self.task_name!r} split {split!r} has no usable examples "
                f"({report.summary()}); check the source path and field names."
            )
        return _to_arrays(kept, self.num_negatives)

    def get_dataset(
        self,
        split: str = "train",
        shuffle: bool = True,
        seed: Optional[int] = None,
        shard_info=None,
        *,
        sequence_length=None,
        use_cached: bool = False,
        num_epochs: Optional[int] = 1,
    ):
        arrays = self.examples(split)
        dataset = tf.data.Dataset.from_tensor_slices(arrays_to_tensors(arrays))
        if shard_info is not None and shard_info.num_shards > 1:
            dataset = dataset.shard(shard_info.num_shards, shard_info.index)
        if shuffle:
            dataset = dataset.shuffle(len(arrays[QUERY]), seed=seed, reshuffle_each_iteration=True)
        return dataset

    def __repr__(self):
        return (f"InMemoryExampleSource(task={self.task_name!r}, splits={self.splits}, "
                f"num_negatives={self.num_negatives})")


def _to_arrays(examples: Sequence[Example], num_negatives: int) -> dict[str, np.ndarray]:
    count = len(examples)
    negatives = np.full((count, num_negatives), "", dtype=object)
    negative_titles = np.full((count, num_negatives), "", dtype=object)
    used = np.zeros(count, np.int32)
    for i, example in enumerate(examples):
        k = min(len(example.negatives), num_negatives)
        negatives[i, :k] = example.negatives[:k]
        negative_titles[i, :k] = example.negative_titles[:k]
        used[i] = k
    return {
        QUERY: np.array([e.query for e in examples], dtype=object),
        POSITIVE: np.array([e.positive for e in examples], dtype=object),
        POSITIVE_TITLE: np.array([e.positive_title for e in examples], dtype=object),
        NEGATIVES: negatives,
        NEGATIVE_TITLES: negative_titles,
        NUM_NEGATIVES: used,
    }


def arrays_to_tensors(arrays: Mapping[str, np.ndarray]) -> dict:
    """numpy object arrays of str -> tf string tensors (UTF-8), keeping shapes like [N, 0]."""
    tensors = {}
    for key, value in arrays.items():
        if value.dtype == object:
            encoded = np.array([s.encode("utf-8") for s in value.reshape(-1)], dtype=object).reshape(value.shape)
            tensors[key] = tf.constant(encoded, dtype=tf.string, shape=value.shape)
        else:
            tensors[key] = tf.constant(value)
    return tensors
