"""Training data factories the trainer calls: make(state, partitioner) -> resumable iterator.

An iterator yields converter feature dicts (host-local numpy) and has `.state`, a flat dict of
ints saved with every checkpoint; building it again with that state continues with exactly the
batch an uninterrupted run would have produced next.

* `SeqioData`: the real pipeline (gemb.data: seqio tasks, mixtures, task-homogeneous batches).
* `SyntheticData`: random token pairs with learnable structure, for TINY models, tests and
  benchmarks; needs no tokenizer and no TensorFlow.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np


@dataclasses.dataclass
class SyntheticData:
    """Query i and its positive share a random 'topic' of tokens; negatives are other topics.

    Attributes:
      batch_size: global batch size.
      vocab_size: token ids are drawn from [3, vocab_size).
      query_length, document_length: tokens per row (padded; lengths vary per example).
      num_negatives: hard negatives per example (K).
      num_topics: the structure to learn: examples of one topic are positives of each other.
      seed: data seed.
    """

    batch_size: int = 16
    vocab_size: int = 512
    query_length: int = 16
    document_length: int = 24
    num_negatives: int = 0
    num_topics: int = 1024
    seed: int = 0

    def make(self, state: Optional[Mapping[str, int]] = None, num_shards: int = 1,
             shard_index: int = 0) -> "SyntheticIterator":
        return SyntheticIterator(self, dict(state or {}), num_shards, shard_index)


class SyntheticIterator:
    def __init__(self, spec: SyntheticData, state: Mapping[str, int], num_shards: int,
                 shard_index: int):
        self.spec = spec
        if state and state.get("seed", spec.seed) != spec.seed:
            raise ValueError(f"data state was saved with seed={state['seed']} but this run has "
                             f"seed={spec.seed}; resume with the same seed.")
        self.batch_index = int(state.get("batch_index", 0))
        self.num_shards, self.shard_index = num_shards, shard_index
        rng = np.random.default_rng([spec.seed, 99])
        self.topics = rng.integers(3, spec.vocab_size, size=(spec.num_topics, 8))

    @property
    def state(self) -> dict[str, int]:
        return {"seed": self.spec.seed, "batch_index": self.batch_index}

    def __iter__(self):
        return self

    def _text(self, rng, topic, length):
        used = int(rng.integers(length // 2, length + 1))
        ids = rng.integers(3, self.spec.vocab_size, size=length)
        picks = rng.integers(0, self.topics.shape[1], size=length)
        ids = np.where(rng.random(length) < 0.6, self.topics[topic][picks], ids)
        ids[0] = 2
        tokens = np.where(np.arange(length) < used, ids, 0).astype(np.int32)
        return tokens

    def __next__(self) -> dict[str, np.ndarray]:
        spec = self.spec
        rng = np.random.default_rng([spec.seed, self.batch_index])
        self.batch_index += 1
        b, k = spec.batch_size, spec.num_negatives
        topics = rng.integers(0, spec.num_topics, size=b)
        queries = np.stack([self._text(rng, t, spec.query_length) for t in topics])
        positives = np.stack([self._text(rng, t, spec.document_length) for t in topics])
        negatives = np.stack([self._text(rng, int(rng.integers(0, spec.num_topics)),
                                         spec.document_length)
                              for _ in range(b * k)]) if k else np.zeros((0, spec.document_length), np.int32)
        features: dict[str, np.ndarray] = {}
        for role, tokens in (("query", queries), ("positive", positives), ("negatives", negatives)):
            segments = (tokens != 0).astype(np.int32)
            features[f"{role}_tokens"] = tokens
            features[f"{role}_segment_ids"] = segments
            features[f"{role}_positions"] = (np.cumsum(segments, axis=1) - 1).clip(0).astype(np.int32) * segments
            features[f"{role}_segment_mask"] = np.ones((tokens.shape[0], 1), bool)
        features["query_slot"] = np.arange(b, dtype=np.int32)
        features["positive_slot"] = np.arange(b, dtype=np.int32)
        features["negative_slot"] = np.arange(b * k, dtype=np.int32).reshape(b, k)
        features["negative_mask"] = np.ones((b, k), bool)
        features["query_hash"] = _hash_rows(queries)
        features["positive_hash"] = _hash_rows(positives)
        features["negative_hash"] = _hash_rows(negatives).reshape(b, k)
        if self.num_shards > 1:
            per = b // self.num_shards
            lo = self.shard_index * per
            features = _take_rows(features, lo, lo + per, k)
        return features


def _hash_rows(tokens: np.ndarray) -> np.ndarray:
    if tokens.shape[0] == 0:
        return np.zeros((0,), np.int32)
    weights = np.arange(1, tokens.shape[1] + 1, dtype=np.int64) * 1_000_003
    return ((tokens.astype(np.int64) * weights).sum(axis=1) % (2**31 - 1)).astype(np.int32)


def _take_rows(features, lo, hi, k):
    out = {}
    for key, value in features.items():
        if key.startswith("negatives_"):
            out[key] = value[lo * k:hi * k]
        else:
            out[key] = value[lo:hi]
    out["query_slot"] = out["query_slot"] - lo
    out["positive_slot"] = out["positive_slot"] - lo
    out["negative_slot"] = out["negative_slot"] - lo * k
    return out


@dataclasses.dataclass
class SeqioData:
    """The gemb.data pipeline: a mixture of seqio tasks in task-homogeneous batches.

    Attributes:
      batch_size: global batch size (each host builds batch_size / hosts examples).
      vocabulary_dir: a model folder holding tokenizer.model (or a tokenizer file path).
      mixture: a mixture name of gemb.data.mixtures (or your own with rates).
      rates: {task: rate}; None uses the mixture's default rates.
      query_length, document_length, pack, num_negatives: the feature converter's settings.
      split: the split to train on.
      seed: the data seed (task choice and example order).
    """

    batch_size: int = 32
    vocabulary_dir: Any = None
    mixture: str = "gemb_quickstart"
    rates: Optional[Mapping[str, float]] = None
    query_length: int = 128
    document_length: int = 512
    pack: bool = False
    num_negatives: Optional[int] = None
    split: str = "train"
    seed: int = 0

    def vocabulary(self):
        from gemb.data import vocab

        if self.vocabulary_dir is None:
            raise ValueError("SeqioData.vocabulary_dir is not set; bind it to the model folder "
                             "holding tokenizer.model (e.g. the init_from folder).")
        path = Path(self.vocabulary_dir)
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

    def make(self, state: Optional[Mapping[str, int]] = None, num_shards: int = 1,
             shard_index: int = 0, row_multiple: int = 1):
        import seqio

        from gemb.data import batching, feature_converter, mixtures

        mixture = mixtures.build_mixture(self.vocabulary(), name=self.mixture, rates=self.rates)
        converter = feature_converter.FeatureConverter(feature_converter.FeatureConverterConfig(
            query_length=self.query_length, document_length=self.document_length, pack=self.pack,
            num_negatives=self.num_negatives, row_multiple=row_multiple))
        return batching.TaskHomogeneousBatcher(
            mixture, batch_size=self.batch_size, converter=converter, split=self.split,
            seed=self.seed, shard_info=seqio.ShardInfo(index=shard_index, num_shards=num_shards),
            state=dict(state or {}) or None)
