"""Rebuild a SentencePiece tokenizer model from the vocabulary stored in a GGUF file.

A GGUF carries no tokenizer.model, only llama.cpp's description of it: the pieces, their scores
and token types, the special ids and a few flags. For a SentencePiece ("llama") vocabulary that is
enough to rebuild an equivalent ModelProto, which sentencepiece, seqio and tf_text then load like
the original file.

Where llama.cpp's conversion changed the original, the rebuild undoes it:

* llama.cpp marks every token Hugging Face calls "special" as CONTROL. Gemma 3's own
  tokenizer.model has only three CONTROL pieces (<pad>, <eos>, <bos>) and one UNKNOWN (<unk>);
  <start_of_turn>, <mask>, <unusedN> ... are USER_DEFINED there, so sentencepiece matches them when
  they appear in text. CONTROL pieces are never produced from text, and sentencepiece only reports
  bos/eos/pad ids whose piece is CONTROL, so the rebuild keeps CONTROL for the ids the metadata names
  as bos/eos/pad, UNKNOWN for the unk id, and turns every other CONTROL token into USER_DEFINED.
* llama.cpp writes the spaces of USER_DEFINED tokens as real spaces ("  " for a run of two), but
  sentencepiece matches user-defined pieces after it has replaced spaces with U+2581, so those
  spaces are written back as U+2581.
* llama.cpp stores -1000 as the score of special tokens as a marker; sentencepiece ignores the
  score of user-defined, control and unknown pieces, and Gemma's model has 0 there.

Reading: a path is parsed here directly (only the key/value header, never the tensors), because
gguf.GGUFReader builds a numpy view for every element of every array, roughly a million views for a
262k-entry vocabulary, which takes 15 to 45 s on two cores. A GGUFReader that a caller already holds
(the weight importer has one) is accepted as well and read through its fields.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from pathlib import Path
from typing import Any, Union

import gguf
from sentencepiece import sentencepiece_model_pb2

PathOrReader = Union[str, os.PathLike, gguf.GGUFReader]

_SPACE_SYMBOL = "\u2581"
_Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
_TOKENIZER_KEYS = gguf.Keys.Tokenizer

# llama.cpp's name for a SentencePiece vocabulary (Llama 1/2, Gemma 1-3, Mistral v1 ...).
_SENTENCEPIECE_TOKENIZER_MODEL = "llama"

# Fixed-size GGUF value types and their struct codes (byte order is prefixed when reading).
_STRUCT_CODES = {
    gguf.GGUFValueType.UINT8: "B",
    gguf.GGUFValueType.INT8: "b",
    gguf.GGUFValueType.UINT16: "H",
    gguf.GGUFValueType.INT16: "h",
    gguf.GGUFValueType.UINT32: "I",
    gguf.GGUFValueType.INT32: "i",
    gguf.GGUFValueType.FLOAT32: "f",
    gguf.GGUFValueType.BOOL: "?",
    gguf.GGUFValueType.UINT64: "Q",
    gguf.GGUFValueType.INT64: "q",
    gguf.GGUFValueType.FLOAT64: "d",
}
_SUPPORTED_GGUF_VERSIONS = (2, 3)  # v1 used 32-bit counts and predates every file gemb meets


@dataclasses.dataclass(frozen=True)
class GgufVocabulary:
    """The tokenizer part of a GGUF's metadata, as llama.cpp wrote it."""

    source: str
    tokenizer_model: str
    tokens: list[str]
    scores: list[float]
    token_types: list[int]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_space_prefix: bool
    remove_extra_whitespaces: bool


def read_gguf_vocabulary(path_or_reader: PathOrReader) -> GgufVocabulary:
    """The vocabulary a GGUF file describes; raises a ValueError naming the file when it has none."""
    if isinstance(path_or_reader, gguf.GGUFReader):
        source = str(getattr(path_or_reader.data, "filename", None) or "the GGUF file")
        metadata = _metadata_from_reader(path_or_reader)
    else:
        source = str(path_or_reader)
        metadata = _read_tokenizer_metadata(Path(path_or_reader))
    return _vocabulary_from_metadata(metadata, source)


