"""Semantic textual similarity, scored as MTEB scores it.

Both sentences of a pair are embedded (MTEB gives STS no query/document distinction; gemb uses
the query role for both), the cosine of each pair is compared with the gold scores, and the
main score is the Spearman correlation. MTEB min-max normalises the gold scores first; a linear
rescaling changes neither correlation, so it is not repeated here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

# sklearn and scipy are imported inside the scoring functions: with pandas they cost every
# process ~1.5 s at start-up, and `gemb train` imports the evaluators for its eval hook.

from gemb.eval import encoders


@dataclasses.dataclass
class STSData:
    sentences1: list[str]
    sentences2: list[str]
    scores: list[float]
    source: str = ""

    def __post_init__(self):
        where = self.source or "STS data"
        if not (len(self.sentences1) == len(self.sentences2) == len(self.scores)):
            raise ValueError(f"{where}: sentence1, sentence2 and score lists differ in length "
                             f"({len(self.sentences1)}, {len(self.sentences2)}, "
                             f"{len(self.scores)}).")
        if len(self.scores) < 2:
            raise ValueError(f"{where}: {len(self.scores)} pair(s); a correlation needs at "
                             "least 2.")
        if len(set(self.scores)) < 2:
            raise ValueError(f"{where}: every gold score is {self.scores[0]}; a correlation "
                             "with constant scores is undefined.")


def sts_scores(similarities: Sequence[float], gold: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman of predicted similarities against gold scores."""
    from scipy.stats import pearsonr, spearmanr

    similarities = np.asarray(similarities, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.float64)
    if similarities.shape != gold.shape:
        raise ValueError(f"{similarities.shape[0]} similarities for {gold.shape[0]} gold scores.")
    if np.all(similarities == similarities[0]):
        # scipy would return NaN with a warning; a constant prediction carries no ranking.
        return {"pearson": 0.0, "spearman": 0.0}
    return {"pearson": float(pearsonr(gold, similarities)[0]),
            "spearman": float(spearmanr(gold, similarities)[0])}


def evaluate_sts(encoder: Any, data: STSData,
                 prompt_task: Optional[str] = encoders.PROMPT_TASKS["sts"]) -> dict[str, Any]:
    from sklearn.metrics.pairwise import (
        paired_cosine_distances,
        paired_euclidean_distances,
        paired_manhattan_distances,
    )

    embeddings1 = encoders.embed(encoder, data.sentences1, encoders.QUERY, task=prompt_task)
    embeddings2 = encoders.embed(encoder, data.sentences2, encoders.QUERY, task=prompt_task)
    if embeddings1.shape[1] != embeddings2.shape[1]:
        raise ValueError("the two sides of the pairs were embedded with different dimensions.")
    # float32 in, as MTEB computes it; sklearn returns float32 distances for float32 inputs.
    cosine = 1 - paired_cosine_distances(embeddings1, embeddings2)
    manhattan = -paired_manhattan_distances(embeddings1, embeddings2)
    euclidean = -paired_euclidean_distances(embeddings1, embeddings2)
    result: dict[str, Any] = {}
    for name, similarities in (("cosine", cosine), ("manhattan", manhattan),
                               ("euclidean", euclidean)):
        for metric, value in sts_scores(similarities, data.scores).items():
            result[f"{name}_{metric}"] = value
    result["main_score"] = result["cosine_spearman"]
    result["main_score_name"] = "cosine_spearman"
    result["num_pairs"] = len(data.scores)
    return result
