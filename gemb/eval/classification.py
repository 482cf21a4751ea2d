"""Classification by logistic regression on embeddings, MTEB's protocol step for step.

MTEB (2.x, which reproduces the published 1.x numbers, e.g. MiniLM's 80.04 on Banking77):
  * n_experiments = 10. Before each experiment the list of train indices is shuffled in place by
    a fresh np.random.RandomState(seed=42), so experiment i sees that same permutation applied
    i + 1 times.
  * Walking the shuffled list, the first samples_per_label = 8 examples of each label are taken.
  * LogisticRegression(max_iter=100, random_state=42) is fitted on their embeddings and predicts
    the whole test split; the scores are averaged over the experiments. Main score: accuracy.
Embeddings are used as the encoder returns them (no normalisation), as MTEB does.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections import defaultdict
from typing import Any, Optional, Sequence

import numpy as np

# sklearn and scipy are imported inside the scoring functions: with pandas they cost every
# process ~1.5 s at start-up, and `gemb train` imports the evaluators for its eval hook.

from gemb.eval import encoders

logger = logging.getLogger(__name__)

SEED = 42
N_EXPERIMENTS = 10
SAMPLES_PER_LABEL = 8
MAX_ITER = 100


@dataclasses.dataclass
class ClassificationData:
    train_texts: list[str]
    train_labels: list[Any]
    test_texts: list[str]
    test_labels: list[Any]
    source: str = ""

    def __post_init__(self):
        where = self.source or "classification data"
        if len(self.train_texts) != len(self.train_labels):
            raise ValueError(f"{where}: {len(self.train_texts)} train texts but "
                             f"{len(self.train_labels)} train labels.")
        if len(self.test_texts) != len(self.test_labels):
            raise ValueError(f"{where}: {len(self.test_texts)} test texts but "
                             f"{len(self.test_labels)} test labels.")
        if not self.train_texts or not self.test_texts:
            raise ValueError(f"{where}: the train and the test split must both be non-empty.")
        train_classes = set(self.train_labels)
        if len(train_classes) < 2:
            raise ValueError(f"{where}: the train split has a single label "
                             f"{next(iter(train_classes))!r}; a classifier needs at least two.")
        unseen = set(self.test_labels) - train_classes
        if unseen:
            logger.warning("%s: %d test label(s) never occur in train (e.g. %s); those test "
                           "examples can only be misclassified.", where, len(unseen),
                           sorted(map(str, unseen))[:3])


def undersample_experiments(train_labels: Sequence[Any], n_experiments: int = N_EXPERIMENTS,
                            samples_per_label: int = SAMPLES_PER_LABEL, seed: int = SEED
                            ) -> list[list[int]]:
    """The train indices each experiment uses, in MTEB's order."""
    order = list(range(len(train_labels)))
    experiments = []
    for _ in range(n_experiments):
        # A fresh RandomState every experiment, shuffling the already shuffled list: MTEB's way.
        np.random.RandomState(seed).shuffle(order)
        taken: dict[Any, int] = defaultdict(int)
        selected = []
        for index in order:
            label = train_labels[index]
            if taken[label] < samples_per_label:
                selected.append(index)
                taken[label] += 1
        experiments.append(selected)
    return experiments


def classification_scores(y_true: Sequence[Any], y_pred: Sequence[Any]) -> dict[str, float]:
    """MTEB's per-experiment metrics; AP only for binary tasks (from the predicted labels)."""
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        f1_score,
        precision_score,
        recall_score,
    )

    scores = {
        "accuracy": accuracy_score(y_true, y_pred),
        "f1": f1_score(y_true, y_pred, average="macro"),
        "f1_weighted": f1_score(y_true, y_pred, average="weighted"),
        "precision": precision_score(y_true, y_pred, average="macro", zero_division=0),
        "precision_weighted": precision_score(y_true, y_pred, average="weighted",
                                              zero_division=0),
        "recall": recall_score(y_true, y_pred, average="macro", zero_division=0),
        "recall_weighted": recall_score(y_true, y_pred, average="weighted", zero_division=0),
    }
    if len(np.unique(y_true)) == 2:
        classes = sorted(set(y_true))
        true01 = [classes.index(y) for y in y_true]
        pred01 = [classes.index(y) if y in classes else 0 for y in y_pred]
        scores["ap"] = average_precision_score(true01, pred01, average="macro")
        scores["ap_weighted"] = average_precision_score(true01, pred01, average="weighted")
    return {name: float(value) for name, value in scores.items()}


def fit_and_score(train_embeddings: np.ndarray, train_labels: Sequence[Any],
                  test_embeddings: np.ndarray, test_labels: Sequence[Any],
                  seed: int = SEED, max_iter: int = MAX_ITER) -> dict[str, float]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if len(set(train_labels)) < 2:
        raise ValueError(f"the training sample has a single label {train_labels[0]!r}; logistic "
                         "regression needs at least two.")
    classifier = LogisticRegression(max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        # 100 iterations often stop short of convergence; MTEB accepts that, and so must we
        # to give its numbers.
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(train_embeddings, list(train_labels))
    return classification_scores(list(test_labels), classifier.predict(test_embeddings))


def evaluate_classification(encoder: Any, data: ClassificationData, *,
                            n_experiments: int = N_EXPERIMENTS,
                            samples_per_label: int = SAMPLES_PER_LABEL, seed: int = SEED,
                            max_iter: int = MAX_ITER,
                            prompt_task: Optional[str] = encoders.PROMPT_TASKS["classification"]
                            ) -> dict[str, Any]:
    experiments = undersample_experiments(data.train_labels, n_experiments, samples_per_label,
                                          seed)
    # Only the train examples some experiment uses are embedded (MTEB does the same).
    used = sorted(set().union(*experiments))
    row_of = {index: row for row, index in enumerate(used)}
    train_embeddings = encoders.embed(encoder, [data.train_texts[i] for i in used],
                                      encoders.QUERY, task=prompt_task)
    test_embeddings = encoders.embed(encoder, data.test_texts, encoders.QUERY, task=prompt_task)

    per_experiment = []
    for selected in experiments:
        rows = [row_of[i] for i in selected]
        per_experiment.append(fit_and_score(
            train_embeddings[rows], [data.train_labels[i] for i in selected],
            test_embeddings, data.test_labels, seed=seed, max_iter=max_iter))
    result: dict[str, Any] = {
        name: float(np.mean([scores[name] for scores in per_experiment]))
        for name in per_experiment[0]
    }
    result["scores_per_experiment"] = per_experiment
    result["main_score"] = result["accuracy"]
    result["main_score_name"] = "accuracy"
    result["num_train_embedded"] = len(used)
    result["num_test"] = len(data.test_texts)
    return result
