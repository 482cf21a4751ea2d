"""Batch inference: texts -> embeddings, as a Python API and as `gemb embed`.

    from gemb.embed import load_encoder
    encoder = load_encoder("models/gemma3-270m", dim=768)
    vectors = encoder.encode(["first text", "second text"])          # [2, 768], L2-normalised

Texts are tokenised (BOS + ids, as Gemma's tokenizer does), sorted by length and cut into
batches whose length is rounded up to a bucket, so jit compiles one program per bucket instead
of one per batch. Without a task the texts are encoded as given; with a task, the task's
template (gemb/data/templates.py) is applied by role (query or document).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from gemb import distributed, paths
from gemb.checkpoints import model_dir as model_dir_lib
from gemb.models import encoder as encoder_lib
from gemb.models import heads
from gemb.models.config import EncoderConfig
from gemb.partitioning import mesh as mesh_lib
from gemb.partitioning import partitioner as partitioner_lib
from gemb.progress import Progress
from gemb.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MIN_BUCKET = 16
_ROLE_PLURALS = {"query": "queries", "document": "documents"}
DEFAULT_MAX_LENGTH = 1024  # tokens; longer texts are truncated (counted) unless told otherwise


def length_bucket(length: int, max_length: int) -> int:
    """Next power of two (at least MIN_BUCKET), capped at max_length."""
    return min(max_length, max(MIN_BUCKET, 1 << math.ceil(math.log2(max(length, 1)))))


def rows_bucket(rows: int, batch_size: int, multiple: int) -> int:
    """Rows of a (possibly partial) batch: the next power of two, a multiple of `multiple`, at
    most batch_size. A few long texts then run as a few rows, not a full padded batch, and the
    row counts stay few enough to compile each once."""
    bucket = min(batch_size, 1 << math.ceil(math.log2(max(rows, 1))))
    return max(multiple, -(-bucket // multiple) * multiple)


class InputError(ValueError):
    """A text that cannot be embedded; the message names it (file:line, or texts[i])."""


def _text_name(names: Sequence[str] | None, index: int) -> str:
    return names[index] if names is not None else f"texts[{index}]"


def check_texts(texts: Sequence[Any], names: Sequence[str] | None = None) -> None:
    """Every text is a str with something in it (checked BEFORE a template is applied: an empty
    text inside a template would embed the bare prompt)."""
    if isinstance(texts, str):
        raise TypeError("encode() takes a list of texts; wrap a single text in a list.")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{_text_name(names, i)} is a {type(text).__name__}, not a str; "
                            "convert it first.")
        if not text.strip():
            raise InputError(f"{_text_name(names, i)} is empty or only whitespace; an empty text "
                             "has no meaning to embed. Remove it or replace it with real text.")


class TextEncoder:
    """Holds a model's params on the devices and encodes lists of texts."""

    # gemb.eval hands whole text lists to this encoder instead of cutting them into batches:
    # encode() sorts by token count, buckets lengths and reports progress itself.
    batches_itself = True

    def __init__(self, config: EncoderConfig, params: Any, tokenizer: Tokenizer, *,
                 dim: int | None = None, head: bool = True, batch_size: int = 32,
                 max_length: int | None = None, on_overlong: str = "truncate",
                 task: str | None = None,
                 partitioner: partitioner_lib.Partitioner | None = None):
        if task is not None:
            from gemb.data import templates

            if task not in templates.TASK_DESCRIPTIONS:
                raise ValueError(f"task={task!r} has no template; use one of "
                                 f"{sorted(templates.TASK_DESCRIPTIONS)}.")
        if on_overlong not in ("truncate", "error"):
            raise ValueError(f"on_overlong={on_overlong!r}; use 'truncate' or 'error'.")
        if head and dim is not None and not 0 < dim <= config.embedding_dim:
            raise ValueError(f"dim={dim} does not fit this model's {config.embedding_dim}-wide "
                             f"embedding; use a Matryoshka width such as {config.matryoshka_dims}.")
        if not head and dim is not None:
            raise ValueError("dim applies to the projected embedding; with head=False (--head none) "
                             "the pooled hidden state is returned whole. Drop --dim.")
        max_length = max_length or min(DEFAULT_MAX_LENGTH, config.transformer.max_length)
        if max_length > config.transformer.max_length:
            raise ValueError(f"max_length={max_length} exceeds the model's "
                             f"{config.transformer.max_length} positions.")
        self.config = config
        self.tokenizer = tokenizer
        self.dim = dim or config.embedding_dim
        self.head = head
        self.max_length = max_length
        self.on_overlong = on_overlong
        self.task = task
        self.partitioner = partitioner or partitioner_lib.Partitioner(mesh_lib.create_mesh())
        # A multiple of the data-parallel size, so every device gets whole rows.
        shards = self.partitioner.data_parallel_size
        self.batch_size = max(shards, -(-batch_size // shards) * shards)
        self.params = params
        self.truncated_count = 0
        self._model = encoder_lib.Encoder(config)
        self._forward = jax.jit(self._forward_impl)

    def _forward_impl(self, params, tokens, segment_ids):
        with self.partitioner.activation_context():
            out = self._model.apply({"params": params}, tokens, segment_ids)
        if not self.head:
            return out["pooled"][:, 0]
        return heads.matryoshka_embedding(out["projected"][:, 0], self.dim)

    def format(self, texts: Sequence[str], role: str | None, task: str | None = None) -> list[str]:
        task = task or self.task
        if task is None:
            return list(texts)
        from gemb.data import templates  # pure Python (+ gin): no TensorFlow at import

        template = templates.default_template(task)
        if role == "document":
            return [template.document(text) for text in texts]
        return [template.query(text) for text in texts]

    def tokenize(self, texts: Sequence[str], names: Sequence[str] | None = None
                 ) -> list[list[int]]:
        """Token ids of each text (BOS first), cut to max_length (or an error, on_overlong)."""
        check_texts(texts, names)
        ids = []
        for i, text in enumerate(texts):
            tokens = self.tokenizer.encode(text)
            if len(tokens) > self.max_length:
                if self.on_overlong == "error":
                    raise InputError(
                        f"{_text_name(names, i)} has {len(tokens)} tokens, more than max_length="
                        f"{self.max_length}; raise max_length (--max-length) or allow truncation "
                        "(--on-overlong truncate).")
                self.truncated_count += 1
                tokens = tokens[: self.max_length]
            ids.append(tokens)
        return ids

    def encode(self, texts: Sequence[str], role: str | None = None,
               progress: bool | None = None, task: str | None = None,
               names: Sequence[str] | None = None) -> np.ndarray:
        """[len(texts), dim] float32 embeddings, in the order of texts.

        role: "query" or "document"; task: a template kind (overrides the encoder's own task);
        with neither task set, texts are encoded as given. names: what errors call each text
        (e.g. "texts.txt:12"; default "texts[i]").
        """
        check_texts(texts, names)
        truncated_before = self.truncated_count
        token_lists = self.tokenize(self.format(texts, role, task), names)
        if self.truncated_count > truncated_before:
            log.warning("%d of %d texts were longer than max_length=%d tokens and were truncated.",
                        self.truncated_count - truncated_before, len(texts), self.max_length)
        width = self.config.transformer.embed_dim if not self.head else self.dim
        result = np.zeros((len(token_lists), width), np.float32)
        # Longest first: the largest batch runs out of memory at once rather than at the end,
        # and the rate (hence the ETA) starts pessimistic instead of optimistic.
        order = np.argsort([-len(t) for t in token_lists], kind="stable")
        starts = range(0, len(order), self.batch_size)
        # A bar on a terminal, a log line with rate and ETA every 30 s when stderr is a file;
        # progress=None stays silent for a few batches, progress=False always.
        mode = "off" if progress is False or (progress is None and len(starts) <= 4) else None
        description = f"embed {_ROLE_PLURALS.get(role, 'texts')}"
        with Progress(len(order), description, unit="text", mode=mode) as bar:
            for start in starts:
                self._encode_batch(token_lists, order[start:start + self.batch_size], result)
                bar.update(min(self.batch_size, len(order) - start))
        return result

    def _encode_batch(self, token_lists: list[list[int]], chosen: np.ndarray,
                      result: np.ndarray) -> None:
        """Runs one padded batch (rows `chosen` of token_lists) and writes its rows of result."""
        length = length_bucket(max(len(token_lists[i]) for i in chosen), self.max_length)
        rows = rows_bucket(len(chosen), self.batch_size, self.partitioner.data_parallel_size)
        tokens = np.zeros((rows, length), np.int32)
        segments = np.zeros((rows, length), np.int32)
        for row, i in enumerate(chosen):
            tokens[row, : len(token_lists[i])] = token_lists[i]
            segments[row, : len(token_lists[i])] = 1
        layout = self.partitioner.data_layout()
        if layout.num_shards > 1:
            # Several processes: each feeds (and so embeds) its own block of the batch's rows,
            # and every process gets the whole batch's vectors back.
            per = rows // layout.num_shards
            mine = slice(layout.shard_index * per, (layout.shard_index + 1) * per)
            tokens, segments = tokens[mine], segments[mine]
        embedded = self._forward(self.params, *self.partitioner.place_batch((tokens, segments)))
        if embedded.is_fully_addressable:
            vectors = np.asarray(embedded)
        else:
            from jax.experimental import multihost_utils

            vectors = np.asarray(multihost_utils.process_allgather(embedded, tiled=True))
        result[chosen] = vectors[: len(chosen)]


def load_encoder(model_dir: str | Path, *, dim: int | None = None, head: bool = True,
                 batch_size: int = 32, max_length: int | None = None,
                 on_overlong: str = "truncate", task: str | None = None,
                 partitioner: partitioner_lib.Partitioner | None = None) -> TextEncoder:
    """A TextEncoder for a folder written by `gemb convert` (or exported by training)."""
    config, _ = model_dir_lib.read_model_config(model_dir)
    partitioner = partitioner or partitioner_lib.Partitioner(mesh_lib.create_mesh())
    abstract = partitioner.abstract_params(encoder_lib.boxed_params(config))
    params = model_dir_lib.load_params(model_dir, abstract)
    tokenizer = Tokenizer.from_dir(model_dir)
    return TextEncoder(config, params, tokenizer, dim=dim, head=head, batch_size=batch_size,
                       max_length=max_length, on_overlong=on_overlong, task=task,
                       partitioner=partitioner)


def _decoded_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, text) of every line of a UTF-8 file, split on "\n" only.

    str.splitlines() would also split on U+2028, U+0085, form feeds and other separators that
    occur inside real text, giving more rows than the file has lines. A final newline ends the
    last line (it does not start an empty one); a "\r" before "\n" and a UTF-8 BOM are dropped.
    """
    data = path.read_bytes()
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    lines = []
    for number, raw in enumerate(raw_lines, 1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            lines.append((number, raw.decode("utf-8")))
        except UnicodeDecodeError as error:
            raise InputError(
                f"{path}:{number}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at column "
                f"{error.start + 1}); re-encode the file as UTF-8, e.g. "
                f"iconv -f latin1 -t utf-8 {path}.") from None
    return lines


def read_texts(path: Path, field: str = "text") -> tuple[list[str], list[str]]:
    """(texts, names) of a .txt file (one text per line) or a .jsonl file (one record per line,
    the text in `field`); names are "path:line" for error messages."""
    path = paths.as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--input {path} does not exist.")
    texts, names = [], []
    for number, line in _decoded_lines(path):
        name = f"{path}:{number}"
        if path.suffix == ".jsonl":
            if not line.strip():
                continue  # a blank line between records is not a record
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{name} is not valid JSON ({error}).") from None
            if not isinstance(record, dict) or field not in record:
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise InputError(f"{name} has no {field!r} field (fields: {fields}); pass "
                                 "--text-field NAME.")
            line = record[field]
            if not isinstance(line, str):
                raise InputError(f"{name}: field {field!r} is a {type(line).__name__}, not a "
                                 "string.")
        texts.append(line)
        names.append(name)
    check_texts(texts, names)
    return texts, names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gemb embed", description="Embed texts with a gemb model.")
    parser.add_argument("--model", required=True, help="model folder (gemb convert / training export)")
    parser.add_argument("--input", required=True, type=paths.as_path,
                        help=".txt (a text per line) or .jsonl (local or gs://)")
    parser.add_argument("--output", required=True, type=paths.as_path,
                        help="where to write the .npy array (local or gs://)")
    parser.add_argument("--task", default=None,
                        help="apply this task kind's template, e.g. code_retrieval, search, "
                             "classification (gemb/data/templates.py TASK_DESCRIPTIONS)")
    parser.add_argument("--role", default="query", choices=["query", "document"])
    parser.add_argument("--dim", type=int, default=None, help="Matryoshka width (default: the full embedding)")
    parser.add_argument("--head", default="projection", choices=["projection", "none"],
                        help="'none': mean-pooled hidden states before the projection head")
    parser.add_argument("--text-field", default="text", help="the text field of .jsonl records")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=None,
                        help=f"tokens per text (default {DEFAULT_MAX_LENGTH}, or the model's limit)")
    parser.add_argument("--on-overlong", default="truncate", choices=["truncate", "error"])
    parser.add_argument("--allow-empty-input", action="store_true",
                        help="an input with no texts writes an empty (0, dim) array (with a "
                             "warning) instead of failing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        texts, names = read_texts(args.input, args.text_field)
        if not texts and not args.allow_empty_input:
            raise InputError(f"{args.input} holds no texts; nothing to embed. Pass "
                             "--allow-empty-input to write an empty array instead.")
        start = time.time()
        encoder = load_encoder(args.model, dim=args.dim, head=args.head != "none",
                               batch_size=args.batch_size, max_length=args.max_length,
                               on_overlong=args.on_overlong, task=args.task)
        if not texts:
            log.warning("%s holds no texts; writing an empty array.", args.input)
        vectors = encoder.encode(texts, role=args.role, progress=True, names=names)
    except (InputError, FileNotFoundError) as error:
        print(f"gemb embed: {error}", file=sys.stderr)
        return 2
    if distributed.is_chief():  # every process holds every vector; one writes them
        with args.output.open("wb") as handle:
            np.save(handle, vectors)
        print(f"wrote {vectors.shape} to {args.output} in {time.time() - start:.1f} s"
              + (f" ({encoder.truncated_count} texts truncated)" if encoder.truncated_count
                 else ""), file=sys.stderr)
    distributed.sync_processes(f"embed {args.output} written")
    return 0
