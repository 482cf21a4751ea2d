"""Text <-> token ids without TensorFlow: the tokenizer of the compute core and of `gemb embed`.

Two file formats load here: a SentencePiece model (tokenizer.model, or one rebuilt from a GGUF by
gemb.checkpoints.gguf_tokenizer) and a Hugging Face tokenizer.json (through `tokenizers`).

Gemma's convention, kept for both: encode() returns BOS followed by the tokenizer's ids and never
appends EOS (the data pipeline appends EOS where a task wants it).

The text of BOS, EOS and PAD ("<bos>" ...) is ordinary text here: Gemma's SentencePiece model
holds those pieces as CONTROL, which sentencepiece never produces from text, so a document quoting
"<eos>" cannot end its own sequence early. A tokenizer.json marks them "special" and matches them
in text instead; that difference belongs to the file, and the SentencePiece model is the reference.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from gemb import paths

SENTENCEPIECE_FILENAME = "tokenizer.model"
TOKENIZER_JSON_FILENAME = "tokenizer.json"

# Names a tokenizer.json's special tokens go by when no tokenizer_config.json says otherwise.
_FALLBACK_SPECIAL_TOKENS = {
    "bos": ("<bos>", "<s>", "<|begin_of_text|>", "[CLS]"),
    "eos": ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "[SEP]"),
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
}


class Tokenizer:
    """A SentencePiece model or a tokenizer.json behind one interface."""

    def __init__(self, path: str | os.PathLike):
        path = paths.as_path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist; pass a tokenizer.model or tokenizer.json file "
                "(Tokenizer.from_dir finds one in a model folder)."
            )
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; use Tokenizer.from_dir({str(path)!r}).")
        if path.suffix == ".gguf":
            raise ValueError(f"{path} is a GGUF model; use Tokenizer.from_gguf({str(path)!r}).")
        # Both backends open files by local name: a remote tokenizer is read from a copy.
        path = paths.local_copy(path, siblings=("tokenizer_config.json",))
        if path.suffix == ".json" or _starts_like_json(path):
            backend = _TokenizersBackend(path)
        else:
            backend = _SentencePieceBackend(model_file=path)
        self._set_backend(path, backend)

    def _set_backend(self, path: Path, backend: _SentencePieceBackend | _TokenizersBackend) -> None:
        self.path = path
        self._backend = backend

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> Tokenizer:
        """The tokenizer of a model folder: tokenizer.model, else tokenizer.json, else its one .gguf."""
        model_dir = paths.as_path(model_dir)
        if not model_dir.is_dir():
            raise NotADirectoryError(f"{model_dir} is not a folder; pass the folder holding the tokenizer.")
        for name in (SENTENCEPIECE_FILENAME, TOKENIZER_JSON_FILENAME):
            if (model_dir / name).is_file():
                return cls(model_dir / name)
        gguf_files = sorted(model_dir.glob("*.gguf"))
        if len(gguf_files) == 1:
            return cls.from_gguf(gguf_files[0])
        raise FileNotFoundError(
            f"{model_dir} holds no {SENTENCEPIECE_FILENAME} or {TOKENIZER_JSON_FILENAME}"
            + (f" and {len(gguf_files)} .gguf files" if gguf_files else "")
            + ". Copy the model's tokenizer there, or write one from a GGUF with "
            "gemb.checkpoints.gguf_tokenizer.write_sentencepiece_model(gguf_path, "
            f"'{model_dir / SENTENCEPIECE_FILENAME}')."
        )

    @classmethod
    def from_gguf(cls, gguf_path: str | os.PathLike) -> Tokenizer:
        """The SentencePiece tokenizer rebuilt from a GGUF's vocabulary (about 2 s for Gemma 3)."""
        from gemb.checkpoints import gguf_tokenizer

        model = gguf_tokenizer.sentencepiece_model_from_gguf(gguf_path)
        tokenizer = cls.__new__(cls)  # __init__ reads files; this model lives in memory
        tokenizer._set_backend(Path(gguf_path), _SentencePieceBackend(model_proto=model))
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def bos_id(self) -> int | None:
        return self._backend.bos_id

    @property
    def eos_id(self) -> int | None:
        return self._backend.eos_id

    @property
    def pad_id(self) -> int | None:
        return self._backend.pad_id

    @property
    def unk_id(self) -> int | None:
        return self._backend.unk_id

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of one text; BOS first when add_bos. Empty text gives just [BOS]."""
        _check_text(text, "text")
        return self._with_bos(self._backend.encode([text])[0], add_bos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True) -> list[list[int]]:
        """encode() for many texts at once (the backends batch in native code)."""
        if isinstance(texts, (str, bytes)):
            raise TypeError(
                f"encode_batch expects a sequence of str, got one {type(texts).__name__}; "
                "use encode() for a single text or wrap it in a list."
            )
        texts = list(texts)
        for index, text in enumerate(texts):
            _check_text(text, f"texts[{index}]")
        return [self._with_bos(ids, add_bos) for ids in self._backend.encode(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ids; BOS, EOS and PAD ids contribute nothing, every other id its text."""
        ids = [int(i) for i in ids]
        out_of_range = [i for i in ids if not 0 <= i < self.vocab_size]
        if out_of_range:
            raise ValueError(
                f"ids {out_of_range[:5]} are outside this {self.vocab_size}-token vocabulary "
                f"({self.path}); were they made with another tokenizer?"
            )
        return self._backend.decode(ids)

    def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
        if not add_bos:
            return ids
        if self.bos_id is None:
            raise ValueError(f"{self.path} defines no BOS token; call encode with add_bos=False.")
        return [self.bos_id, *ids]

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def _check_text(text, name: str) -> None:
    if not isinstance(text, str):
        hint = " (decode bytes with .decode('utf-8') first)" if isinstance(text, bytes) else ""
        raise TypeError(f"{name} must be str, got {type(text).__name__}{hint}.")