def sentencepiece_model_from_gguf(path_or_reader: PathOrReader) -> bytes:
    """A serialized SentencePiece ModelProto equivalent to the tokenizer the GGUF was made from."""
    vocabulary = read_gguf_vocabulary(path_or_reader)
    return _build_model_proto(vocabulary).SerializeToString()


def write_sentencepiece_model(path_or_reader: PathOrReader, output_path: str | os.PathLike) -> Path:
    """Writes the rebuilt tokenizer.model to output_path (atomically) and returns that path."""
    model = sentencepiece_model_from_gguf(path_or_reader)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    partial_path = output_path.with_name(output_path.name + f".partial-{os.getpid()}")
    partial_path.write_bytes(model)
    partial_path.replace(output_path)
    return output_path


def _build_model_proto(vocabulary: GgufVocabulary) -> sentencepiece_model_pb2.ModelProto:
    role_control_ids = {i for i in (vocabulary.bos_id, vocabulary.eos_id, vocabulary.pad_id) if i is not None}
    model = sentencepiece_model_pb2.ModelProto()
    seen_pieces: dict[str, int] = {}
    for index, (text, score, gguf_type) in enumerate(
        zip(vocabulary.tokens, vocabulary.scores, vocabulary.token_types)
    ):
        piece_type, piece, piece_score = _sentencepiece_piece(
            index, text, score, gguf_type, vocabulary.unk_id, role_control_ids, vocabulary.source
        )
        if piece in seen_pieces:
            raise ValueError(
                f"{vocabulary.source}: tokens {seen_pieces[piece]} and {index} both become the "
                f"SentencePiece piece {piece!r}; sentencepiece needs unique pieces, so this "
                "vocabulary cannot be rebuilt. Use the model's own tokenizer.model or tokenizer.json."
            )
        seen_pieces[piece] = index
        model.pieces.add(piece=piece, score=piece_score, type=piece_type)

    trainer = model.trainer_spec
    trainer.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(vocabulary.tokens)
    trainer.byte_fallback = any(t == gguf.TokenType.BYTE for t in vocabulary.token_types)
    # Only encoding-relevant fields are set; training-only ones (split_digits ...) stay at their
    # defaults because no encoder reads them and the GGUF cannot confirm them.
    for role, token_id in (
        ("unk", vocabulary.unk_id),
        ("bos", vocabulary.bos_id),
        ("eos", vocabulary.eos_id),
        ("pad", vocabulary.pad_id),
    ):
        # -1 is sentencepiece's "this role does not exist".
        setattr(trainer, f"{role}_id", -1 if token_id is None else token_id)
        if token_id is not None:
            setattr(trainer, f"{role}_piece", model.pieces[token_id].piece)

    normalizer = model.normalizer_spec
    # "identity": no NFKC. llama.cpp applies no Unicode normalisation to a SentencePiece vocabulary.
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = vocabulary.add_space_prefix
    normalizer.remove_extra_whitespaces = vocabulary.remove_extra_whitespaces
    normalizer.escape_whitespaces = True
    return model


def _sentencepiece_piece(index, text, score, gguf_type, unk_id, role_control_ids, source):
    """(type, piece, score) of one token; see the module docstring for why types change."""
    if index == unk_id:
        return _Piece.UNKNOWN, text, 0.0
    if index in role_control_ids:
        return _Piece.CONTROL, text, 0.0
    if gguf_type in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
        return _Piece.USER_DEFINED, text.replace(" ", _SPACE_SYMBOL), 0.0
    if gguf_type == gguf.TokenType.UNKNOWN:
        # sentencepiece allows one UNKNOWN piece; any other such token can only be an id.
        return _Piece.CONTROL, text, 0.0
    if gguf_type == gguf.TokenType.NORMAL:
        return _Piece.NORMAL, text, float(score)
    if gguf_type == gguf.TokenType.BYTE:
        return _Piece.BYTE, text, float(score)
    if gguf_type == gguf.TokenType.UNUSED:
        return _Piece.UNUSED, text, float(score)
    raise ValueError(
        f"{source}: token {index} ({text!r}) has token type {gguf_type}, which is none of llama.cpp's "
        f"types {[int(t) for t in gguf.TokenType]}; the file is damaged or from an unknown converter."
    )


