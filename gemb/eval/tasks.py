"""Evaluation tasks: registered names (the datasets in ../shared/data and gemb's docstring ->
code corpus) and TYPE:PATH specs.

A `Task` is gemb's one evaluator contract: `task.evaluate(encoder)` returns its scores with a
`main_score`. `gemb eval`, the training hook (gemb.eval.hook.EvalHook) and the quickstart all
score through it.

A task spec is either a registered name (case-insensitive; `gemb eval --list-tasks` prints
them), optionally with options (DocstringCode?split=test&num_queries=200&seed=0;
CoSQA-CoCLR?num_queries=200&corpus_size=1000&seed=0 samples queries and a corpus of their
positives plus random others; every registered task takes name= and prompt_task=), or
TYPE:PATH with optional ?key=value&key=value options:

  retrieval:DIR        BEIR folder: corpus.jsonl[.gz], queries.jsonl[.gz], qrels/<split>.tsv
                       options: split=test, missing_docs=error|count, ignore_identical_ids=0|1,
                                main_score=ndcg_at_10
  sts:FILE             TSV with header sentence1, sentence2, score
  classification:DIR   train.tsv and test.tsv with header text, label
                       options: n_experiments=10, samples_per_label=8
  pair:FILE            TSV with header sentence1, sentence2, label (0/1)
  clustering:FILE      TSV with header text, label (and optionally set: rows of one set are
                       clustered together)      options: protocol=legacy|fast, max_documents=N
  bitext:DIR           src.txt and tgt.txt, aligned by line
  reranking:FILE       JSONL lines {"query": str, "positive": [str], "negative": [str]}
  summarization:FILE   JSONL lines {"human_summaries": [str], "machine_summaries": [str],
                                    "relevance": [float]}
  every type also takes name=NAME (the name results are filed under) and prompt_task=NAME
  (the prompt passed to encoders that accept task=; see encoders.PROMPT_TASKS).

TSV files are read as written: plain tab-separated lines, or csv-module/pandas quoting (fields
wrapped in double quotes with "" inside) when the file uses it. Loading is lazy: a task reads its
files when it is evaluated, so a typo in one path does not stop the tasks before it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import re
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from gemb import paths
from gemb.eval import (
    bitext,
    classification,
    clustering,
    encoders,
    pair_classification,
    reranking,
    retrieval,
    sts,
    summarization,
)

logger = logging.getLogger(__name__)

TASK_TYPES = ("retrieval", "sts", "classification", "pair_classification", "clustering",
              "bitext", "reranking", "summarization")
# The TYPE prefixes of TYPE:PATH specs.
SPEC_PREFIXES = {
    "retrieval": "retrieval",
    "sts": "sts",
    "classification": "classification",
    "pair": "pair_classification",
    "clustering": "clustering",
    "bitext": "bitext",
    "reranking": "reranking",
    "summarization": "summarization",
}
COMMON_OPTIONS = ("name", "prompt_task")
TYPE_OPTIONS = {
    "retrieval": ("split", "missing_docs", "ignore_identical_ids", "main_score"),
    "sts": (),
    "classification": ("n_experiments", "samples_per_label"),
    "pair_classification": (),
    "clustering": ("protocol", "max_documents"),
    "bitext": (),
    "reranking": ("main_score",),
    "summarization": (),
}


@dataclasses.dataclass
class Task:
    """One evaluation: how to load its data and how to score an encoder on it.

    `load` returns the data object of `task_type`, or {subset: data} for a task with several
    subsets (its main score is then the unweighted mean over subsets, as in MTEB).
    """

    name: str
    task_type: str
    load: Callable[[], Any]
    source: str
    description: str = ""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    prompt_task: Optional[str] = None
    reference_name: Optional[str] = None  # the MTEB task whose published scores apply

    def __post_init__(self):
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"unknown task type {self.task_type!r}; one of {TASK_TYPES}")
        if self.prompt_task is None:
            self.prompt_task = encoders.PROMPT_TASKS[self.task_type]

    def evaluate(self, encoder: Any,
                 embedding_cache: Optional[encoders.EmbeddingCache] = None) -> dict[str, Any]:
        """Scores `encoder` (anything encoders.embed accepts); the dict has main_score."""
        started = time.perf_counter()
        data = self.load()
        if isinstance(data, dict):
            subsets = {subset: self._evaluate_one(encoder, subset_data, embedding_cache)
                       for subset, subset_data in data.items()}
            result: dict[str, Any] = {
                "main_score": float(np.mean([s["main_score"] for s in subsets.values()])),
                "main_score_name": next(iter(subsets.values()))["main_score_name"],
                "subsets": subsets,
            }
        else:
            result = self._evaluate_one(encoder, data, embedding_cache)
        result["evaluation_seconds"] = round(time.perf_counter() - started, 2)
        return result

    def _evaluate_one(self, encoder: Any, data: Any,
                      embedding_cache: Optional[encoders.EmbeddingCache]) -> dict[str, Any]:
        options = self.options
        if self.task_type == "retrieval":
            return retrieval.evaluate_retrieval(
                encoder, data, prompt_task=self.prompt_task, embedding_cache=embedding_cache,
                ignore_identical_ids=options.get("ignore_identical_ids", False),
                main_score=options.get("main_score", "ndcg_at_10"))
        if self.task_type == "sts":
            return sts.evaluate_sts(encoder, data, prompt_task=self.prompt_task)
        if self.task_type == "classification":
            return classification.evaluate_classification(
                encoder, data, prompt_task=self.prompt_task,
                n_experiments=options.get("n_experiments", classification.N_EXPERIMENTS),
                samples_per_label=options.get("samples_per_label",
                                              classification.SAMPLES_PER_LABEL))
        if self.task_type == "pair_classification":
            return pair_classification.evaluate_pair_classification(
                encoder, data, prompt_task=self.prompt_task)
        if self.task_type == "clustering":
            return clustering.evaluate_clustering(
                encoder, data, prompt_task=self.prompt_task,
                protocol=options.get("protocol", "legacy"),
                max_documents=options.get("max_documents"))
        if self.task_type == "bitext":
            return bitext.evaluate_bitext(encoder, data, prompt_task=self.prompt_task)
        if self.task_type == "reranking":
            return reranking.evaluate_reranking(encoder, data, prompt_task=self.prompt_task,
                                                main_score=options.get("main_score",
                                                                       "map_at_1000"))
        return summarization.evaluate_summarization(encoder, data, prompt_task=self.prompt_task)


# --------------------------------------------------------------------------------- file readers


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        where = "folder" if path.parent.is_dir() else "folder, which does not exist either"
        raise FileNotFoundError(f"{what}: {path} does not exist (in the {where} {path.parent}).")
    return path


def _csv_quoted(field: str) -> bool:
    """Whether a raw field can only be a csv-quoted one: wrapped in quotes, inner quotes
    doubled, and holding a character that made the csv writer quote it."""
    if len(field) < 2 or field[0] != '"' or field[-1] != '"':
        return False
    inner = field[1:-1]
    if re.search(r'(?<!")"(?!")', inner.replace('""', "")):
        return False  # a lone quote inside: not csv escaping
    unescaped = inner.replace('""', '"')
    return any(c in unescaped for c in '"\t\n\r')


def read_tsv(path: Union[str, Path], required: Sequence[str], what: str,
             optional: Sequence[str] = ()) -> dict[str, list[str]]:
    """The required (and present optional) columns of a TSV file with a header, by name."""
    path = _require_file(Path(path), what)
    text = path.read_text(encoding="utf-8-sig")
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"{what}: {path} is empty.")
    header = lines[0].split("\t")
    raw_rows = [line.split("\t") for line in lines[1:] if line.strip()]
    uses_quoting = (any(_csv_quoted(f) for f in header)
                    or any(len(row) != len(header) for row in raw_rows)
                    or any(_csv_quoted(f) for row in raw_rows for f in row))
    if uses_quoting:
        parsed = [row for row in csv.reader(io.StringIO(text.lstrip("\ufeff")), delimiter="\t")
                  if any(cell.strip() for cell in row)]
        header, rows = parsed[0], parsed[1:]
    else:
        rows = raw_rows
    column_of = {name.strip().lower(): i for i, name in enumerate(header)}
    missing = [name for name in required if name not in column_of]
    if missing:
        raise ValueError(f"{what}: {path} needs a header line with columns "
                         f"{', '.join(required)} (tab-separated); its first line has "
                         f"{header[:8]}, missing {missing}.")
    for number, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise ValueError(f"{what}: {path} row {number} has {len(row)} fields but the header "
                             f"has {len(header)}.")
    if not rows:
        raise ValueError(f"{what}: {path} has a header but no rows.")
    wanted = list(required) + [name for name in optional if name in column_of]
    return {name: [row[column_of[name]] for row in rows] for name in wanted}


def _numbers(values: Sequence[str], path: Path, column: str) -> list[float]:
    numbers = []
    for row, value in enumerate(values, start=2):
        try:
            numbers.append(float(value))
        except ValueError:
            raise ValueError(f"{path} row {row}: {column} {value!r} is not a number.") from None
    return numbers


def _labels(values: Sequence[str]) -> list[Any]:
    """Labels as ints when they all are (MTEB's datasets store integer labels), else strings."""
    stripped = [value.strip() for value in values]
    if all(re.fullmatch(r"-?\d+", value) for value in stripped):
        return [int(value) for value in stripped]
    return stripped


def _read_jsonl(path: Path, what: str) -> list[dict]:
    _require_file(path, what)
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{what}: {path}:{number} is not valid JSON ({error}).") from None
    if not records:
        raise ValueError(f"{what}: {path} is empty.")
    return records


def _read_lines(path: Path, what: str) -> list[str]:
    _require_file(path, what)
    lines = path.read_text(encoding="utf-8-sig").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline ending the last line
    return [line.rstrip("\r") for line in lines]


# ------------------------------------------------------------------------------ TYPE:PATH loaders


def load_sts_file(path: Union[str, Path]) -> sts.STSData:
    path = Path(path)
    table = read_tsv(path, ["sentence1", "sentence2", "score"], "sts task")
    return sts.STSData(table["sentence1"], table["sentence2"],
                       _numbers(table["score"], path, "score"), source=str(path))


def load_classification_dir(directory: Union[str, Path]) -> classification.ClassificationData:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"classification task: folder {directory} does not exist.")
    train = read_tsv(directory / "train.tsv", ["text", "label"], "classification task")
    test = read_tsv(directory / "test.tsv", ["text", "label"], "classification task")
    labels = _labels(train["label"] + test["label"])
    return classification.ClassificationData(
        train["text"], labels[:len(train["label"])], test["text"], labels[len(train["label"]):],
        source=str(directory))


