"""Clustering: V-measure of mini-batch k-means on embeddings, with MTEB's settings.

Two MTEB protocols exist and tasks name the one they use:

* "legacy" (AbsTaskClusteringLegacy, the original MTEB tasks such as ArxivClusteringS2S):
  every set of texts is clustered once with
  MiniBatchKMeans(n_clusters=#labels, batch_size=500, n_init="auto", random_state=42);
  the score is the mean V-measure over the sets. A set with a single label scores 1.0 without
  being clustered (MTEB's rule: V-measure is 1 for a trivial partition).
* "fast" (AbsTaskClustering, the ".v2" tasks): all texts are embedded once, then
  n_experiments = 10 times a bootstrap sample of 16384 texts is drawn with replacement
  (random.Random(42).choices, whatever the number of texts) and clustered with
  MiniBatchKMeans(n_clusters=#labels, batch_size=512, init="k-means++", n_init=1,
  random_state=42); the score is the mean V-measure.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Any, Optional, Sequence

import numpy as np

# sklearn and scipy are imported inside the scoring functions: with pandas they cost every
# process ~1.5 s at start-up, and `gemb train` imports the evaluators for its eval hook.

from gemb.eval import encoders

logger = logging.getLogger(__name__)

SEED = 42
LEGACY_BATCH_SIZE = 500
FAST_BATCH_SIZE = 512
FAST_EXPERIMENTS = 10
FAST_SAMPLE_SIZE = 16_384
PROTOCOLS = ("legacy", "fast")


@dataclasses.dataclass
class ClusteringData:
    """Texts with gold labels, grouped into sets that are clustered separately."""

    texts: list[str]
    labels: list[Any]
    set_ids: Optional[list[Any]] = None
    source: str = ""

    def __post_init__(self):
        where = self.source or "clustering data"
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{where}: {len(self.texts)} texts but {len(self.labels)} labels.")
        if not self.texts:
            raise ValueError(f"{where}: no texts to cluster.")
        if self.set_ids is not None and len(self.set_ids) != len(self.texts):
            raise ValueError(f"{where}: {len(self.set_ids)} set ids for {len(self.texts)} texts.")
        if len(set(self.labels)) < 2:
            raise ValueError(f"{where}: every text has the label {self.labels[0]!r}; clustering "
                             "a single class measures nothing (V-measure is 1 for any "
                             "clustering).")

    def sets(self) -> list[list[int]]:
        """Indices of each set, in order of first appearance."""
        if self.set_ids is None:
            return [list(range(len(self.texts)))]
        groups: dict[Any, list[int]] = {}
        for index, set_id in enumerate(self.set_ids):
            groups.setdefault(set_id, []).append(index)
        return list(groups.values())


def cluster_v_measure(embeddings: np.ndarray, labels: Sequence[Any], *,
                      batch_size: int = LEGACY_BATCH_SIZE, seed: int = SEED) -> float:
    """One legacy clustering run: k-means with k = number of gold labels, V-measure."""
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.metrics.cluster import v_measure_score

    n_clusters = len(set(labels))
    if n_clusters <= 1:
        return 1.0
    model = MiniBatchKMeans(n_clusters=n_clusters, batch_size=batch_size, n_init="auto",
                            random_state=seed)
    model.fit(embeddings)
    return float(v_measure_score(list(labels), model.labels_.tolist()))


def bootstrap_v_measures(embeddings: np.ndarray, labels: Sequence[Any], *,
                         n_experiments: int = FAST_EXPERIMENTS,
                         sample_size: int = FAST_SAMPLE_SIZE,
                         batch_size: int = FAST_BATCH_SIZE, seed: int = SEED,
                         rng: Optional[random.Random] = None) -> list[float]:
    """The fast protocol's V-measures, one per bootstrap sample."""
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.metrics.cluster import v_measure_score

    rng = rng if rng is not None else random.Random(seed)
    labels = np.asarray(labels)
    model = MiniBatchKMeans(n_clusters=np.unique(labels).size, batch_size=batch_size,
                            init="k-means++", n_init=1, random_state=seed)
    v_measures = []
    for _ in range(n_experiments):
        sample = rng.choices(range(len(labels)), k=sample_size)
        assignment = model.fit_predict(embeddings[sample])
        v_measures.append(float(v_measure_score(labels[sample], assignment)))
    return v_measures


def evaluate_clustering(encoder: Any, data: ClusteringData, *, protocol: str = "legacy",
                        seed: int = SEED, max_documents: Optional[int] = None,
                        fast_experiments: int = FAST_EXPERIMENTS,
                        fast_sample_size: int = FAST_SAMPLE_SIZE,
                        prompt_task: Optional[str] = encoders.PROMPT_TASKS["clustering"]
                        ) -> dict[str, Any]:
    """V-measure under MTEB's legacy or fast protocol (see the module docstring).

    max_documents (fast protocol only) embeds a random subset first, as MTEB's
    max_document_to_embed does, drawn with the same random.Random(seed) stream.
    fast_experiments and fast_sample_size are MTEB's n_clusters and max_documents_per_cluster.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"clustering protocol must be one of {PROTOCOLS}, got {protocol!r}")
    result: dict[str, Any] = {"protocol": protocol}
    if protocol == "legacy":
        v_measures = []
        for indices in data.sets():
            set_labels = [data.labels[i] for i in indices]
            if len(set(set_labels)) <= 1:
                logger.warning("%s: a clustering set has one label; it scores 1.0 as in MTEB.",
                               data.source or "clustering data")
                v_measures.append(1.0)
                continue
            embeddings = encoders.embed(encoder, [data.texts[i] for i in indices],
                                        encoders.QUERY, task=prompt_task)
            v_measures.append(cluster_v_measure(embeddings, set_labels, seed=seed))
    else:
        if data.set_ids is not None:
            raise ValueError("the fast clustering protocol takes one set of texts; drop the set "
                             "column or use protocol=legacy.")
        rng = random.Random(seed)
        indices = list(range(len(data.texts)))
        if max_documents is not None and max_documents < len(indices):
            indices = rng.sample(range(len(data.texts)), k=max_documents)
        embeddings = encoders.embed(encoder, [data.texts[i] for i in indices], encoders.QUERY,
                                    task=prompt_task)
        labels = [data.labels[i] for i in indices]
        v_measures = bootstrap_v_measures(embeddings, labels, n_experiments=fast_experiments,
                                          sample_size=fast_sample_size, seed=seed, rng=rng)
    result["v_measure"] = float(np.mean(v_measures))
    result["v_measure_std"] = float(np.std(v_measures))
    result["v_measures"] = v_measures
    result["main_score"] = result["v_measure"]
    result["main_score_name"] = "v_measure"
    return result
