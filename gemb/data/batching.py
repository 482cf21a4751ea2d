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

A task's examples go source (in memory) -> index order -> seqio preprocessors (templates,
tokenisation) in tf.data, B_host = global_batch_size / H at a time; the feature converter
(gemb.data.feature_converter) then cuts, pads or packs them in numpy, planning each batch once.
"""

from __future__ import annotations

import atexit
import logging
import weakref
import zlib
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import seqio
import tensorflow as tf

from gemb import quiet_imports
from gemb.data import sources
from gemb.data.feature_converter import (
    FeatureConverter,
    RoleTokens,
    TokenBatch,
    agree_across_processes,
)

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


class _TaskStream:
    """One task's examples for this host, B_host at a time, from a given position on."""

    def __init__(self, task: seqio.Task, split: str, seed: int, shard: seqio.ShardInfo, batch_size: int,
                 consumed: int, prefetch: int):
        source = task.source
        if not hasattr(source, "examples"):
            raise TypeError(
                f"task {task.name!r} has a {type(source).__name__}; the resumable batcher needs an "
                "in-memory source with examples(split) (gemb.data.sources.InMemoryExampleSource)."
            )
        self.task = task
        self.examples = source.examples(split)
        self.num_examples = len(self.examples[sources.QUERY])
        self.epoch_length = self.num_examples // shard.num_shards
        if self.epoch_length == 0:
            raise ValueError(
                f"task {task.name!r} split {split!r} has {self.num_examples} examples, fewer than the "
                f"{shard.num_shards} hosts reading it; drop it from the mixture or use fewer hosts."
            )
        self.num_negatives = int(self.examples[sources.NEGATIVES].shape[1])
        # A pipeline's start is where TensorFlow and SentencePiece print their start-up lines.
        with quiet_imports.native_stderr_filtered():
            self._iterator = self._build(seed, shard, batch_size, consumed, prefetch)
        self._started = False

    def _build(self, seed, shard, batch_size, consumed, prefetch):
        task_name, n, epoch_length = self.task.name, self.num_examples, self.epoch_length
        first_epoch, first_offset = divmod(consumed, epoch_length)

        def index_chunks():
            epoch, offset = first_epoch, first_offset
            while True:
                yield epoch_order(seed, task_name, epoch, n, shard.index, shard.num_shards)[offset:]
                epoch, offset = epoch + 1, 0

        tensors = sources.arrays_to_tensors(self.examples)
        dataset = tf.data.Dataset.from_generator(
            index_chunks, output_signature=tf.TensorSpec([None], tf.int64)
        ).unbatch()
        dataset = dataset.map(lambda i: {k: tf.gather(v, i) for k, v in tensors.items()})
        # Preprocessors are deterministic (no random ops), so the seed only satisfies seqio.
        dataset = self.task.preprocess_precache(dataset, seed=seed)
        # No sequence lengths: texts are cut once, by the feature converter.
        dataset = self.task.preprocess_postcache(dataset, sequence_length=None, seed=seed)
        dataset = dataset.map(_flatten_negatives, num_parallel_calls=tf.data.AUTOTUNE)
        dataset = dataset.ragged_batch(batch_size)
        dataset = dataset.map(_ragged_to_flat, num_parallel_calls=tf.data.AUTOTUNE)
        return dataset.prefetch(prefetch).as_numpy_iterator()

    def next_batch(self) -> TokenBatch:
        if self._started:
            flat = next(self._iterator)
        else:
            with quiet_imports.native_stderr_filtered():
                flat = next(self._iterator)
            self._started = True
        batch_size = len(flat["query_lengths"])
        return TokenBatch(
            query=RoleTokens(flat["query_values"], flat["query_lengths"]),
            positive=RoleTokens(flat["positive_values"], flat["positive_lengths"]),
            negatives=RoleTokens(flat["negatives_values"], flat["negatives_lengths"].reshape(-1)),
            num_negatives=flat["num_negatives"].reshape(batch_size).astype(np.int32),
            task=self.task.name,
        )


def _flatten_negatives(example):
    negatives = example["negatives"]
    return {
        "query": example["query"],
        "positive": example["positive"],
        "negatives_values": negatives.flat_values,
        "negatives_lengths": tf.cast(negatives.row_lengths(), tf.int64),
        "num_negatives": tf.cast(example[sources.NUM_NEGATIVES], tf.int32),
    }


def _ragged_to_flat(batch):
    out = {"negatives_lengths": batch["negatives_lengths"], "num_negatives": batch["num_negatives"]}
    for key, name in (("query", "query"), ("positive", "positive"), ("negatives_values", "negatives")):
        ragged = batch[key]
        out[f"{name}_values"] = ragged.flat_values
        if key != "negatives_values":
            out[f"{name}_lengths"] = ragged.row_lengths()
    return out