def load_pair_file(path: Union[str, Path]) -> pair_classification.PairData:
    path = Path(path)
    table = read_tsv(path, ["sentence1", "sentence2", "label"], "pair task")
    labels = []
    for row, value in enumerate(table["label"], start=2):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{path} row {row}: label {value!r} is not 0 or 1.") from None
        labels.append(int(number) if number in (0.0, 1.0) else number)
    return pair_classification.PairData(table["sentence1"], table["sentence2"], labels,
                                        source=str(path))


def load_clustering_file(path: Union[str, Path]) -> clustering.ClusteringData:
    path = Path(path)
    table = read_tsv(path, ["text", "label"], "clustering task", optional=["set"])
    return clustering.ClusteringData(table["text"], _labels(table["label"]), table.get("set"),
                                     source=str(path))


def load_bitext_dir(directory: Union[str, Path]) -> bitext.BitextData:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"bitext task: folder {directory} does not exist.")
    return bitext.BitextData(_read_lines(directory / "src.txt", "bitext task"),
                             _read_lines(directory / "tgt.txt", "bitext task"),
                             source=str(directory))


def load_reranking_file(path: Union[str, Path]) -> reranking.RerankingData:
    path = Path(path)
    examples = []
    for number, record in enumerate(_read_jsonl(path, "reranking task"), start=1):
        missing = [key for key in ("query", "positive", "negative") if key not in record]
        if missing:
            raise ValueError(f"{path}:{number}: missing {missing}; each line needs query, "
                             "positive and negative.")
        examples.append(reranking.RerankingExample(record["query"], list(record["positive"]),
                                                   list(record["negative"])))
    return reranking.RerankingData(examples, source=str(path))


