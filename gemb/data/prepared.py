"""Prepared tasks on disk: pre-tokenised examples in ArrayRecord shards plus an info file.

`gemb data prepare` (gemb.data.prepare, an Apache Beam pipeline) writes a folder

    info.json                                   what the folder holds (PreparedInfo)
    train-00000-of-00016.array_record ...       the split's examples, in shards
    validation-00000-of-00002.array_record ...

and gemb.data.streaming reads it while training. This module is the format both sides share; it
imports neither TensorFlow nor Beam, so a training process that reads prepared tasks loads
neither.

Why ArrayRecord: it is random-access (a record is read by its index, so a reader resumes at an
offset without reading what comes before, and a shuffle window is read as a few contiguous
ranges), compressed per group of records, and readable without TensorFlow (TFRecord is
sequential-only and its reader is TensorFlow's). Its writer only writes local files, so a shard
for remote storage is written locally and then copied (gemb.paths).

One record is one example, in a fixed little-endian layout (decoding is a few numpy views):

    magic   4 bytes  b"GEB1"
    id      uint64   the example's id (unique in the task; see gemb.data.prepare.example_id)
    K       uint16   negatives in this example
    lengths uint32   [2 + K]: query, positive, negative 0 .. K-1 (token counts)
    tokens  int32    [sum(lengths)]: the ids, concatenated in that order

Token ids are the task's prompted texts tokenised without special tokens, exactly the ids the
in-memory seqio path produces (gemb.data.preprocessors); the feature converter adds BOS/EOS and
cuts, as for every task.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import tempfile
from typing import Any, Optional, Sequence

import numpy as np

from gemb import paths

FORMAT = "gemb.prepared/1"
INFO_FILE = "info.json"
RECORD_MAGIC = b"GEB1"
_HEADER = struct.Struct("<4sQH")
# group_size 64: records are read in contiguous runs (a shuffle window's share of a shard), so
# compressing 64 together costs no extra reads and shrinks the files.
WRITER_OPTIONS = "group_size:64"


class PreparedDataError(ValueError):
    """A prepared folder or record is not what the format says (names the file and the fix)."""


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


# ------------------------------------------------------------------------------ one record


@dataclasses.dataclass(frozen=True)
class PreparedExample:
    """One example's token ids (no special tokens)."""

    example_id: int
    query: np.ndarray  # int32 [n]
    positive: np.ndarray  # int32 [n]
    negatives: tuple[np.ndarray, ...] = ()

    def lengths(self) -> list[int]:
        return [len(self.query), len(self.positive), *(len(n) for n in self.negatives)]


def encode_example(example: PreparedExample) -> bytes:
    if not 0 <= example.example_id < 2**64:
        raise ValueError(f"example id {example.example_id} does not fit in 64 bits")
    lengths = np.asarray(example.lengths(), "<u4")
    parts = [np.asarray(example.query, "<i4"), np.asarray(example.positive, "<i4"),
             *(np.asarray(n, "<i4") for n in example.negatives)]
    return b"".join([_HEADER.pack(RECORD_MAGIC, example.example_id, len(example.negatives)),
                     lengths.tobytes(), *(p.tobytes() for p in parts)])


def decode_example(record: bytes, where: str = "record") -> PreparedExample:
    try:
        magic, example_id, k = _HEADER.unpack_from(record)
    except struct.error:
        raise PreparedDataError(f"{where}: {len(record)} bytes is too short for a gemb prepared "
                                "record; the shard is damaged or not from `gemb data prepare`.") from None
    if magic != RECORD_MAGIC:
        raise PreparedDataError(f"{where}: starts with {magic!r}, not {RECORD_MAGIC!r}: not a gemb "
                                "prepared record (prepare the task again).")
    offset = _HEADER.size
    lengths = np.frombuffer(record, "<u4", count=2 + k, offset=offset).astype(np.int64)
    offset += 4 * (2 + k)
    expected = offset + 4 * int(lengths.sum())
    if len(record) != expected:
        raise PreparedDataError(f"{where}: {len(record)} bytes where its lengths say {expected}; "
                                "the shard is damaged (prepare the task again).")
    tokens = np.frombuffer(record, "<i4", offset=offset).astype(np.int32)
    pieces = np.split(tokens, np.cumsum(lengths)[:-1])
    return PreparedExample(int(example_id), pieces[0], pieces[1], tuple(pieces[2:]))