class TaskHomogeneousBatcher:
    """Iterator of model feature batches, one task per batch (see the module docstring).

    Args:
      tasks: a seqio Mixture (or its registered name) or a sequence of (task or name, rate).
      batch_size: the GLOBAL batch size; each host produces batch_size / num_shards examples.
      converter: pads or packs token ids into model features.
      split: the split of every task to read.
      seed: the run's data seed.
      shard_info: this host's seqio.ShardInfo; None means jax.process_index() of
        jax.process_count().
      state: a `state` dict saved earlier, to continue from.
      agree_on_layout: makes all hosts use one layout (see agree_across_processes); None uses
        it when there is more than one host.
      prefetch: tf.data batches prepared ahead per task.
    """

    def __init__(
        self,
        tasks: Union[seqio.Mixture, str, Sequence[tuple[Union[seqio.Task, str], float]]],
        batch_size: int,
        converter: Optional[FeatureConverter] = None,
        split: str = "train",
        seed: int = 0,
        shard_info: Optional[seqio.ShardInfo] = None,
        state: Optional[Mapping[str, int]] = None,
        agree_on_layout: Optional[LayoutAgreement] = None,
        prefetch: int = 2,
    ):
        self.task_rates = _resolve_tasks(tasks)
        if shard_info is None:
            import jax

            shard_info = seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())
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
        rates = np.array([rate for _, rate in self.task_rates], np.float64)
        if np.any(rates <= 0):
            raise ValueError(f"mixture rates must be positive, got {dict((t.name, r) for t, r in self.task_rates)}")
        self._cumulative = np.cumsum(rates / rates.sum())
        self.last_task: Optional[str] = None
        self._streams: dict[str, _TaskStream] = {}
        self.restore(state or {})
        _LIVE_BATCHERS.add(self)

    def close(self) -> None:
        """Releases the tf.data pipelines (they are rebuilt on the next batch)."""
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
        for name, consumed in sorted(self._consumed.items()):
            out[_CONSUMED + name] = consumed
        return out

    def restore(self, state: Mapping[str, int]) -> None:
        """Continues from `state` (an earlier `state`); {} starts from the beginning."""
        state = {k: int(v) for k, v in dict(state).items()}
        if state:
            for key, mine in (("seed", self.seed), ("num_shards", self.shard_info.num_shards)):
                if key in state and state[key] != mine:
                    raise ValueError(
                        f"data state was saved with {key}={state[key]} but this batcher has {key}={mine}; "
                        "resume with the same seed and host count (or start the data from scratch)."
                    )
        self._batch_index = state.get("batch_index", 0)
        self._consumed = {name: state.get(_CONSUMED + name, 0) for name in self.task_names}
        unknown = [k[len(_CONSUMED):] for k in state if k.startswith(_CONSUMED) and k[len(_CONSUMED):] not in self._consumed]
        if unknown:
            log.warning("data state names tasks no longer in the mixture (ignored): %s", unknown)
        self._streams: dict[str, _TaskStream] = {}

    def _stream(self, task: seqio.Task) -> _TaskStream:
        stream = self._streams.get(task.name)
        if stream is None:
            stream = _TaskStream(
                task, self.split, self.seed, self.shard_info, self.host_batch_size,
                self._consumed[task.name], self.prefetch,
            )
            self._streams[task.name] = stream
        return stream

    def prepare(self) -> None:
        """Reads every task's source and starts its pipeline now rather than on its first batch.

        The first batch of a task otherwise pays for reading (and checking) its whole source,
        and for the docstring corpus possibly building it: call this before timing steps.
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
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        plan = self.converter.plan(self.next_token_batch())
        layout = None if self.agree_on_layout is None else self.agree_on_layout(plan.layout)
        return self.converter.convert(plan, layout)


def _resolve_tasks(tasks) -> list[tuple[seqio.Task, float]]:
    if isinstance(tasks, str):
        tasks = seqio.get_mixture_or_task(tasks)
    if isinstance(tasks, seqio.Mixture):
        return [(task, float(tasks.get_rate(task))) for task in tasks.tasks]
    if isinstance(tasks, seqio.Task):
        return [(tasks, 1.0)]
    resolved = []
    for task, rate in tasks:
        if isinstance(task, str):
            task = seqio.TaskRegistry.get(task)
        resolved.append((task, float(rate)))
    names = [t.name for t, _ in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"a task appears twice in the mixture: {names}")
    return resolved