def load_summarization_file(path: Union[str, Path]) -> summarization.SummarizationData:
    path = Path(path)
    examples = []
    for number, record in enumerate(_read_jsonl(path, "summarization task"), start=1):
        missing = [key for key in ("human_summaries", "machine_summaries", "relevance")
                   if key not in record]
        if missing:
            raise ValueError(f"{path}:{number}: missing {missing}.")
        examples.append(summarization.SummarizationExample(
            list(record["human_summaries"]), list(record["machine_summaries"]),
            [float(x) for x in record["relevance"]]))
    return summarization.SummarizationData(examples, source=str(path))


# ------------------------------------------------------------------- the ../shared/data datasets


def load_stsbenchmark(split: str = "test") -> sts.STSData:
    """STS Benchmark release file: headerless TSV, score in column 5, sentences in 6 and 7.

    Quotes in it are not escaped, so it must not go through the csv module.
    """
    path = _require_file(paths.shared_data_root() / "stsbenchmark" / f"sts-{split}.csv",
                         "STSBenchmark")
    sentences1, sentences2, scores = [], [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        fields = line.rstrip("\r").split("\t")
        if len(fields) < 7:
            raise ValueError(f"{path}:{number}: expected at least 7 tab-separated fields.")
        scores.append(float(fields[4]))
        sentences1.append(fields[5])
        sentences2.append(fields[6])
    return sts.STSData(sentences1, sentences2, scores, source=str(path))


STSB_MULTI_MT_LANGUAGES = ("de", "en", "es", "fr", "it", "nl", "pl", "pt", "ru", "zh")


def load_stsb_multi_mt(languages: Sequence[str] = STSB_MULTI_MT_LANGUAGES) -> dict[str, Any]:
    subsets = {}
    for language in languages:
        path = _require_file(paths.shared_data_root() / "stsb_multi_mt" /
                             f"stsb-{language}-test.csv", "STSBenchmarkMultilingualSTS")
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle) if row]
        subsets[language] = sts.STSData([r[0] for r in rows], [r[1] for r in rows],
                                        [float(r[2]) for r in rows], source=str(path))
    return subsets


