"""Summary quality: does embedding similarity rank machine summaries as humans do? (SummEval)

MTEB's definition: each machine summary scores the maximum cosine similarity between it and
the human (reference) summaries of the same text; per text, the Spearman correlation of those
scores with the human relevance ratings is computed; the main score is the mean over texts.
A text is skipped when its human ratings or its predicted scores (cosine or dot) are all equal,
since a correlation is then undefined.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import numpy as np

# sklearn and scipy are imported inside the scoring functions: with pandas they cost every
# process ~1.5 s at start-up, and `gemb train` imports the evaluators for its eval hook.

from gemb.eval import encoders
from gemb.eval.retrieval import normalize_rows

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SummarizationExample:
    human_summaries: list[str]
    machine_summaries: list[str]
    relevance: list[float]


@dataclasses.dataclass
class SummarizationData:
    examples: list[SummarizationExample]
    source: str = ""

    def __post_init__(self):
        where = self.source or "summarization data"
        if not self.examples:
            raise ValueError(f"{where}: no texts.")
        for i, example in enumerate(self.examples):
            if not example.human_summaries or not example.machine_summaries:
                raise ValueError(f"{where}: text {i} needs at least one human and one machine "
                                 "summary.")
            if len(example.machine_summaries) != len(example.relevance):
                raise ValueError(f"{where}: text {i} has {len(example.machine_summaries)} machine "
                                 f"summaries but {len(example.relevance)} relevance scores.")


def _flatten(groups: list[list[str]]) -> tuple[list[str], list[int]]:
    texts = [text for group in groups for text in group]
    return texts, np.cumsum([len(group) for group in groups])[:-1].tolist()


def evaluate_summarization(encoder: Any, data: SummarizationData, prompt_task: Optional[str] =
                           encoders.PROMPT_TASKS["summarization"]) -> dict[str, Any]:
    from scipy.stats import pearsonr, spearmanr

    human_texts, human_splits = _flatten([e.human_summaries for e in data.examples])
    machine_texts, machine_splits = _flatten([e.machine_summaries for e in data.examples])
    human = np.split(encoders.embed(encoder, human_texts, encoders.QUERY, task=prompt_task),
                     human_splits)
    machine = np.split(encoders.embed(encoder, machine_texts, encoders.QUERY, task=prompt_task),
                       machine_splits)
    correlations: dict[str, list[float]] = {"cosine_spearman": [], "cosine_pearson": [],
                                            "dot_spearman": [], "dot_pearson": []}
    skipped = 0
    for example, human_embeddings, machine_embeddings in zip(data.examples, human, machine):
        cosine = (normalize_rows(machine_embeddings) @ normalize_rows(human_embeddings).T).max(1)
        dot = (machine_embeddings @ human_embeddings.T).max(axis=1)
        gold = list(example.relevance)
        if len(set(gold)) == 1 or len(set(cosine.tolist())) == 1 or len(set(dot.tolist())) == 1:
            skipped += 1
            continue
        correlations["cosine_spearman"].append(float(spearmanr(gold, cosine).statistic))
        correlations["cosine_pearson"].append(float(pearsonr(gold, cosine).statistic))
        correlations["dot_spearman"].append(float(spearmanr(gold, dot).statistic))
        correlations["dot_pearson"].append(float(pearsonr(gold, dot).statistic))
    if not correlations["cosine_spearman"]:
        raise ValueError(f"{data.source or 'summarization data'}: every text was skipped (equal "
                         "human ratings or equal predicted scores); nothing to correlate.")
    result: dict[str, Any] = {name: float(np.mean(values))
                              for name, values in correlations.items()}
    result["main_score"] = result["cosine_spearman"]
    result["main_score_name"] = "cosine_spearman"
    result["num_texts"] = len(data.examples)
    result["num_skipped_texts"] = skipped
    return result
