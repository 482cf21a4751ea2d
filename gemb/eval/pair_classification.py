"""Pair classification (duplicate / paraphrase detection), scored as MTEB scores it.

For each pair MTEB computes cosine similarity, dot product, and Manhattan and Euclidean
distances; for each it reports average precision (sklearn) plus the best accuracy and F1 over
thresholds. The main score, max_ap, is the largest AP over those scoring functions (for a
normalised encoder cosine, dot and Euclidean rank pairs identically, so it is the cosine AP).
Thresholds never split tied scores, so the order of tied rows cannot change a metric.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

# sklearn and scipy are imported inside the scoring functions: with pandas they cost every
# process ~1.5 s at start-up, and `gemb train` imports the evaluators for its eval hook.

from gemb.eval import encoders


@dataclasses.dataclass
class PairData:
    sentences1: list[str]
    sentences2: list[str]
    labels: list[int]
    source: str = ""

    def __post_init__(self):
        where = self.source or "pair classification data"
        if not (len(self.sentences1) == len(self.sentences2) == len(self.labels)):
            raise ValueError(f"{where}: sentence1, sentence2 and label lists differ in length.")
        if not self.labels:
            raise ValueError(f"{where}: no pairs.")
        bad = sorted({label for label in self.labels if label not in (0, 1)}, key=str)
        if bad:
            raise ValueError(f"{where}: labels must be 0 or 1, found {bad[:5]}.")
        if len(set(self.labels)) < 2:
            raise ValueError(f"{where}: every pair has label {self.labels[0]}; average "
                             "precision needs both positive (1) and negative (0) pairs.")


def best_accuracy(scores: Sequence[float], labels: np.ndarray,
                  high_score_more_similar: bool) -> tuple[float, float]:
    """Best accuracy of a threshold on the scores, and that threshold."""
    rows = sorted(zip(scores, labels), key=lambda row: row[0], reverse=high_score_more_similar)
    best, threshold = 0.0, -1.0
    positives_above = 0
    negatives_below = int(np.sum(labels == 0))
    for i in range(len(rows) - 1):
        score, label = rows[i]
        if label == 1:
            positives_above += 1
        else:
            negatives_below -= 1
        if score == rows[i + 1][0]:
            continue
        accuracy = (positives_above + negatives_below) / len(labels)
        if accuracy > best:
            best, threshold = accuracy, (rows[i][0] + rows[i + 1][0]) / 2
    return best, threshold


def best_f1(scores: Sequence[float], labels: np.ndarray,
            high_score_more_similar: bool) -> tuple[float, float, float, float]:
    """Best F1 of a threshold: (f1, precision, recall, threshold)."""
    rows = sorted(zip(scores, labels), key=lambda row: row[0], reverse=high_score_more_similar)
    best = (0.0, 0.0, 0.0, 0.0)
    correct = 0
    total_positive = int(np.sum(labels))
    for i, (score, label) in enumerate(rows[:-1]):
        if label == 1:
            correct += 1
        if score == rows[i + 1][0] or correct == 0:
            continue
        precision = correct / (i + 1)
        recall = correct / total_positive
        f1 = 2 * precision * recall / (precision + recall)
        if f1 > best[0]:
            best = (f1, precision, recall, (rows[i][0] + rows[i + 1][0]) / 2)
    return best


def pair_metrics(scores: Sequence[float], labels: Sequence[int],
                 high_score_more_similar: bool = True) -> dict[str, float]:
    from sklearn.metrics import average_precision_score

    labels = np.asarray(labels, dtype=np.int64)
    accuracy, accuracy_threshold = best_accuracy(scores, labels, high_score_more_similar)
    f1, precision, recall, f1_threshold = best_f1(scores, labels, high_score_more_similar)
    sign = 1 if high_score_more_similar else -1
    ap = average_precision_score(labels, sign * np.asarray(scores))
    return {"accuracy": float(accuracy), "accuracy_threshold": float(accuracy_threshold),
            "f1": float(f1), "f1_threshold": float(f1_threshold), "precision": float(precision),
            "recall": float(recall), "ap": float(ap)}


def evaluate_pair_classification(encoder: Any, data: PairData, prompt_task: Optional[str] =
                                 encoders.PROMPT_TASKS["pair_classification"]) -> dict[str, Any]:
    from sklearn.metrics.pairwise import (
        paired_cosine_distances,
        paired_euclidean_distances,
        paired_manhattan_distances,
    )

    embeddings1 = encoders.embed(encoder, data.sentences1, encoders.QUERY, task=prompt_task)
    embeddings2 = encoders.embed(encoder, data.sentences2, encoders.QUERY, task=prompt_task)
    scoring = {
        "cosine": (1 - paired_cosine_distances(embeddings1, embeddings2), True),
        "dot": (np.einsum("ij,ij->i", embeddings1, embeddings2), True),
        "manhattan": (paired_manhattan_distances(embeddings1, embeddings2), False),
        "euclidean": (paired_euclidean_distances(embeddings1, embeddings2), False),
    }
    result: dict[str, Any] = {}
    for name, (scores, higher_is_similar) in scoring.items():
        for metric, value in pair_metrics(scores.tolist(), data.labels, higher_is_similar).items():
            result[f"{name}_{metric}"] = value
    for metric in ("accuracy", "f1", "precision", "recall", "ap"):
        result[f"max_{metric}"] = max(result[f"{name}_{metric}"] for name in scoring)
    result["main_score"] = result["max_ap"]
    result["main_score_name"] = "max_ap"
    result["num_pairs"] = len(data.labels)
    return result