def _stsb_multi_mt_task(languages: Optional[str] = None) -> Task:
    """All 10 languages (MTEB's task), or those named: 'de es zh' (the spec's '+' reads as a
    space), whose mean is no longer MTEB's score."""
    chosen = STSB_MULTI_MT_LANGUAGES
    if languages is not None:
        chosen = tuple(languages.replace(",", " ").split())
        unknown = sorted(set(chosen) - set(STSB_MULTI_MT_LANGUAGES))
        if unknown or not chosen:
            raise ValueError(f"STSBenchmarkMultilingualSTS: languages={languages!r}: unknown "
                             f"{unknown or 'none given'}; choose from "
                             f"{'+'.join(STSB_MULTI_MT_LANGUAGES)}.")
    subset = chosen != STSB_MULTI_MT_LANGUAGES
    return Task("STSBenchmarkMultilingualSTS", "sts", lambda: load_stsb_multi_mt(chosen),
                f"../shared/data/stsb_multi_mt ({'+'.join(chosen)})",
                (f"STSb translated; mean over {len(chosen)} of the 10 languages "
                 f"({', '.join(chosen)}): not MTEB's 10-language score" if subset else
                 "STSb translated into 10 languages; mean over languages (MTEB)"),
                reference_name=None if subset else "STSBenchmarkMultilingualSTS")


def load_banking77() -> classification.ClassificationData:
    folder = paths.shared_data_root() / "banking77"

    def read(split: str) -> tuple[list[str], list[str]]:
        path = _require_file(folder / f"{split}.csv", "Banking77Classification")
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        return [r["text"] for r in rows], [r["category"] for r in rows]

    train_texts, train_labels = read("train")
    test_texts, test_labels = read("test")
    return classification.ClassificationData(train_texts, train_labels, test_texts, test_labels,
                                             source=str(folder))


def load_cosqa(split: str = "test", num_queries: Optional[int] = None,
               corpus_size: Optional[int] = None, seed: int = 0) -> retrieval.RetrievalData:
    """CoSQA (CoCLR split); num_queries / corpus_size take a seeded sample (retrieval.subsample)
    for short CPU evaluations."""
    data = retrieval.load_beir(paths.shared_data_root() / "cosqa", split=split)
    if num_queries is None and corpus_size is None:
        return data
    return retrieval.subsample(data, num_queries, corpus_size, seed)


def _cosqa_task(name: str, split: str, num_queries: Optional[int] = None,
                corpus_size: Optional[int] = None, seed: int = 0) -> Task:
    sample = ""
    if num_queries or corpus_size:
        sample = (f", sampled: {num_queries or 'all'} queries, corpus of "
                  f"{corpus_size or 'all'} (seed {seed})")
    corpus = f"a sampled corpus of {corpus_size}" if corpus_size else "6,267 functions"
    return Task(name, "retrieval", lambda: load_cosqa(split, num_queries, corpus_size, seed),
                f"../shared/data/cosqa ({split} qrels{sample})",
                f"code search, {split} queries over {corpus} (not MTEB's CosQA corpus)",
                prompt_task=encoders.PROMPT_TASKS["code_retrieval"])


