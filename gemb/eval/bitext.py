"""Bitext mining: find each source sentence's translation among all target sentences.

As in MTEB: line i of the source is aligned with line i of the target; each source sentence is
matched to its cosine nearest neighbour among the targets; precision, recall and F1 are sklearn's
weighted averages over the gold target indices (zero_division=0). Main score: F1.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

# sklearn and scipy are imported inside the scoring functions: with pandas they cost every
# process ~1.5 s at start-up, and `gemb train` imports the evaluators for its eval hook.

from gemb.eval import encoders
from gemb.eval.retrieval import search_top_k


@dataclasses.dataclass
class BitextData:
    sources: list[str]
    targets: list[str]
    source: str = ""

    def __post_init__(self):
        where = self.source or "bitext data"
        if len(self.sources) != len(self.targets):
            raise ValueError(f"{where}: {len(self.sources)} source lines but {len(self.targets)} "
                             "target lines; the files must be aligned line by line.")
        if not self.sources:
            raise ValueError(f"{where}: no sentence pairs.")


def bitext_scores(predicted: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """MTEB's metrics for predicted target indices against gold indices."""
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    return {
        "precision": float(precision_score(gold, predicted, zero_division=0, average="weighted")),
        "recall": float(recall_score(gold, predicted, zero_division=0, average="weighted")),
        "f1": float(f1_score(gold, predicted, zero_division=0, average="weighted")),
        "accuracy": float(accuracy_score(gold, predicted)),
    }


def evaluate_bitext(encoder: Any, data: BitextData, prompt_task: Optional[str] =
                    encoders.PROMPT_TASKS["bitext"]) -> dict[str, Any]:
    source_embeddings = encoders.embed(encoder, data.sources, encoders.QUERY, task=prompt_task)
    target_embeddings = encoders.embed(encoder, data.targets, encoders.QUERY, task=prompt_task)
    nearest, _ = search_top_k(source_embeddings, target_embeddings, top_k=1)
    result: dict[str, Any] = bitext_scores(nearest[:, 0], np.arange(len(data.sources)))
    result["main_score"] = result["f1"]
    result["main_score_name"] = "f1"
    result["num_pairs"] = len(data.sources)
    return result
