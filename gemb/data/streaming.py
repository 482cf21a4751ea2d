"""Streaming reads of prepared tasks: each process reads only its own shards, resumably.

A prepared split (gemb.data.prepared) is N ArrayRecord shards. It is read by R *readers*
(`StreamOrder.num_readers`, by default one per process); reader r owns the shards r, r + R,
r + 2R, ... and each process runs a contiguous block of R / P readers, so a process opens only
its own files. Every global batch takes B / R examples from each reader, in reader order: the
global batch therefore depends on R, not on how many processes run the readers, and a
1-process run with R readers produces exactly the batches of an R-process run.

A reader's epoch e is a sequence computed, never stored:

1. its shards in an order drawn from (seed, task, epoch, reader);
2. `cycle_length` shards at a time interleaved record by record (round robin, a shard that runs
   out drops out of the cycle), group after group;
3. cut to the epoch length L, the smallest reader's total, so every reader (and process) has
   the same number of examples per epoch and a task's position is one integer shared by all
   processes (as in the in-memory batcher; the few examples past L differ from epoch to epoch);
4. shuffled in windows of `shuffle_window` consecutive positions, window w by its own
   permutation drawn from (seed, task, epoch, reader, w): a bounded shuffle buffer.

Position p of epoch e maps to (shard, record) by arithmetic, so resuming at any position reads
only the window it falls in: the state saved with a checkpoint is how many examples of the
task this process has consumed (gemb.data.batching), nothing else. Records are read with
ArrayRecord's random-access reader as a few contiguous ranges per window.

No TensorFlow, seqio or tokenizer is imported: the examples were tokenised offline.

Why not grain or tf.data: tf.data would bring TensorFlow into every training process; grain's
iterators checkpoint a per-pipeline state blob per process, while gemb's task-homogeneous
mixtures need a task's position to be one integer that every process agrees on and that
continues on resume; with ArrayRecord's reader underneath, that position arithmetic is all a
streaming source needs.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import zlib
from concurrent import futures
from typing import Optional, Sequence

import numpy as np

from gemb.data import prepared
from gemb.data.feature_converter import RoleTokens, TokenBatch

log = logging.getLogger(__name__)

_SHARD_ORDER_SALT = 0x5A4D
_WINDOW_SALT = 0x3C1F


@dataclasses.dataclass(frozen=True)
class StreamOrder:
    """How prepared tasks are read.

    Attributes:
      num_readers: R, the readers every global batch is split over (a multiple of the process
        count, at most the number of shards); None: one per process. Fix it to keep the data
        order when the process count changes, or to compare runs on different process counts.
      cycle_length: shards a reader interleaves at once.
      shuffle_window: consecutive examples shuffled together (the shuffle buffer).
      prefetch: windows read ahead in a background thread.
    """

    num_readers: Optional[int] = None
    cycle_length: int = 8
    shuffle_window: int = 4096
    prefetch: int = 1

    def __post_init__(self):
        if self.num_readers is not None and self.num_readers < 1:
            raise ValueError(f"StreamOrder.num_readers must be >= 1, got {self.num_readers}")
        if self.cycle_length < 1 or self.shuffle_window < 1 or self.prefetch < 0:
            raise ValueError(f"StreamOrder needs cycle_length >= 1, shuffle_window >= 1 and "
                             f"prefetch >= 0, got {self}")


@dataclasses.dataclass(frozen=True)
class PreparedTask:
    """A task prepared by `gemb data prepare`, read from `folder` (local or gs://)."""

    name: str
    folder: str

    def info(self) -> prepared.PreparedInfo:
        return prepared.read_info(self.folder)


def _task_key(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


class _Group:
    """Round-robin interleave of a few shards: position k -> (shard, record), vectorised."""

    def __init__(self, shards: Sequence[int], sizes: Sequence[int]):
        self.shards = np.asarray(shards, np.int64)
        sizes = np.asarray(sizes, np.int64)
        self.total = int(sizes.sum())
        # Between consecutive distinct sizes v_i < v_{i+1}, rounds t in [v_i, v_{i+1}) hold
        # the shards longer than v_i, in group order: a_i of them, one record each per round.
        levels = np.unique(np.concatenate([[0], sizes]))
        self.levels = levels[:-1]
        active = [np.flatnonzero(sizes > v) for v in self.levels]
        self.counts = np.array([len(a) for a in active], np.int64)
        self.active = np.full((len(active), len(sizes)), -1, np.int64)  # [segment, rank]
        for segment, members in enumerate(active):
            self.active[segment, :len(members)] = members
        self.starts = np.concatenate([[0], np.cumsum(self.counts * np.diff(levels))])[:-1]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        segment = np.searchsorted(self.starts, positions, side="right") - 1
        offset = positions - self.starts[segment]
        counts = self.counts[segment]
        rounds = self.levels[segment] + offset // counts
        rank = offset % counts
        return self.shards[self.active[segment, rank]], rounds


class ReaderPlan:
    """One reader's epochs over its shards (see the module docstring)."""

    def __init__(self, task: str, seed: int, reader: int, shard_ids: Sequence[int],
                 shard_sizes: Sequence[int], epoch_length: int, order: StreamOrder):
        self.task, self.seed, self.reader = task, int(seed), reader
        self.shard_ids = np.asarray(shard_ids, np.int64)
        self.sizes = {int(s): int(n) for s, n in zip(shard_ids, shard_sizes)}
        self.epoch_length = epoch_length
        self.order = order
        self._groups: dict[int, tuple[list[_Group], np.ndarray]] = {}

    def _epoch_groups(self, epoch: int) -> tuple[list[_Group], np.ndarray]:
        cached = self._groups.get(epoch)
        if cached is None:
            rng = np.random.default_rng([self.seed, _SHARD_ORDER_SALT, _task_key(self.task),
                                         epoch, self.reader])
            shards = rng.permutation(self.shard_ids)
            cycle = self.order.cycle_length
            groups = [_Group(chunk, [self.sizes[int(s)] for s in chunk])
                      for chunk in (shards[i:i + cycle] for i in range(0, len(shards), cycle))]
            cached = groups, np.cumsum([0] + [g.total for g in groups])
            # The reading thread may be an epoch ahead of the batches: keep two epochs. The
            # dict is replaced, never changed in place, so the other thread sees either one.
            self._groups = {**{e: g for e, g in self._groups.items() if e >= epoch - 1},
                            epoch: cached}
        return cached

    def locate(self, epoch: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, record) of stream positions (before the window shuffle) of `epoch`."""
        groups, starts = self._epoch_groups(epoch)
        group_of = np.searchsorted(starts, positions, side="right") - 1
        shard = np.empty(len(positions), np.int64)
        record = np.empty(len(positions), np.int64)
        for g in np.unique(group_of):
            where = group_of == g
            shard[where], record[where] = groups[g].locate(positions[where] - starts[g])
        return shard, record

    def window(self, epoch: int, window: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard, record) of window `window` of `epoch`, in shuffled order."""
        size = self.order.shuffle_window
        start = window * size
        stop = min(start + size, self.epoch_length)
        positions = np.arange(start, stop, dtype=np.int64)
        rng = np.random.default_rng([self.seed, _WINDOW_SALT, _task_key(self.task), epoch,
                                     self.reader, window])
        return self.locate(epoch, positions[rng.permutation(len(positions))])


def reader_plans(task: str, split: str, info: prepared.PreparedInfo, seed: int,
                 num_readers: int, readers: Sequence[int], order: StreamOrder,
                 where: str = "") -> list[ReaderPlan]:
    split_info = info.split(split, where)
    num_shards = split_info.num_shards
    if num_shards < num_readers:
        raise ValueError(
            f"prepared task {task!r}{where} split {split!r} has {num_shards} shards, fewer than "
            f"the {num_readers} readers (one per process unless StreamOrder.num_readers says "
            f"otherwise): prepare it again with --num_shards >= {num_readers} (a multiple of it "
            "balances the processes best).")
    owned = [list(range(r, num_shards, num_readers)) for r in range(num_readers)]
    totals = [sum(split_info.shard_sizes[s] for s in shards) for shards in owned]
    epoch_length = min(totals)
    if epoch_length == 0:
        raise ValueError(f"prepared task {task!r}{where} split {split!r}: reader "
                         f"{totals.index(0)} of {num_readers} has no examples; prepare it with "
                         "fewer, larger shards or read it with fewer readers.")
    return [ReaderPlan(task, seed, r, owned[r], [split_info.shard_sizes[s] for s in owned[r]],
                       epoch_length, order) for r in readers]


class PreparedStream:
    """A prepared task's examples for this process, B_host at a time (the batcher's stream).

    Args:
      task: the prepared task.
      split: the split to read.
      seed: the run's data seed.
      shard_index, num_shards: this process's block of the global batch and their number.
      batch_size: B_host, this process's examples per batch.
      consumed: examples of this task this process has consumed (the resume position).
      order: readers, interleave and shuffle window.
    """

    def __init__(self, task: PreparedTask, split: str, seed: int, shard_index: int,
                 num_shards: int, batch_size: int, consumed: int,
                 order: StreamOrder = StreamOrder()):
        self.task = task
        self.name = task.name
        where = f" ({task.folder})"
        info = task.info()
        self.num_negatives = info.num_negatives
        num_readers = order.num_readers or num_shards
        if num_readers % num_shards:
            raise ValueError(f"StreamOrder.num_readers={num_readers} must be a multiple of the "
                             f"{num_shards} processes reading the batch.")
        per_process = num_readers // num_shards
        if batch_size % per_process:
            raise ValueError(f"the per-process batch of {batch_size} examples does not split over "
                             f"this process's {per_process} readers; make the global batch a "
                             f"multiple of StreamOrder.num_readers={num_readers}.")
        self.num_readers = num_readers
        self.per_reader = batch_size // per_process
        readers = range(shard_index * per_process, (shard_index + 1) * per_process)
        self.plans = reader_plans(task.name, split, info, seed, num_readers, readers, order, where)
        self.epoch_length = self.plans[0].epoch_length
        self.shard_readers = prepared.split_shards(task.folder, split, info)
        self.order = order
        self.position = consumed // per_process  # per reader: examples consumed
        opened = sorted(int(s) for plan in self.plans for s in plan.shard_ids)
        log.info("prepared task %r (%s): process %d of %d reads shards %s of %d (readers %d-%d "
                 "of %d), from example %d of each reader's epoch of %d.", task.name, split,
                 shard_index, num_shards, opened, len(self.shard_readers), readers[0],
                 readers[-1], num_readers, self.position % self.epoch_length, self.epoch_length)
        self._lock = threading.Lock()
        self._windows: dict[tuple[int, int, int], futures.Future] = {}
        self._pool = (futures.ThreadPoolExecutor(1, thread_name_prefix=f"gemb-read-{task.name}")
                      if order.prefetch else None)

    # -- reading --------------------------------------------------------------------------

    def _read_window(self, reader: int, epoch: int, window: int) -> list[bytes]:
        shards, records = self.plans[reader].window(epoch, window)
        out: list[Optional[bytes]] = [None] * len(shards)
        for shard in np.unique(shards):
            where = np.flatnonzero(shards == shard)
            wanted = records[where]
            low, high = int(wanted.min()), int(wanted.max()) + 1
            with self._lock:  # one ArrayRecord reader per shard, shared by the threads
                block = self.shard_readers[int(shard)].read_range(low, high)
            for slot, record in zip(where, wanted):
                out[slot] = block[record - low]
        return out  # type: ignore[return-value]

    def _window(self, reader: int, epoch: int, window: int) -> list[bytes]:
        key = (reader, epoch, window)
        future = self._windows.pop(key, None)
        records = future.result() if future is not None else self._read_window(*key)
        if self._pool is not None:
            for ahead in range(1, self.order.prefetch + 1):
                next_key = self._next_window(reader, epoch, window, ahead)
                if next_key not in self._windows:
                    self._windows[next_key] = self._pool.submit(self._read_window, *next_key)
        return records

    def _next_window(self, reader: int, epoch: int, window: int, ahead: int):
        per_epoch = -(-self.epoch_length // self.order.shuffle_window)
        window += ahead
        return reader, epoch + window // per_epoch, window % per_epoch

    def _take(self, reader: int, start: int, count: int) -> list[bytes]:
        """`count` records of reader `reader` from its position `start` on (across epochs)."""
        size = self.order.shuffle_window
        out: list[bytes] = []
        position = start
        while len(out) < count:
            epoch, offset = divmod(position, self.epoch_length)
            window, inner = divmod(offset, size)
            records = self._window(reader, epoch, window)
            take = min(count - len(out), len(records) - inner)
            out.extend(records[inner:inner + take])
            position += take
        return out

    def next_records(self) -> list[bytes]:
        """This process's next B_host records, reader block after reader block."""
        records = []
        for reader in range(len(self.plans)):
            records.extend(self._take(reader, self.position, self.per_reader))
        self.position += self.per_reader
        return records

    def next_examples(self) -> list[prepared.PreparedExample]:
        where = f"prepared task {self.name!r}"
        return [prepared.decode_example(r, where) for r in self.next_records()]

    def next_batch(self) -> TokenBatch:
        examples = self.next_examples()
        return examples_to_batch(examples, self.num_negatives, self.name)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for reader in self.shard_readers:
            reader.close()


def examples_to_batch(examples: Sequence[prepared.PreparedExample], num_negatives: int,
                      task: str) -> TokenBatch:
    """Prepared examples -> the batcher's TokenBatch (the in-memory path's layout)."""
    return TokenBatch(
        query=RoleTokens.from_lists([e.query for e in examples]),
        positive=RoleTokens.from_lists([e.positive for e in examples]),
        negatives=RoleTokens.from_lists(
            [n for e in examples for n in _padded_negatives(e, num_negatives)]),
        num_negatives=np.array([len(e.negatives) for e in examples], np.int32),
        task=task,
        example_ids=np.array([e.example_id for e in examples], np.uint64))


def _padded_negatives(example: prepared.PreparedExample, k: int) -> list[np.ndarray]:
    negatives = list(example.negatives[:k])
    return negatives + [np.zeros(0, np.int32)] * (k - len(negatives))