def load_docstring_code(split: str = "test", num_queries: Optional[int] = None,
                        seed: int = 0) -> retrieval.RetrievalData:
    """Docstring -> code retrieval on the offline corpus (gemb.data.code_corpus).

    Queries are the first docstring paragraphs of a split's functions; the corpus is the code
    of the same functions, so every query has exactly one relevant document. The validation and
    test splits are whole modules the training split never saw. num_queries takes a fixed
    random subsample (seeded) to keep evaluation during CPU training short.
    """
    from gemb.data import code_corpus

    records = list(code_corpus.read_split(split))
    if not records:
        raise ValueError(f"the docstring corpus has no {split!r} examples.")
    chosen = range(len(records))
    if num_queries is not None:
        chosen = sorted(np.random.default_rng(seed).permutation(len(records))[:num_queries])
    queries, corpus_ids, corpus_texts, qrels = {}, [], [], {}
    for index in chosen:
        record = records[index]
        qid, did = f"q{index}", f"d{index}"
        queries[qid] = record["query"]
        corpus_ids.append(did)
        corpus_texts.append(record["code"])
        qrels[qid] = {did: 1}
    return retrieval.RetrievalData(corpus_ids=corpus_ids, corpus_texts=corpus_texts,
                                   queries=queries, qrels=qrels, source=f"docstring_code[{split}]")


def _docstring_code_task(name: str = "DocstringCode", split: str = "test",
                         num_queries: Optional[int] = None, seed: int = 0) -> Task:
    sample = f", {num_queries} queries (seed {seed})" if num_queries else ""
    return Task(name, "retrieval", lambda: load_docstring_code(split, num_queries, seed),
                f"gemb.data.code_corpus ({split} split{sample})",
                "docstring -> code retrieval on modules the training split never saw",
                prompt_task=encoders.PROMPT_TASKS["code_retrieval"])


# Options a registered task takes besides name= and prompt_task=, with their types.
REGISTERED_OPTIONS: dict[str, dict[str, type]] = {
    "DocstringCode": {"split": str, "num_queries": int, "seed": int},
    # A seeded sample (queries, and a corpus of their positives plus random others) for CPU runs.
    "CoSQA-CoCLR": {"num_queries": int, "corpus_size": int, "seed": int},
    "CoSQA-CoCLR-dev": {"num_queries": int, "corpus_size": int, "seed": int},
    # Some of the 10 languages, '+'-separated (languages=de+es+zh), for CPU runs.
    "STSBenchmarkMultilingualSTS": {"languages": str},
}


def _registry() -> dict[str, Callable[..., Task]]:
    shared = "../shared/data"
    return {
        "DocstringCode": _docstring_code_task,
        "STSBenchmark": lambda: Task(
            "STSBenchmark", "sts", load_stsbenchmark, f"{shared}/stsbenchmark/sts-test.csv",
            "STS Benchmark test split (MTEB STSBenchmark)", reference_name="STSBenchmark"),
        "STSBenchmarkMultilingualSTS": _stsb_multi_mt_task,
        "Banking77Classification": lambda: Task(
            "Banking77Classification", "classification", load_banking77, f"{shared}/banking77",
            "77 banking intents, MTEB classification protocol",
            reference_name="Banking77Classification"),
        "CoSQA-CoCLR": lambda **options: _cosqa_task("CoSQA-CoCLR", "test", **options),
        "CoSQA-CoCLR-dev": lambda **options: _cosqa_task("CoSQA-CoCLR-dev", "dev", **options),
    }


ALIASES = {
    "stsb": "STSBenchmark",
    "stsbenchmark-multilingual": "STSBenchmarkMultilingualSTS",
    "banking77": "Banking77Classification",
    "cosqa": "CoSQA-CoCLR",
    "cosqa-dev": "CoSQA-CoCLR-dev",
}


def registered_names() -> list[str]:
    return list(_registry())


# ---------------------------------------------------------------------------------- parsing


