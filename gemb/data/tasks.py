"""seqio Task registrations for embedding training.

Every task has the same output features (gemb.data.preprocessors.output_features): token ids of
`query`, `positive` and `negatives` [K, n]; K is fixed per task (0 for pairs). Build your own with
`add_embedding_task`; `register_default_tasks(vocabulary)` registers the built-in ones:

  name                    split(s)                 shape                        data
  gemb_docstring_code     train/validation/test    pairs, code retrieval        offline corpus mined from
                                                                                gemb's pinned dependencies
  gemb_stsb_train         train (validation=dev)   STS pairs, score >= 4.0      ../shared/data/stsbenchmark
  gemb_snli_triplets      train                    triplets, 1 hard negative    ../shared/data/snli_triplets
  gemb_banking77_train    train                    classification as retrieval  ../shared/data/banking77
  gemb_cosqa_dev          train (= the dev qrels)  pairs, code retrieval        ../shared/data/cosqa

gemb_stsb_train is STS-scored data: no shipped mixture uses it, because STS is evaluated zero-shot
(as MTEB does); it stays registered for data tests and deliberate ablations.
The ../shared/data tasks are registered only when that folder exists (gemb.paths.shared_data_root).
Tasks are bound to a vocabulary, which is only known once a model is chosen, so registration is an
explicit call (gemb.data.mixtures.build_mixture makes it for a run) rather than an import side
effect; calling it again replaces the tasks, e.g. with another vocabulary, bad-data policy or
prompt overrides. Nothing is read until a dataset is requested.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Optional

import seqio

from gemb import paths
from gemb.data import preprocessors, sources, templates
from gemb.data.quality import QualityPolicy

log = logging.getLogger(__name__)

DOCSTRING_CODE = "gemb_docstring_code"
STSB_TRAIN = "gemb_stsb_train"
SNLI_TRIPLETS = "gemb_snli_triplets"
BANKING77_TRAIN = "gemb_banking77_train"
COSQA_DEV = "gemb_cosqa_dev"
SHARED_TASKS = (STSB_TRAIN, SNLI_TRIPLETS, BANKING77_TRAIN, COSQA_DEV)

# STSb scores run 0-5; 4 and above means "mostly equivalent", a safe positive.
STS_POSITIVE_THRESHOLD = 4.0
_STSB_COLUMNS = ("genre", "file", "year", "id", "score", "sentence1", "sentence2")


def add_embedding_task(
    name: str,
    readers: Mapping[str, sources.RecordReader],
    builder: sources.ExampleBuilder,
    vocabulary: seqio.Vocabulary,
    template: templates.PromptTemplate,
    num_negatives: int = 0,
    policy: Optional[QualityPolicy] = None,
) -> seqio.Task:
    """Registers (or replaces) one embedding task and returns it.

    readers: {split: function returning RawRecords}; builder: record -> Example;
    template: the task's prompts (a registration resolves the run's overrides into it);
    num_negatives: K hard-negative slots per example; policy: bad-data policy (None: the
    default QualityPolicy()).
    """
    seqio.TaskRegistry.remove(name)
    source = sources.InMemoryExampleSource(name, readers, builder, num_negatives=num_negatives, policy=policy)
    return seqio.TaskRegistry.add(
        name,
        source=source,
        output_features=preprocessors.output_features(vocabulary),
        preprocessors=preprocessors.task_preprocessors(template),
        shuffle_buffer_size=None,  # the source shuffles whole splits itself
    )


def num_negatives(task: seqio.Task) -> int:
    """K, the hard-negative slots of a task's examples."""
    return getattr(task.source, "num_negatives", 0)


def register_docstring_code(vocabulary: seqio.Vocabulary, policy: Optional[QualityPolicy] = None,
                            template_overrides: Optional[Mapping] = None) -> str:
    add_embedding_task(
        DOCSTRING_CODE,
        {split: (lambda split=split: sources.read_docstring_code(split)) for split in ("train", "validation", "test")},
        sources.PairBuilder(query_field="query", positive_field="code"),
        vocabulary,
        templates.resolve_template(DOCSTRING_CODE, templates.default_template("code_retrieval"),
                                   template_overrides),
        policy=policy,
    )
    return DOCSTRING_CODE


def register_shared_tasks(
    vocabulary: seqio.Vocabulary, root: Optional[Path] = None, policy: Optional[QualityPolicy] = None,
    template_overrides: Optional[Mapping] = None,
) -> list[str]:
    """Registers the ../shared/data training tasks that exist; returns their names."""

    def template(task_name: str, kind: str) -> templates.PromptTemplate:
        return templates.resolve_template(task_name, templates.default_template(kind),
                                          template_overrides)

    root = Path(root) if root is not None else paths.shared_data_root()
    if not root.is_dir():
        log.info("%s is absent: the shared-data tasks are not registered", root)
        return []
    names = []

    sts = root / "stsbenchmark"
    if sts.is_dir():
        add_embedding_task(
            STSB_TRAIN,
            {
                "train": lambda: sources.read_tsv(str(sts / "sts-train.csv"), columns=_STSB_COLUMNS),
                "validation": lambda: sources.read_tsv(str(sts / "sts-dev.csv"), columns=_STSB_COLUMNS),
            },
            sources.StsPairBuilder(threshold=STS_POSITIVE_THRESHOLD),
            vocabulary,
            template(STSB_TRAIN, "sentence_similarity"),
            policy=policy,
        )
        names.append(STSB_TRAIN)

    snli = root / "snli_triplets"
    if snli.is_dir():
        add_embedding_task(
            SNLI_TRIPLETS,
            {"train": lambda: sources.read_tsv(str(snli / "snli_triplets.tsv"))},
            sources.TripletBuilder(query_field="anchor", positive_field="positive", negative_fields=("negative",)),
            vocabulary,
            template(SNLI_TRIPLETS, "sentence_similarity"),
            num_negatives=1,
            policy=policy,
        )
        names.append(SNLI_TRIPLETS)

    banking = root / "banking77"
    if banking.is_dir():
        labels: tuple[str, ...] = ()
        if (banking / "categories.json").exists():
            labels = tuple(json.loads((banking / "categories.json").read_text()))
        add_embedding_task(
            BANKING77_TRAIN,
            {"train": lambda: sources.read_csv(str(banking / "train.csv"))},
            sources.ClassificationBuilder(text_field="text", label_field="category", labels=labels),
            vocabulary,
            template(BANKING77_TRAIN, "classification"),
            policy=policy,
        )
        names.append(BANKING77_TRAIN)

    cosqa = root / "cosqa"
    if cosqa.is_dir():
        add_embedding_task(
            COSQA_DEV,
            {"train": lambda: sources.read_beir(str(cosqa), "dev")},
            sources.PairBuilder(query_field="query", positive_field="positive", title_field="positive_title"),
            vocabulary,
            template(COSQA_DEV, "code_retrieval"),
            policy=policy,
        )
        names.append(COSQA_DEV)
    return names


def register_default_tasks(
    vocabulary: seqio.Vocabulary,
    include_shared: bool = True,
    policy: Optional[QualityPolicy] = None,
    template_overrides: Optional[Mapping] = None,
) -> list[str]:
    """Registers the docstring corpus and (when present) the ../shared/data tasks."""
    names = [register_docstring_code(vocabulary, policy, template_overrides)]
    if include_shared:
        names += register_shared_tasks(vocabulary, policy=policy,
                                       template_overrides=template_overrides)
    return names
