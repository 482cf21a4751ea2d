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

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class TaskDefinition:
    """A built-in task as data: its source, builder, prompt kind and K. The in-memory
    registration below and `gemb data prepare` (gemb.data.prepare) both start from it."""

    name: str
    source: sources.SourceSpec
    builder: sources.ExampleBuilder
    template_kind: str
    num_negatives: int = 0

    def template(self, overrides: Optional[Mapping] = None) -> templates.PromptTemplate:
        return templates.resolve_template(self.name, templates.default_template(self.template_kind),
                                          overrides)


def docstring_code_definition() -> TaskDefinition:
    return TaskDefinition(
        DOCSTRING_CODE,
        sources.SourceSpec.of("docstring_code", {s: s for s in ("train", "validation", "test")}),
        sources.PairBuilder(query_field="query", positive_field="code"), "code_retrieval")


def shared_task_definitions(root: Optional[Path] = None) -> dict[str, TaskDefinition]:
    """The ../shared/data tasks whose folders exist under `root` (default: the shared root)."""
    root = Path(root) if root is not None else paths.shared_data_root()
    found: dict[str, TaskDefinition] = {}
    sts = root / "stsbenchmark"
    if sts.is_dir():
        found[STSB_TRAIN] = TaskDefinition(
            STSB_TRAIN,
            sources.SourceSpec.of("tsv", {"train": str(sts / "sts-train.csv"),
                                          "validation": str(sts / "sts-dev.csv")},
                                  columns=_STSB_COLUMNS),
            sources.StsPairBuilder(threshold=STS_POSITIVE_THRESHOLD), "sentence_similarity")
    snli = root / "snli_triplets"
    if snli.is_dir():
        found[SNLI_TRIPLETS] = TaskDefinition(
            SNLI_TRIPLETS, sources.SourceSpec.of("tsv", {"train": str(snli / "snli_triplets.tsv")}),
            sources.TripletBuilder(query_field="anchor", positive_field="positive",
                                   negative_fields=("negative",)),
            "sentence_similarity", num_negatives=1)
    banking = root / "banking77"
    if banking.is_dir():
        labels: tuple[str, ...] = ()
        if (banking / "categories.json").exists():
            labels = tuple(json.loads((banking / "categories.json").read_text()))
        found[BANKING77_TRAIN] = TaskDefinition(
            BANKING77_TRAIN, sources.SourceSpec.of("csv", {"train": str(banking / "train.csv")}),
            sources.ClassificationBuilder(text_field="text", label_field="category", labels=labels),
            "classification")
    cosqa = root / "cosqa"
    if cosqa.is_dir():
        # The dev qrels are the training split of this task (the test qrels stay for eval).
        found[COSQA_DEV] = TaskDefinition(
            COSQA_DEV, sources.SourceSpec.of("beir", {"train": str(cosqa)}, split_name="dev"),
            sources.PairBuilder(query_field="query", positive_field="positive",
                                title_field="positive_title"), "code_retrieval")
    return found


def builtin_task_definitions(root: Optional[Path] = None) -> dict[str, TaskDefinition]:
    return {DOCSTRING_CODE: docstring_code_definition(), **shared_task_definitions(root)}


def register_definition(definition: TaskDefinition, vocabulary: seqio.Vocabulary,
                        policy: Optional[QualityPolicy] = None,
                        template_overrides: Optional[Mapping] = None) -> seqio.Task:
    return add_embedding_task(definition.name, definition.source.readers(), definition.builder,
                              vocabulary, definition.template(template_overrides),
                              num_negatives=definition.num_negatives, policy=policy)


def register_docstring_code(vocabulary: seqio.Vocabulary, policy: Optional[QualityPolicy] = None,
                            template_overrides: Optional[Mapping] = None) -> str:
    register_definition(docstring_code_definition(), vocabulary, policy, template_overrides)
    return DOCSTRING_CODE


def register_shared_tasks(
    vocabulary: seqio.Vocabulary, root: Optional[Path] = None, policy: Optional[QualityPolicy] = None,
    template_overrides: Optional[Mapping] = None,
) -> list[str]:
    """Registers the ../shared/data training tasks that exist; returns their names."""
    root = Path(root) if root is not None else paths.shared_data_root()
    if not root.is_dir():
        log.info("%s is absent: the shared-data tasks are not registered", root)
        return []
    definitions = shared_task_definitions(root)
    for definition in definitions.values():
        register_definition(definition, vocabulary, policy, template_overrides)
    return list(definitions)


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
