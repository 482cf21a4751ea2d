"""Task-homogeneous batches at mixture rates: deterministic, sharded per host, resumable.

The recipe's fine-tuning draws every batch from ONE task, tasks at mixture rates. Here:

- Batch k's task is a pure function of (seed, k): a uniform draw from a generator seeded with
  both, mapped through the normalised rates. Every host draws the same task without talking to
  the others, and no random state has to be saved.
- Each task is read as a sequence of epochs. Epoch e's order is a permutation of the task's
  examples seeded with (seed, task name, e), the same on every host; host h of H takes positions
  h, h + H, ... of it, cut to N // H examples. Hosts therefore read disjoint examples, every host's
  epoch has the same length (the N mod H examples left out differ from epoch to epoch), and a
  task's position is one integer shared by all hosts: how many examples each host has consumed.
- The state is a flat dict of ints: {"batch_index", "seed", "num_shards", "consumed/<task>"...}.
  Save `batcher.state` with the training checkpoint (it is the same on every host); building a
  batcher with that state continues with exactly the batch an uninterrupted run would have
  produced next. Restoring costs no replay: the example order is computed, not read through.

A task's stream hands B_host = global_batch_size / H examples at a time: an in-memory seqio
task goes source -> index order -> seqio preprocessors (templates, tokenisation) in tf.data
(gemb.data.in_memory_stream); a prepared task (`PreparedTask`, gemb.data.streaming) is read,
already tokenised, from this host's own shards, with the same one-integer position. The feature
converter (gemb.data.feature_converter) then cuts, pads or packs them in numpy, planning each
batch once. This module imports neither TensorFlow nor seqio: a mixture of prepared tasks runs
without them.
"""

from __future__ import annotations

import atexit
import logging
import weakref
import zlib
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np

from gemb.data.feature_converter import FeatureConverter, TokenBatch, agree_across_processes
from gemb.data.streaming import PreparedStream, PreparedTask, StreamOrder

if TYPE_CHECKING:
    import seqio

log = logging.getLogger(__name__)

STATE_VERSION = 1
_CONSUMED = "consumed/"
# Salts keep the task-choice and example-order streams independent for the same seed.
_TASK_CHOICE_SALT = 0x7A5C
_ORDER_SALT = 0x0DE5

Layout = Mapping[str, int]
LayoutAgreement = Callable[[dict[str, int]], dict[str, int]]


_LIVE_BATCHERS: "weakref.WeakSet[TaskHomogeneousBatcher]" = weakref.WeakSet()


@atexit.register
def _close_streams_before_exit():
    # A tf.data generator iterator still open when Python shuts down makes TensorFlow log a
    # frightening (and harmless) error; closing the streams first avoids it.
    for batcher in list(_LIVE_BATCHERS):
        batcher.close()


def task_for_batch(seed: int, batch_index: int, cumulative_rates: np.ndarray) -> int:
    """Index of the task batch `batch_index` comes from (same on every host)."""
    draw = np.random.default_rng([seed, _TASK_CHOICE_SALT, batch_index]).random()
    return int(np.searchsorted(cumulative_rates, draw, side="right").clip(0, len(cumulative_rates) - 1))


def _task_key(name: str) -> int:
    # crc32, unlike hash(), is the same in every process.
    return zlib.crc32(name.encode("utf-8"))


def epoch_order(seed: int, task_name: str, epoch: int, num_examples: int, shard_index: int, num_shards: int) -> np.ndarray:
    """Example indices host `shard_index` reads in `epoch` (length num_examples // num_shards)."""
    permutation = np.random.default_rng([seed, _ORDER_SALT, _task_key(task_name), epoch]).permutation(num_examples)
    per_host = num_examples // num_shards
    return permutation[shard_index::num_shards][:per_host]


class ShardInfo(NamedTuple):
    """This host's block of every global batch (the fields of seqio.ShardInfo)."""

    index: int
    num_shards: int


Stream = Any  # PreparedStream or gemb.data.in_memory_stream.InMemoryStream: next_batch(), close()


