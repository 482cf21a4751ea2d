"""seqio preprocessors of the embedding tasks: prompt templates, tokenisation, trimming.

A task's pipeline (gemb.data.tasks) is

  source example (gemb.data.sources.EXAMPLE_FEATURES, strings)
    -> apply_templates   query / positive / negatives become the prompted texts; titles dropped
    -> tokenize_roles    int32 token ids: query [n], positive [n], negatives ragged [K, n]

`num_negatives` passes through unchanged. Texts are neither cut nor given BOS/EOS here: the
feature converter does both, in one place, because how many special tokens a row carries (and
so how much text fits) is a property of the model, not the task.
"""

from __future__ import annotations

from typing import Callable, Mapping

import seqio
import tensorflow as tf

from gemb.data import sources, templates

ROLES = ("query", "positive", "negatives")


def apply_templates(dataset: tf.data.Dataset, template: templates.PromptTemplate) -> tf.data.Dataset:
    """Writes each role with its task's prompt."""

    def render(example):
        out = {key: value for key, value in example.items()
               if key not in (sources.POSITIVE_TITLE, sources.NEGATIVE_TITLES)}
        out[sources.QUERY] = template.query_tf(example[sources.QUERY])
        out[sources.POSITIVE] = template.document_tf(example[sources.POSITIVE], example.get(sources.POSITIVE_TITLE))
        negatives = template.document_tf(example[sources.NEGATIVES], example.get(sources.NEGATIVE_TITLES))
        # Unused slots stay empty (not a prompt around nothing), so they tokenise to no ids.
        in_use = tf.range(tf.shape(negatives)[0]) < tf.cast(example[sources.NUM_NEGATIVES], tf.int32)
        out[sources.NEGATIVES] = tf.where(in_use, negatives, "")
        return out

    return dataset.map(render, num_parallel_calls=tf.data.AUTOTUNE)


def _encode_scalar(vocabulary: seqio.Vocabulary, text: tf.Tensor) -> tf.Tensor:
    return tf.cast(vocabulary.encode_tf(text), tf.int32)


def _encode_vector(vocabulary: seqio.Vocabulary, texts: tf.Tensor) -> tf.RaggedTensor:
    """[K] strings -> ragged [K, None] ids, for any seqio vocabulary."""
    if texts.shape.rank == 1 and texts.shape[0] == 0:  # pair tasks: K = 0, nothing to encode
        return tf.RaggedTensor.from_row_lengths(tf.zeros([0], tf.int32), tf.zeros([0], tf.int64))
    if isinstance(vocabulary, seqio.SentencePieceVocabulary):
        ids = vocabulary.encode_tf(texts)
        return tf.RaggedTensor.from_row_lengths(tf.cast(ids.flat_values, tf.int32), ids.row_lengths())
    # Not every vocabulary's encode_tf accepts a vector (ByteVocabulary needs equal lengths), so
    # the others encode each text on its own (slower: a loop in the graph).
    return tf.map_fn(
        lambda text: _encode_scalar(vocabulary, text),
        texts,
        fn_output_signature=tf.RaggedTensorSpec(shape=[None], dtype=tf.int32, ragged_rank=0),
    )


def tokenize_roles(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
    """Token ids for every role with that role's vocabulary (int32, no special tokens)."""

    def encode(example):
        out = dict(example)
        out[sources.QUERY] = _encode_scalar(output_features["query"].vocabulary, example[sources.QUERY])
        out[sources.POSITIVE] = _encode_scalar(output_features["positive"].vocabulary, example[sources.POSITIVE])
        out[sources.NEGATIVES] = _encode_vector(output_features["negatives"].vocabulary, example[sources.NEGATIVES])
        return out

    return dataset.map(encode, num_parallel_calls=tf.data.AUTOTUNE)


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    """The seqio output features every embedding task declares."""
    return {
        "query": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
        "positive": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
        "negatives": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32, rank=2),
    }


def task_preprocessors(template: templates.PromptTemplate) -> list[Callable]:
    import functools

    return [
        functools.partial(apply_templates, template=template),
        tokenize_roles,
    ]