def _vocabulary_from_metadata(metadata: dict[str, Any], source: str) -> GgufVocabulary:
    keys = _TOKENIZER_KEYS
    if keys.LIST not in metadata:
        raise ValueError(
            f"{source} has no tokenizer metadata ({keys.LIST} is missing), so no tokenizer can be "
            "rebuilt from it. Use a GGUF converted together with its tokenizer (llama.cpp's "
            "convert_hf_to_gguf.py does so by default), or load the model's tokenizer.model or "
            "tokenizer.json with gemb.tokenizer.Tokenizer."
        )
    tokenizer_model = metadata.get(keys.MODEL)
    if tokenizer_model != _SENTENCEPIECE_TOKENIZER_MODEL:
        raise ValueError(
            f"{source} describes a {tokenizer_model!r} tokenizer ({keys.MODEL}); only "
            f"{_SENTENCEPIECE_TOKENIZER_MODEL!r} (SentencePiece, as in Gemma and Llama 2) can be "
            "rebuilt as a SentencePiece model. Load that model's tokenizer.json with "
            "gemb.tokenizer.Tokenizer instead."
        )
    tokens = list(metadata[keys.LIST])
    count = len(tokens)
    scores = list(metadata.get(keys.SCORES, [0.0] * count))
    token_types = [int(t) for t in metadata.get(keys.TOKEN_TYPE, [gguf.TokenType.NORMAL] * count)]
    for name, values in ((keys.SCORES, scores), (keys.TOKEN_TYPE, token_types)):
        if len(values) != count:
            raise ValueError(
                f"{source}: {name} has {len(values)} entries but {keys.LIST} has {count}; "
                "the tokenizer metadata is inconsistent, re-convert the model."
            )

    def special_id(key: str) -> int | None:
        token_id = metadata.get(key)
        if token_id is None:
            return None
        token_id = int(token_id)
        if not 0 <= token_id < count:
            raise ValueError(f"{source}: {key} is {token_id}, outside the {count}-token vocabulary.")
        return token_id

    unk_id = special_id(keys.UNK_ID)
    if unk_id is None:
        declared = [i for i, t in enumerate(token_types) if t == gguf.TokenType.UNKNOWN]
        unk_id = declared[0] if declared else None
    if unk_id is None:
        raise ValueError(
            f"{source} names no unknown token ({keys.UNK_ID}) and marks none as UNKNOWN; "
            "sentencepiece needs one. Re-convert the model with its tokenizer.model."
        )
    return GgufVocabulary(
        source=source,
        tokenizer_model=tokenizer_model,
        tokens=tokens,
        scores=[float(s) for s in scores],
        token_types=token_types,
        bos_id=special_id(keys.BOS_ID),
        eos_id=special_id(keys.EOS_ID),
        unk_id=unk_id,
        pad_id=special_id(keys.PAD_ID),
        # llama.cpp's defaults for a SentencePiece vocabulary when the flags are absent.
        add_space_prefix=bool(metadata.get(keys.ADD_PREFIX, True)),
        remove_extra_whitespaces=bool(metadata.get(keys.REMOVE_EXTRA_WS, False)),
    )


def _metadata_from_reader(reader: gguf.GGUFReader) -> dict[str, Any]:
    return {
        name: field.contents()
        for name, field in reader.fields.items()
        if name.startswith("tokenizer.ggml.")
    }