class TaskHomogeneousBatcher:
    """Iterator of model feature batches, one task per batch (see the module docstring).

    Args:
      tasks: a seqio Mixture (or its registered name) or a sequence of (task, rate), where a
        task is a seqio Task (or its registered name) or a `PreparedTask` (read by streaming,
        gemb.data.streaming); prepared and in-memory tasks mix freely.
      batch_size: the GLOBAL batch size; each host produces batch_size / num_shards examples.
      converter: pads or packs token ids into model features.
      split: the split of every task to read.
      seed: the run's data seed.
      shard_info: this host's ShardInfo (or seqio.ShardInfo); None means jax.process_index()
        of jax.process_count().
      state: a `state` dict saved earlier, to continue from.
      agree_on_layout: makes all hosts use one layout (see agree_across_processes); None uses
        it when there is more than one host.
      prefetch: tf.data batches prepared ahead per in-memory task.
      stream_order: how prepared tasks are read (readers, interleave, shuffle window).
    """

    def __init__(
        self,
        tasks: Union["seqio.Mixture", str, Sequence[tuple[Union["seqio.Task", PreparedTask, str], float]]],
        batch_size: int,
        converter: Optional[FeatureConverter] = None,
        split: str = "train",
        seed: int = 0,
        shard_info: Optional[ShardInfo] = None,
        state: Optional[Mapping[str, int]] = None,
        agree_on_layout: Optional[LayoutAgreement] = None,
        prefetch: int = 2,
        stream_order: StreamOrder = StreamOrder(),
    ):
        self.task_rates = _resolve_tasks(tasks)
        if shard_info is None:
            import jax

            shard_info = ShardInfo(index=jax.process_index(), num_shards=jax.process_count())
        if batch_size % shard_info.num_shards:
            raise ValueError(
                f"global batch_size={batch_size} must be divisible by the number of hosts "
                f"({shard_info.num_shards})."
            )
        self.batch_size = batch_size
        self.host_batch_size = batch_size // shard_info.num_shards
        self.converter = converter or FeatureConverter()
        self.split = split
        self.seed = int(seed)
        self.shard_info = shard_info
        if agree_on_layout is None and shard_info.num_shards > 1:
            agree_on_layout = agree_across_processes
        self.agree_on_layout = agree_on_layout
        self.prefetch = prefetch
        self.stream_order = stream_order
        self.num_readers = stream_order.num_readers or shard_info.num_shards
        self.has_prepared = any(isinstance(t, PreparedTask) for t, _ in self.task_rates)
        rates = np.array([rate for _, rate in self.task_rates], np.float64)
        if np.any(rates <= 0):
            raise ValueError(f"mixture rates must be positive, got {dict((t.name, r) for t, r in self.task_rates)}")
        self._cumulative = np.cumsum(rates / rates.sum())
        self.last_task: Optional[str] = None
        self.last_batch: Optional[TokenBatch] = None
        self._streams: dict[str, Stream] = {}
        self.restore(state or {})
        _LIVE_BATCHERS.add(self)

    def close(self) -> None:
        """Releases the streams (tf.data pipelines, readers; they are rebuilt on the next batch)."""
        for stream in self._streams.values():
            stream.close()
        self._streams = {}

    @property
    def task_names(self) -> list[str]:
        return [task.name for task, _ in self.task_rates]

    @property
    def state(self) -> dict[str, int]:
        """Where the batcher stands after the last batch it returned (flat dict of ints)."""
        out = {
            "version": STATE_VERSION,
            "seed": self.seed,
            "num_shards": self.shard_info.num_shards,
            "batch_index": self._batch_index,
        }
        if self.has_prepared:
            out["num_readers"] = self.num_readers
        for name, consumed in sorted(self._consumed.items()):
            out[_CONSUMED + name] = consumed
        return out

    def restore(self, state: Mapping[str, int]) -> None:
        """Continues from `state` (an earlier `state`); {} starts from the beginning."""
        state = {k: int(v) for k, v in dict(state).items()}
        if state:
            checks = [("seed", self.seed), ("num_shards", self.shard_info.num_shards)]
            if self.has_prepared:
                checks.append(("num_readers", self.num_readers))
            for key, mine in checks:
                if key in state and state[key] != mine:
                    raise ValueError(
                        f"data state was saved with {key}={state[key]} but this batcher has {key}={mine}; "
                        "resume with the same seed, host count and StreamOrder.num_readers (or "
                        "start the data from scratch)."
                    )
        self.close()
        self._batch_index = state.get("batch_index", 0)
        self._consumed = {name: state.get(_CONSUMED + name, 0) for name in self.task_names}
        unknown = [k[len(_CONSUMED):] for k in state if k.startswith(_CONSUMED) and k[len(_CONSUMED):] not in self._consumed]
        if unknown:
            log.warning("data state names tasks no longer in the mixture (ignored): %s", unknown)

    def _stream(self, task) -> Stream:
        stream = self._streams.get(task.name)
        if stream is None:
            consumed = self._consumed[task.name]
            if isinstance(task, PreparedTask):
                stream = PreparedStream(task, self.split, self.seed, self.shard_info.index,
                                        self.shard_info.num_shards, self.host_batch_size,
                                        consumed, self.stream_order)
            else:
                from gemb.data.in_memory_stream import InMemoryStream

                stream = InMemoryStream(task, self.split, self.seed, self.shard_info,
                                        self.host_batch_size, consumed, self.prefetch)
            self._streams[task.name] = stream
        return stream

    def prepare(self) -> None:
        """Opens every task's stream now rather than on its first batch.

        The first batch of an in-memory task otherwise pays for reading (and checking) its
        whole source, and for the docstring corpus possibly building it: call this before
        timing steps.
        """
        for task, _ in self.task_rates:
            self._stream(task)

    def next_token_batch(self) -> TokenBatch:
        """The next batch's token ids (before padding / packing); advances the state."""
        task, _ = self.task_rates[task_for_batch(self.seed, self._batch_index, self._cumulative)]
        batch = self._stream(task).next_batch()
        self._consumed[task.name] += self.host_batch_size
        self._batch_index += 1
        self.last_task = task.name
        self.last_batch = batch
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        plan = self.converter.plan(self.next_token_batch())
        layout = None if self.agree_on_layout is None else self.agree_on_layout(plan.layout)
        return self.converter.convert(plan, layout)


def _resolve_tasks(tasks) -> list[tuple[Any, float]]:
    """[(seqio Task or PreparedTask, rate)]; seqio is imported only for seqio tasks and names."""
    if isinstance(tasks, PreparedTask):
        return [(tasks, 1.0)]
    if isinstance(tasks, (list, tuple)):
        resolved = []
        for task, rate in tasks:
            if isinstance(task, str):
                import seqio

                task = seqio.TaskRegistry.get(task)
            resolved.append((task, float(rate)))
    else:
        import seqio

        if isinstance(tasks, str):
            tasks = seqio.get_mixture_or_task(tasks)
        if isinstance(tasks, seqio.Mixture):
            resolved = [(task, float(tasks.get_rate(task))) for task in tasks.tasks]
        elif isinstance(tasks, seqio.Task):
            resolved = [(tasks, 1.0)]
        else:
            raise TypeError(f"tasks must be a mixture, a task or [(task, rate)], got {tasks!r}")
    names = [t.name for t, _ in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"a task appears twice in the mixture: {names}")
    return resolved
