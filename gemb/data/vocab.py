"""seqio vocabularies: Gemma 3's SentencePiece model, and an adapter for any tokenizer.json.

seqio vocabularies never add BOS (encode / encode_tf return the tokenizer's ids only); the feature
converter prepends BOS, so that ids here equal gemb.tokenizer.Tokenizer.encode(text, add_bos=False).

seqio reads id 0 as padding everywhere (masks, segment ids, decode_tf after EOS), so both
vocabularies insist that id 0 is the tokenizer's padding token.
"""

from __future__ import annotations

import os

import numpy as np
import seqio
import tensorflow as tf

from gemb import paths
from gemb.tokenizer import Tokenizer


def gemma3_vocabulary(model_path: str | os.PathLike) -> seqio.SentencePieceVocabulary:
    """Gemma 3's vocabulary from a tokenizer.model (Gemma's own, or rebuilt from the GGUF).

    Rebuild one with gemb.checkpoints.gguf_tokenizer.write_sentencepiece_model(gguf, path).
    """
    model_path = paths.as_path(model_path)
    if model_path.suffix == ".gguf":
        raise ValueError(
            f"{model_path} is a GGUF model, not a SentencePiece model; write its tokenizer first with "
            "gemb.checkpoints.gguf_tokenizer.write_sentencepiece_model(gguf_path, 'tokenizer.model')."
        )
    if not model_path.is_file():
        raise FileNotFoundError(
            f"{model_path} does not exist; pass Gemma 3's tokenizer.model (or one rebuilt from the "
            "GGUF with gemb.checkpoints.gguf_tokenizer.write_sentencepiece_model)."
        )
    # seqio opens the model with tf.io.gfile; a remote one is read from a local copy, so gs://
    # goes through gemb's one client (gemb.paths) whether or not TensorFlow can reach it.
    vocabulary = seqio.SentencePieceVocabulary(str(paths.local_copy(model_path)))
    pad_id = vocabulary.tokenizer.pad_id()
    if pad_id != seqio.PAD_ID:
        raise ValueError(
            f"{model_path} gives padding the id {pad_id}, but seqio pads with {seqio.PAD_ID}; "
            "this is not a Gemma tokenizer.model."
        )
    return vocabulary


class TokenizerJsonVocabulary(seqio.Vocabulary):
    """A Hugging Face tokenizer.json as a seqio vocabulary (TF ops run the Python tokenizer).

    encode_tf/decode_tf call `tokenizers` through tf.numpy_function: fine inside tf.data, but the
    graph cannot be serialised (no SavedModel export of the tokenization step).
    """

    def __init__(self, tokenizer_json_path: str | os.PathLike):
        super().__init__(extra_ids=0)
        self._path = str(tokenizer_json_path)
        self._tokenizer: Tokenizer | None = None
        _ = self.tokenizer  # load now: a bad file fails here, not inside a tf.data pipeline

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            tokenizer = Tokenizer(self._path)
            if tokenizer.pad_id != seqio.PAD_ID:
                raise ValueError(
                    f"{self._path}: the padding token has id {tokenizer.pad_id}, but seqio reads id "
                    f"{seqio.PAD_ID} as padding. Use a tokenizer whose padding token is id 0 (name it "
                    "in a tokenizer_config.json beside the file as pad_token), or tokenize with "
                    "gemb.tokenizer.Tokenizer outside seqio."
                )
            self._tokenizer = tokenizer
        return self._tokenizer

    # Gin deep-copies configurables; keep the path, reload the tokenizer lazily.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_tokenizer"] = None
        return state

    def __eq__(self, other):
        return isinstance(other, TokenizerJsonVocabulary) and self._path == other._path

    def __hash__(self):
        return hash(self._path)

    def __str__(self) -> str:
        return f"TokenizerJsonVocabulary(file={self._path}, vocab_size={self.vocab_size})"

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_id

    @property
    def unk_id(self) -> int | None:
        return self.tokenizer.unk_id

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _encode(self, s: str) -> list[int]:
        return self.tokenizer.encode(s, add_bos=False)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor | tf.RaggedTensor:
        """A scalar string gives int32 ids [n]; a vector of strings gives a ragged [batch, None]."""
        s = tf.convert_to_tensor(s, dtype=tf.string)
        if s.shape.rank == 0:
            ids = tf.numpy_function(self._encode_one_numpy, [s], tf.int32, stateful=False)
            ids.set_shape([None])
            return ids
        if s.shape.rank == 1:
            flat_ids, row_lengths = tf.numpy_function(
                self._encode_many_numpy, [s], [tf.int32, tf.int64], stateful=False
            )
            flat_ids.set_shape([None])
            row_lengths.set_shape([None])
            return tf.RaggedTensor.from_row_lengths(flat_ids, row_lengths)
        raise ValueError(f"encode_tf takes a scalar or a vector of strings, got shape {s.shape}.")

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """ids [n] give a scalar string; ids [batch, n] give strings [batch]."""
        if isinstance(ids, tf.RaggedTensor):
            ids = ids.to_tensor(default_value=seqio.PAD_ID)  # pad ids decode to nothing
        ids = tf.convert_to_tensor(ids)
        if ids.shape.rank not in (1, 2):
            raise ValueError(f"decode_tf takes ids of rank 1 or 2, got shape {ids.shape}.")
        texts = tf.numpy_function(self._decode_numpy, [ids], tf.string, stateful=False)
        texts.set_shape(ids.shape[:-1])
        return texts

    def _encode_one_numpy(self, text: np.ndarray | bytes) -> np.ndarray:
        # numpy_function hands over a 0-d object array eagerly and bytes inside tf.data.
        text = np.asarray(text).item()
        return np.asarray(self._encode(text.decode("utf-8")), dtype=np.int32)

    def _encode_many_numpy(self, texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = self.tokenizer.encode_batch([t.decode("utf-8") for t in texts], add_bos=False)
        flat = np.fromiter((i for ids in batch for i in ids), dtype=np.int32)
        return flat, np.asarray([len(ids) for ids in batch], dtype=np.int64)

    def _decode_numpy(self, ids: np.ndarray) -> np.ndarray:
        if ids.ndim == 1:
            return np.asarray(self._decode(ids).encode("utf-8"), dtype=object)
        return np.asarray([self._decode(row).encode("utf-8") for row in ids], dtype=object)