# ------------------------------------------------------------------------------ the info file


@dataclasses.dataclass
class SplitInfo:
    """One split of a prepared task."""

    num_examples: int
    shard_sizes: list[int]  # examples per shard, in shard order
    records_seen: int = 0
    filtered: int = 0  # dropped on purpose by the task's rules (not bad)
    duplicates_dropped: int = 0
    bad_records: dict[str, int] = dataclasses.field(default_factory=dict)
    # {role: [[upper bound, count], ...]} over LENGTH_BUCKETS (bound None: longer than all)
    token_lengths: dict[str, list] = dataclasses.field(default_factory=dict)

    @property
    def num_shards(self) -> int:
        return len(self.shard_sizes)


@dataclasses.dataclass
class PreparedInfo:
    """info.json: everything a reader needs to know without opening a shard."""

    task: str
    num_negatives: int  # K: negatives per example (every example of the task has K)
    splits: dict[str, SplitInfo]
    template: dict[str, Any]
    vocabulary: dict[str, str]  # {"file": name, "sha256": digest}
    dedupe: bool = False
    format: str = FORMAT

    def to_json(self) -> str:
        # Sorted keys and no timestamps: preparing the same inputs again writes the same bytes.
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> "PreparedInfo":
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise PreparedDataError(f"{where} has format {raw.get('format')!r}, this gemb reads "
                                        f"{FORMAT!r}; prepare the task again with this gemb.")
            splits = {name: SplitInfo(**split) for name, split in raw.pop("splits").items()}
            return cls(splits=splits, **raw)
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as error:
            raise PreparedDataError(f"{where} is not a prepared task's info file ({error}); "
                                    "prepare the task again.") from None

    def split(self, name: str, where: str = "") -> SplitInfo:
        if name not in self.splits:
            raise PreparedDataError(f"prepared task {self.task!r}{where} has no split {name!r}; "
                                    f"it has {sorted(self.splits)}.")
        return self.splits[name]


def read_info(folder: paths.PathLike) -> PreparedInfo:
    path = paths.as_path(folder) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {folder} is not a prepared task folder "
                                "(write one with `gemb data prepare`).")
    return PreparedInfo.from_json(path.read_text(), str(path))


# Token-length histogram buckets of info.json: lengths <= 1, 2, 4, ..., 65536, and more.
LENGTH_BUCKETS = tuple(2**i for i in range(17))


def tokenizer_file(location: paths.PathLike):
    """The tokenizer.model / tokenizer.json at `location`, or inside a model folder there."""
    path = paths.as_path(location)
    if path.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{location} holds no tokenizer.model or tokenizer.json.")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {location} does not exist.")
    return path


def vocabulary_fingerprint(location: paths.PathLike) -> dict[str, str]:
    """{"file": name, "sha256": digest} of a tokenizer: info.json's record of the vocabulary."""
    import hashlib

    path = tokenizer_file(location)
    return {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


# ------------------------------------------------------------------------------ writing shards


def write_shard(path: paths.PathLike, records: Sequence[bytes]) -> None:
    """Writes one ArrayRecord shard (local, or written locally and copied to remote storage).

    The file appears whole or not at all: it is written under a temporary name and renamed.
    """
    from array_record.python import array_record_module

    path = paths.as_path(path)
    remote = paths.is_remote(path)
    if not remote:
        path.parent.mkdir(parents=True, exist_ok=True)
    directory = None if remote else str(path.parent)
    handle, temporary = tempfile.mkstemp(suffix=".array_record.tmp", dir=directory)
    os.close(handle)
    try:
        writer = array_record_module.ArrayRecordWriter(temporary, WRITER_OPTIONS)
        for record in records:
            writer.write(record)
        writer.close()
        if remote:
            with open(temporary, "rb") as source, path.open("wb") as target:
                shutil.copyfileobj(source, target, 1 << 22)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temporary, 0o666 & ~umask)  # mkstemp made it private
            os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_info(folder: paths.PathLike, info: PreparedInfo) -> None:
    folder = paths.as_path(folder)
    if not paths.is_remote(folder):
        folder.mkdir(parents=True, exist_ok=True)
    (folder / INFO_FILE).write_text(info.to_json())


