"""What the trainer reads: the `TrainingData` interface and its two built-in kinds.

As t5x's DatasetConfig + get_dataset_fn: a `TrainingData` is a plain config object (gin builds
it) with a global batch size and the feature converter's settings, and `make(state, shard)`
returns this process's resumable `BatchIterator`. An iterator yields feature dicts of host-local
numpy arrays in exactly the layout the train step consumes (gemb.data.feature_converter: padded
or packed) and has `.state`, a flat dict of ints saved with every checkpoint; making the
iterator again with that state continues with exactly the batch an uninterrupted run would have
produced next.

* `SeqioData`: the real pipeline (gemb.data: seqio tasks, mixtures, task-homogeneous batches).
* `SyntheticData`: random token pairs with learnable structure, for TINY models, tests and
  benchmarks; needs no tokenizer and no TensorFlow. It goes through the same feature converter.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Iterator, Mapping, Optional, Protocol

import numpy as np

from gemb import paths
from gemb.data.feature_converter import (
    FeatureConverter,
    FeatureConverterConfig,
    RoleTokens,
    TokenBatch,
    agree_across_processes,
)
from gemb.data.quality import QualityPolicy
from gemb.data.streaming import PreparedTask, StreamOrder

DataState = Mapping[str, int]


@dataclasses.dataclass(frozen=True)
class DataShard:
    """This process's part of the global batch.

    Attributes:
      index, count: this process's block of the global batch and how many blocks there are
        (Partitioner.data_layout); block `index` holds rows [index * B / count,
        (index + 1) * B / count) of each global batch of B. Processes that differ only along
        model axes share a block and build the same rows.
      row_multiple: each pack group's packed row count is a multiple of this (this process's
        data-parallel devices x the gradient-cache chunks of a microbatch:
        gemb.train.trainer.packed_row_multiple), so the placed batch splits into whole rows per
        device and every role's rows into the chunks.
      pack_groups: the step's microbatches; a packed batch packs each microbatch's examples
        into rows of its own (FeatureConverter pack_groups). A TrainingData must honour both
        (the built-in ones pass them to their FeatureConverter); the Trainer checks the groups.
    """

    index: int = 0
    count: int = 1
    row_multiple: int = 1
    pack_groups: int = 1

    def __post_init__(self):
        if not 0 <= self.index < self.count or self.row_multiple < 1 or self.pack_groups < 1:
            raise ValueError(f"DataShard(index={self.index}, count={self.count}, "
                             f"row_multiple={self.row_multiple}, pack_groups={self.pack_groups}) "
                             "is not a valid shard.")

    def converter(self, config: FeatureConverterConfig) -> FeatureConverter:
        """The FeatureConverter that writes this shard's batches."""
        return FeatureConverter(config, row_multiple=self.row_multiple, shard_index=self.index,
                                pack_groups=self.pack_groups)


class BatchIterator(Protocol):
    """Feature dicts of this process's rows, resumable from `state`."""

    @property
    def state(self) -> dict[str, int]: ...

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...

    def __next__(self) -> dict[str, np.ndarray]: ...


class TrainingData(abc.ABC):
    """The training input of a run (see the module docstring).

    Subclasses are dataclasses with at least `batch_size` (the GLOBAL batch) and `features`
    (the feature converter's settings, which fix the batch layout).
    """

    batch_size: int
    features: FeatureConverterConfig

    @property
    def packed(self) -> bool:
        return self.features.pack

    @abc.abstractmethod
    def make(self, state: Optional[DataState], shard: DataShard) -> BatchIterator:
        """This process's iterator, continuing from `state` ({} or None: from the start)."""


# ----------------------------------------------------------------------------- synthetic data


def _synthetic_features() -> FeatureConverterConfig:
    # length_buckets=() keeps every row at the full length: one compiled shape per run.
    return FeatureConverterConfig(query_length=16, document_length=24, length_buckets=())