def _starts_like_json(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(64).lstrip().startswith(b"{")


class _SentencePieceBackend:
    def __init__(self, model_file: Path | None = None, model_proto: bytes | None = None):
        import sentencepiece

        self._processor = sentencepiece.SentencePieceProcessor()
        try:
            if model_proto is not None:
                self._processor.LoadFromSerializedProto(model_proto)
            else:
                self._processor.Load(str(model_file))
        except (OSError, RuntimeError) as error:
            raise ValueError(
                f"{model_file or 'the rebuilt model'} is not a SentencePiece model ({error}); pass a "
                "tokenizer.model or a tokenizer.json."
            ) from error
        # sentencepiece reports -1 for a role the model does not define.
        role = lambda token_id: token_id if token_id >= 0 else None  # noqa: E731
        self.vocab_size = self._processor.GetPieceSize()
        self.bos_id = role(self._processor.bos_id())
        self.eos_id = role(self._processor.eos_id())
        self.pad_id = role(self._processor.pad_id())
        self.unk_id = role(self._processor.unk_id())

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self._processor.Encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self._processor.Decode(ids)


class _TokenizersBackend:
    def __init__(self, path: Path):
        import tokenizers

        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"{path} is not a loadable tokenizer.json ({error}).") from error
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        names = _special_token_names(path)
        token_id = lambda role: self._special_token_id(role, names.get(role))  # noqa: E731
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = map(token_id, ("bos", "eos", "pad", "unk"))
        self._dropped_on_decode = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}

    def _special_token_id(self, role: str, configured: str | None) -> int | None:
        for name in (configured,) if configured else _FALLBACK_SPECIAL_TOKENS[role]:
            token_id = self._tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def encode(self, texts: list[str]) -> list[list[int]]:
        # add_special_tokens=False: the file's post-processor may add BOS/EOS of its own; BOS is
        # added by Tokenizer so that both formats follow one convention.
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        # Only the role tokens vanish, as with SentencePiece's CONTROL pieces; skip_special_tokens
        # would also drop turn markers and other tokens that carry text.
        kept = [i for i in ids if i not in self._dropped_on_decode]
        return self._tokenizer.decode(kept, skip_special_tokens=False)


def _special_token_names(tokenizer_json: Path) -> dict[str, str]:
    """bos/eos/pad/unk token names from the tokenizer_config.json beside a tokenizer.json, if any."""
    config_path = tokenizer_json.with_name("tokenizer_config.json")
    if not config_path.is_file():
        return {}
    config = json.loads(config_path.read_text(encoding="utf-8"))
    names = {}
    for role in ("bos", "eos", "pad", "unk"):
        value = config.get(f"{role}_token")
        if isinstance(value, dict):  # older files store an AddedToken as a dict
            value = value.get("content")
        if isinstance(value, str):
            names[role] = value
    return names