# ------------------------------------------------------------------------------ reading shards


class ShardReader:
    """Random access to one shard's records (ArrayRecord's reader, opened on first use).

    A remote shard is copied to the local cache first (ArrayRecord's reader opens local files):
    each process copies only the shards it reads.
    """

    def __init__(self, path: paths.PathLike, expected_size: Optional[int] = None):
        self.path = paths.as_path(path)
        self.expected_size = expected_size
        self._reader = None

    def _open(self):
        if self._reader is None:
            from array_record.python import array_record_module

            if not self.path.is_file():
                raise FileNotFoundError(f"{self.path} does not exist; the prepared folder is "
                                        "incomplete (prepare the task again).")
            local = paths.local_copy(self.path)
            try:
                reader = array_record_module.ArrayRecordReader(
                    str(local), "readahead_buffer_size:0")
            except Exception as error:  # noqa: BLE001 - the C++ reader raises plain exceptions
                raise PreparedDataError(f"{self.path} is not a readable ArrayRecord file "
                                        f"({error}); prepare the task again.") from None
            if self.expected_size is not None and reader.num_records() != self.expected_size:
                raise PreparedDataError(
                    f"{self.path} holds {reader.num_records()} records but info.json says "
                    f"{self.expected_size}; the folder mixes two preparations (prepare again).")
            self._reader = reader
        return self._reader

    def __len__(self) -> int:
        return self._open().num_records()

    def read_range(self, start: int, stop: int) -> list[bytes]:
        if stop <= start:
            return []
        return self._open().read(start, stop)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def split_shards(folder: paths.PathLike, split: str, info: PreparedInfo) -> list[ShardReader]:
    """Readers for every shard of `split`, in shard order (files checked against info.json)."""
    folder = paths.as_path(folder)
    split_info = info.split(split, f" in {folder}")
    count = split_info.num_shards
    return [ShardReader(folder / shard_name(split, index, count), size)
            for index, size in enumerate(split_info.shard_sizes)]


# ------------------------------------------------------------------------------ synthetic tasks


def write_synthetic_task(folder: paths.PathLike, num_examples: int, num_shards: int, *,
                         task: str = "synthetic_pairs", split: str = "train",
                         num_negatives: int = 0, vocab_size: int = 32_000, max_length: int = 48,
                         seed: int = 0, chunk: int = 100_000) -> PreparedInfo:
    """A prepared folder of random token pairs, for benchmarks and tests of the streaming path.

    Written chunk by chunk (memory stays flat for any size); example i has id i and lands in
    shard i % num_shards.
    """
    from array_record.python import array_record_module

    folder = paths.as_path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writers = [array_record_module.ArrayRecordWriter(
        str(folder / shard_name(split, index, num_shards)), WRITER_OPTIONS)
        for index in range(num_shards)]
    sizes = [0] * num_shards
    for start in range(0, num_examples, chunk):
        stop = min(start + chunk, num_examples)
        rng = np.random.default_rng([seed, start])
        lengths = rng.integers(4, max_length + 1, size=(stop - start, 2 + num_negatives))
        tokens = rng.integers(3, vocab_size, size=int(lengths.sum()), dtype=np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths.reshape(-1))])
        for row in range(stop - start):
            pieces = [tokens[offsets[row * (2 + num_negatives) + j]:
                             offsets[row * (2 + num_negatives) + j + 1]]
                      for j in range(2 + num_negatives)]
            identifier = start + row
            writers[identifier % num_shards].write(encode_example(
                PreparedExample(identifier, pieces[0], pieces[1], tuple(pieces[2:]))))
            sizes[identifier % num_shards] += 1
    for writer in writers:
        writer.close()
    info = PreparedInfo(task=task, num_negatives=num_negatives,
                        splits={split: SplitInfo(num_examples, sizes, records_seen=num_examples)},
                        template={}, vocabulary={"file": "synthetic", "sha256": ""})
    write_info(folder, info)
    return info