def _parse_options(task_type: str, query: str, spec: str) -> dict[str, Any]:
    allowed = COMMON_OPTIONS + TYPE_OPTIONS[task_type]
    options: dict[str, Any] = {}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if key not in allowed:
            raise ValueError(f"task {spec!r}: unknown option {key!r}; {task_type} tasks take "
                             f"{', '.join(allowed)}.")
        if key in ("n_experiments", "samples_per_label", "max_documents"):
            try:
                options[key] = int(value)
            except ValueError:
                raise ValueError(f"task {spec!r}: {key} must be an integer, got {value!r}.") \
                    from None
        elif key == "ignore_identical_ids":
            if value.lower() not in ("0", "1", "true", "false"):
                raise ValueError(f"task {spec!r}: ignore_identical_ids must be 0 or 1.")
            options[key] = value.lower() in ("1", "true")
        else:
            options[key] = value
    return options


def _default_name(path: Path) -> str:
    path = path.expanduser()
    if path.name in ("", ".", ".."):
        path = path.resolve()
    return path.name if path.is_dir() or not path.suffix else path.stem


def _registered_task(name: str, query: str, spec: str, registry) -> Task:
    """A registered task, with its options (NAME?key=value&...): name=, prompt_task= and the
    ones REGISTERED_OPTIONS lists for it."""
    allowed = {key: str for key in COMMON_OPTIONS} | REGISTERED_OPTIONS.get(name, {})
    options: dict[str, Any] = {}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key not in allowed:
            raise ValueError(f"task {spec!r}: unknown option {key!r}; {name} takes "
                             f"{', '.join(allowed)}.")
        try:
            options[key] = allowed[key](value)
        except ValueError:
            raise ValueError(f"task {spec!r}: {key} must be {allowed[key].__name__}, got "
                             f"{value!r}.") from None
    file_as = options.pop("name", None)
    prompt_task = options.pop("prompt_task", None)
    task = registry[name](**options)
    if file_as:
        task.name = file_as
    if prompt_task:
        task.prompt_task = prompt_task
    return task


def parse_task(spec: str) -> Task:
    """A Task from a registered name (with options: NAME?key=value) or a TYPE:PATH[?options]
    spec."""
    spec = spec.strip()
    if not spec:
        raise ValueError("empty task name.")
    registry = _registry()
    by_lower = {name.lower(): name for name in registry}
    by_lower.update({alias.lower(): name for alias, name in ALIASES.items()})
    head, _, query = spec.partition("?")
    if head.lower() in by_lower:
        return _registered_task(by_lower[head.lower()], query, spec, registry)
    prefix, colon, rest = spec.partition(":")
    if not colon or prefix not in SPEC_PREFIXES:
        raise ValueError(
            f"unknown task {spec!r}. Registered tasks: {', '.join(registry)}; or give "
            f"TYPE:PATH with TYPE one of {', '.join(SPEC_PREFIXES)} "
            "(e.g. retrieval:/data/scifact, sts:/data/sick.tsv).")
    task_type = SPEC_PREFIXES[prefix]
    path_text, _, query = rest.partition("?")
    if not path_text:
        raise ValueError(f"task {spec!r}: no path after {prefix}:")
    options = _parse_options(task_type, query, spec)
    path = Path(path_text).expanduser()
    name = options.pop("name", None) or _default_name(path)
    prompt_task = options.pop("prompt_task", None)
    loaders: dict[str, Callable[[], Any]] = {
        "retrieval": lambda: retrieval.load_beir(
            path, split=options.get("split", "test"),
            missing_docs=options.get("missing_docs", "error")),
        "sts": lambda: load_sts_file(path),
        "classification": lambda: load_classification_dir(path),
        "pair_classification": lambda: load_pair_file(path),
        "clustering": lambda: load_clustering_file(path),
        "bitext": lambda: load_bitext_dir(path),
        "reranking": lambda: load_reranking_file(path),
        "summarization": lambda: load_summarization_file(path),
    }
    retrieval_options = {k: v for k, v in options.items() if k not in ("split", "missing_docs")}
    return Task(name, task_type, loaders[task_type], str(path), f"{task_type} from {path}",
                options=retrieval_options if task_type == "retrieval" else options,
                prompt_task=prompt_task)


def parse_task_list(specs: Union[str, Sequence[str]]) -> list[Task]:
    """Tasks from a comma-separated string (or a list of specs); names must be unique."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    if not specs:
        raise ValueError("no tasks given.")
    tasks = [parse_task(spec) for spec in specs]
    names = [task.name for task in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"two tasks would both be filed as {duplicates}; give one of them "
                         "?name=OTHER.")
    return tasks
