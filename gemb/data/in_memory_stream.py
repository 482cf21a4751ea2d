"""One in-memory seqio task's examples for this host, B_host at a time (the batcher's stream).

The examples of a task's split are held in memory (gemb.data.sources.InMemoryExampleSource);
the epoch order is computed (gemb.data.batching.epoch_order), and templates and tokenisation run
as the task's seqio preprocessors in a tf.data pipeline. This is the one stream that needs
TensorFlow; prepared tasks (gemb.data.streaming) are read without it.
"""

from __future__ import annotations

import numpy as np
import seqio
import tensorflow as tf

from gemb import quiet_imports
from gemb.data import sources
from gemb.data.batching import epoch_order
from gemb.data.feature_converter import RoleTokens, TokenBatch


class InMemoryStream:
    """One task's examples for this host, B_host at a time, from a given position on."""

    def __init__(self, task: seqio.Task, split: str, seed: int, shard: seqio.ShardInfo, batch_size: int,
                 consumed: int, prefetch: int):
        self.name = task.name
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

    def close(self) -> None:
        self._iterator = None  # releases the tf.data pipeline

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
