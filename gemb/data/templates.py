"""Task prompts: the one place that decides how a query or a document is written for the model.

The recipe (docs/recipe.md, "Inputs") gives queries a task prompt and documents a
neutral title/text frame:

    query    = "task: {task} | query: {text}"
    document = "title: {title} | text: {text}"      ({title} is "none" when there is no title)

`TASK_DESCRIPTIONS` holds the short task phrases. Every registered task names a default
`PromptTemplate`; a run replaces it per task without touching the registration, through the
training data's `templates` (gin: gemb.train.data.SeqioData.templates):

    SeqioData.templates = {
        'gemb_stsb_train': {'task_description': 'semantic similarity'},
        'gemb_docstring_code': {'document_format': '{text}'},
    }

which `resolve_template` applies when the tasks are registered for that run. Each template
renders in Python (`query`, `document`) and in TensorFlow (`query_tf`, `document_tf`,
elementwise over any shape) and the two renderings are identical, which the tests check.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Mapping, Optional, Union


# Short task phrases of the recipe; keys are what task registrations refer to.
TASK_DESCRIPTIONS = {
    "question_answering": "question answering",
    "fact_checking": "fact checking",
    "search": "search result",
    "sentence_similarity": "sentence similarity",
    "classification": "classification",
    "clustering": "clustering",
    "code_retrieval": "code retrieval",
}

QUERY_FORMAT = "task: {task} | query: {text}"
DOCUMENT_FORMAT = "title: {title} | text: {text}"
EMPTY_TITLE = "none"


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """How one task writes its queries and documents.

    Attributes:
      task_description: the phrase filling {task} (see TASK_DESCRIPTIONS).
      query_format: uses {task} and {text}.
      document_format: uses {title} and {text} (and may use {task}).
      empty_title: what {title} becomes when a document has none.
      symmetric: write documents with the query format too. Symmetric tasks (sentence
        similarity, clustering) compare texts of the same kind, so both sides get the prompt.
    """

    task_description: str
    query_format: str = QUERY_FORMAT
    document_format: str = DOCUMENT_FORMAT
    empty_title: str = EMPTY_TITLE
    symmetric: bool = False

    def __post_init__(self):
        for name in ("query_format", "document_format"):
            fields = _field_names(getattr(self, name))
            unknown = fields - {"task", "title", "text"}
            if unknown:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} uses unknown field(s) {sorted(unknown)}; "
                    "templates may only use {task}, {title} and {text}."
                )
            if "text" not in fields:
                raise ValueError(f"{name}={getattr(self, name)!r} must contain {{text}}.")

    def query(self, text: str) -> str:
        return self.query_format.format(task=self.task_description, title=self.empty_title, text=text)

    def document(self, text: str, title: str = "") -> str:
        if self.symmetric:
            return self.query(text)
        return self.document_format.format(
            task=self.task_description, title=title or self.empty_title, text=text
        )

    def query_tf(self, text):
        return _render_tf(self.query_format, {"task": self.task_description, "title": self.empty_title}, text, None)

    def document_tf(self, text, title=None):
        """Elementwise over `text` (any shape); `title` has the same shape or is None."""
        if self.symmetric:
            return self.query_tf(text)
        import tensorflow as tf

        if title is None:
            title = tf.fill(tf.shape(text), self.empty_title)
        else:
            title = tf.where(tf.strings.length(title) > 0, title, self.empty_title)
        return _render_tf(self.document_format, {"task": self.task_description}, text, title)


def _field_names(fmt: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(fmt) if field is not None}


def _render_tf(fmt: str, constants: Mapping[str, str], text, title):
    """str.format for string tensors: constants are Python strings, text/title tensors."""
    import tensorflow as tf

    pieces = []
    for literal, field, spec, conversion in string.Formatter().parse(fmt):
        if literal:
            pieces.append(literal)
        if field is None:
            continue
        if spec or conversion:
            raise ValueError(f"template {fmt!r}: format specs and conversions are not supported")
        if field == "text":
            pieces.append(text)
        elif field == "title" and title is not None:
            pieces.append(title)
        else:
            pieces.append(constants[field])
    # Broadcast Python-string pieces to the text's shape so tf.strings.join works elementwise.
    tensors = [tf.fill(tf.shape(text), p) if isinstance(p, str) else p for p in pieces]
    if not tensors:
        return tf.fill(tf.shape(text), "")
    return tf.strings.join(tensors)


def default_template(kind: str, **changes: Any) -> PromptTemplate:
    """The recipe's template for a task kind (a key of TASK_DESCRIPTIONS)."""
    if kind not in TASK_DESCRIPTIONS:
        raise ValueError(f"unknown task kind {kind!r}; known: {sorted(TASK_DESCRIPTIONS)}")
    symmetric = kind in ("sentence_similarity", "clustering")
    return dataclasses.replace(
        PromptTemplate(task_description=TASK_DESCRIPTIONS[kind], symmetric=symmetric), **changes
    )


TemplateOverride = Union[PromptTemplate, Mapping[str, Any]]


def resolve_template(task_name: str, default: PromptTemplate,
                     overrides: Optional[Mapping[str, TemplateOverride]] = None) -> PromptTemplate:
    """The template a task uses: its default, with the run's override for it applied
    (overrides: {task name: PromptTemplate or {field: value}})."""
    override = (overrides or {}).get(task_name)
    if override is None:
        return default
    if isinstance(override, PromptTemplate):
        return override
    try:
        return dataclasses.replace(default, **dict(override))
    except TypeError as error:
        raise ValueError(
            f"template override for task {task_name!r} ({override!r}) names a field PromptTemplate "
            f"does not have; fields: {[f.name for f in dataclasses.fields(PromptTemplate)]}"
        ) from error