def _read_tokenizer_metadata(path: Path) -> dict[str, Any]:
    """The tokenizer.ggml.* key/values of a GGUF file, read from its header only."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass the path of a .gguf model file.")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; pass the path of the .gguf file inside it.")
    with path.open("rb") as file:
        magic = file.read(4)
        if magic != b"GGUF":
            raise ValueError(
                f"{path} is not a GGUF file: it starts with {magic!r}, not b'GGUF'. Pass a .gguf "
                "model file; a tokenizer.model or tokenizer.json loads with gemb.tokenizer.Tokenizer."
            )
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as blob:
            try:
                return _parse_tokenizer_metadata(blob, path)
            except (_DamagedHeader, struct.error, UnicodeDecodeError) as error:
                raise ValueError(
                    f"{path} is damaged or truncated inside its metadata ({error}); "
                    "download or assemble the file again."
                ) from error


def _parse_tokenizer_metadata(blob: mmap.mmap, path: Path) -> dict[str, Any]:
    (version,) = struct.unpack_from("<I", blob, 4)
    # A file written on a big-endian host reads as a version with its low 16 bits zero.
    byte_order = "<"
    if version & 0xFFFF == 0:
        byte_order = ">"
        (version,) = struct.unpack_from(">I", blob, 4)
    if version not in _SUPPORTED_GGUF_VERSIONS:
        raise ValueError(
            f"{path} is GGUF version {version}; only versions {_SUPPORTED_GGUF_VERSIONS} can be read. "
            "Re-convert it with a current llama.cpp."
        )
    _tensor_count, kv_count = struct.unpack_from(byte_order + "QQ", blob, 8)
    reader = _HeaderReader(blob, byte_order, offset=24)
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = reader.string()
        value_type = reader.scalar(gguf.GGUFValueType.UINT32)
        wanted = key.startswith("tokenizer.ggml.")
        value = reader.value(value_type, keep=wanted)
        if wanted:
            metadata[key] = value
    return metadata


class _DamagedHeader(Exception):
    """The header does not parse; reported to the user as a damaged file."""


class _HeaderReader:
    """Walks GGUF key/values from an offset; values not kept are skipped without decoding."""

    def __init__(self, blob: mmap.mmap, byte_order: str, offset: int):
        self._blob = blob
        self._byte_order = byte_order
        self.offset = offset

    def scalar(self, value_type: int):
        code = self._byte_order + _STRUCT_CODES[value_type]
        (value,) = struct.unpack_from(code, self._blob, self.offset)
        self.offset += struct.calcsize(code)
        return value

    def string(self, keep: bool = True) -> str | None:
        length = self.scalar(gguf.GGUFValueType.UINT64)
        start, self.offset = self.offset, self.offset + length
        if self.offset > len(self._blob):
            raise _DamagedHeader("a string runs past the end of the file")
        return self._blob[start : self.offset].decode("utf-8") if keep else None

    def value(self, value_type: int, keep: bool):
        if value_type in _STRUCT_CODES:
            return self.scalar(value_type)
        if value_type == gguf.GGUFValueType.STRING:
            return self.string(keep)
        if value_type == gguf.GGUFValueType.ARRAY:
            item_type = self.scalar(gguf.GGUFValueType.UINT32)
            count = self.scalar(gguf.GGUFValueType.UINT64)
            if item_type in _STRUCT_CODES:
                code = f"{self._byte_order}{count}{_STRUCT_CODES[item_type]}"
                start, self.offset = self.offset, self.offset + struct.calcsize(code)
                if self.offset > len(self._blob):
                    raise _DamagedHeader("an array runs past the end of the file")
                return list(struct.unpack_from(code, self._blob, start)) if keep else None
            items = [self.value(item_type, keep) for _ in range(count)]
            return items if keep else None
        raise _DamagedHeader(f"unknown GGUF value type {value_type}")