@dataclasses.dataclass
class SyntheticData(TrainingData):
    """Query i and its positive share a random 'topic' of tokens; negatives are other topics.

    Attributes:
      batch_size: global batch size.
      vocab_size: token ids are drawn from [3, vocab_size).
      num_negatives: hard negatives per example (K).
      num_topics: the structure to learn: examples of one topic are positives of each other.
      seed: data seed.
      features: the feature converter's settings; query_length / document_length are also the
        longest texts drawn (text lengths vary from half of that up).
    """

    batch_size: int = 16
    vocab_size: int = 512
    num_negatives: int = 0
    num_topics: int = 1024
    seed: int = 0
    features: FeatureConverterConfig = dataclasses.field(default_factory=_synthetic_features)

    def make(self, state: Optional[DataState] = None,
             shard: DataShard = DataShard()) -> "SyntheticIterator":
        return SyntheticIterator(self, dict(state or {}), shard)


class SyntheticIterator:
    def __init__(self, spec: SyntheticData, state: DataState, shard: DataShard):
        self.spec = spec
        if state and state.get("seed", spec.seed) != spec.seed:
            raise ValueError(f"data state was saved with seed={state['seed']} but this run has "
                             f"seed={spec.seed}; resume with the same seed.")
        if spec.batch_size % shard.count:
            raise ValueError(f"SyntheticData.batch_size={spec.batch_size} does not split over "
                             f"{shard.count} processes.")
        self.batch_index = int(state.get("batch_index", 0))
        self.shard = shard
        self.converter = shard.converter(spec.features)
        rng = np.random.default_rng([spec.seed, 99])
        self.topics = rng.integers(3, spec.vocab_size, size=(spec.num_topics, 8))

    @property
    def state(self) -> dict[str, int]:
        return {"seed": self.spec.seed, "batch_index": self.batch_index}

    def __iter__(self):
        return self

    def _text(self, rng, topic, max_length) -> np.ndarray:
        """Text ids (no special tokens) of max_length // 2 .. max_length tokens."""
        length = int(rng.integers(max_length // 2, max_length + 1))
        ids = rng.integers(3, self.spec.vocab_size, size=length)
        picks = rng.integers(0, self.topics.shape[1], size=length)
        return np.where(rng.random(length) < 0.6, self.topics[topic][picks], ids).astype(np.int32)

    def __next__(self) -> dict[str, np.ndarray]:
        spec, features = self.spec, self.spec.features
        rng = np.random.default_rng([spec.seed, self.batch_index])
        self.batch_index += 1
        b, k = spec.batch_size, spec.num_negatives
        query_room = features.query_length - features.num_special_tokens
        document_room = features.document_length - features.num_special_tokens
        # The whole global batch is drawn on every process (it is cheap), then each keeps its
        # rows: the batch does not depend on the process count.
        topics = rng.integers(0, spec.num_topics, size=b)
        queries = [self._text(rng, t, query_room) for t in topics]
        positives = [self._text(rng, t, document_room) for t in topics]
        negatives = [self._text(rng, int(rng.integers(0, spec.num_topics)), document_room)
                     for _ in range(b * k)]
        per = b // self.shard.count
        lo, hi = self.shard.index * per, (self.shard.index + 1) * per
        batch = TokenBatch(RoleTokens.from_lists(queries[lo:hi]),
                           RoleTokens.from_lists(positives[lo:hi]),
                           RoleTokens.from_lists(negatives[lo * k:hi * k]),
                           np.full(per, k, np.int32), task="synthetic")
        plan = self.converter.plan(batch)
        layout = agree_across_processes(plan.layout) if self.shard.count > 1 else None
        return self.converter.convert(plan, layout)


# -------------------------------------------------------------------------------- seqio data


@dataclasses.dataclass
class SeqioData(TrainingData):
    """The gemb.data pipeline: a mixture of seqio tasks in task-homogeneous batches.

    Attributes:
      batch_size: global batch size (each process builds batch_size / processes examples).
      vocabulary_dir: a model folder holding tokenizer.model (or a tokenizer file path).
      mixture: a mixture name of gemb.data.mixtures (or your own with rates).
      rates: {task: rate}; None uses the mixture's default rates.
      split: the split to train on.
      seed: the data seed (task choice and example order).
      features: the feature converter's settings (lengths, packing, K); gin:
        `SeqioData.features = @FeatureConverterConfig()`.
      quality: what the tasks do with bad records.
      templates: per-task prompt overrides, {task name: PromptTemplate or {field: value}}.
      prefetch: tf.data batches prepared ahead per in-memory task.
      prepared: {task name: folder written by `gemb data prepare`} (local or gs://): these tasks
        stream from their shards (gemb.data.streaming), already tokenised; name them in
        `rates` beside in-memory tasks or alone. A mixture of prepared tasks only imports
        neither seqio nor TensorFlow and needs no vocabulary_dir (when given, each folder's
        vocabulary fingerprint must match it).
      stream_order: how prepared tasks are read (readers, interleave, shuffle window).
    """

    batch_size: int = 32
    vocabulary_dir: Any = None
    mixture: str = "gemb_quickstart"
    rates: Optional[Mapping[str, float]] = None
    split: str = "train"
    seed: int = 0
    features: FeatureConverterConfig = FeatureConverterConfig(query_length=128,
                                                               document_length=512)
    quality: QualityPolicy = QualityPolicy()
    templates: Optional[Mapping[str, Any]] = None
    prefetch: int = 2
    prepared: Optional[Mapping[str, str]] = None
    stream_order: StreamOrder = StreamOrder()

    def vocabulary(self):
        from gemb.data import vocab

        if self.vocabulary_dir is None:
            raise ValueError("SeqioData.vocabulary_dir is not set; bind it to the model folder "
                             "holding tokenizer.model (e.g. the init_from folder).")
        path = paths.as_path(self.vocabulary_dir)
        if path.is_dir():
            for name in ("tokenizer.model", "tokenizer.json"):
                if (path / name).is_file():
                    path = path / name
                    break
            else:
                raise FileNotFoundError(f"{self.vocabulary_dir} holds no tokenizer.model or "
                                        "tokenizer.json.")
        if path.suffix == ".json":
            return vocab.TokenizerJsonVocabulary(path)
        return vocab.gemma3_vocabulary(path)

    def prepared_tasks(self) -> dict[str, PreparedTask]:
        """The prepared tasks, each checked against the run's vocabulary when it has one."""
        from gemb.data import prepared

        tasks = {name: PreparedTask(name, str(folder)) for name, folder in (self.prepared or {}).items()}
        if tasks and self.vocabulary_dir is not None:
            tokenizer = prepared.tokenizer_file(self.vocabulary_dir)
            digest = prepared.vocabulary_fingerprint(tokenizer)["sha256"]
            for task in tasks.values():
                expected = task.info().vocabulary.get("sha256")
                if expected != digest:
                    raise ValueError(
                        f"prepared task {task.name!r} ({task.folder}) was tokenised with another "
                        f"vocabulary than {tokenizer} (sha256 {str(expected)[:12]}... vs "
                        f"{digest[:12]}...); prepare it again with --tokenizer {self.vocabulary_dir}.")
        return tasks

    def make(self, state: Optional[DataState] = None, shard: DataShard = DataShard()):
        from gemb.data import batching

        prepared_tasks = self.prepared_tasks()
        entries: list = []
        in_memory_rates = None  # the mixture's default rates
        if prepared_tasks:
            if self.rates is None:
                raise ValueError(
                    f"SeqioData.prepared names {sorted(prepared_tasks)}, but SeqioData.rates is "
                    "not set: give every task of the run a rate, e.g. SeqioData.rates = "
                    f"{{{', '.join(repr(n) + ': 1.0' for n in prepared_tasks)}}}.")
            entries = [(prepared_tasks[name], float(rate)) for name, rate in self.rates.items()
                       if name in prepared_tasks and rate > 0]
            in_memory_rates = {name: rate for name, rate in self.rates.items()
                               if name not in prepared_tasks}
        elif self.rates is not None:
            in_memory_rates = dict(self.rates)
        if in_memory_rates is None or in_memory_rates:
            # seqio (and TensorFlow) only for in-memory tasks.
            from gemb.data import mixtures

            mixture = mixtures.build_mixture(self.vocabulary(), name=self.mixture,
                                             rates=in_memory_rates, policy=self.quality,
                                             template_overrides=self.templates)
            entries = [(task, float(mixture.get_rate(task))) for task in mixture.tasks] + entries
        return batching.TaskHomogeneousBatcher(
            entries, batch_size=self.batch_size,
            converter=shard.converter(self.features),
            split=self.split, seed=self.seed,
            shard_info=batching.ShardInfo(index=shard.index, num_shards=shard.count),
            state=dict(state or {}) or None, prefetch=self.prefetch,
            stream_order=self.stream_order)

