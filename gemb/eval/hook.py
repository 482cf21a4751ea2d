"""Evaluation during training: the same tasks `gemb eval` scores, on the params being trained.

`EvalHook` holds task specs (gemb.eval.tasks) and a schedule; the trainer calls
`run(step, encoder)` with a `TrainingEncoder` bound to the current params and writes what comes
back to its console, metrics file and TensorBoard writer. Scores are named TASK/METRIC
(`metrics` picks which; by default each task's main score).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Optional, Sequence, Union

from gemb.eval import runner
from gemb.eval.tasks import Task, parse_task_list

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalHook:
    """Tasks scored every `every` steps (0: never in between), before training (at_start, on a
    fresh run) and after the last step (at_end).

    Attributes:
      tasks: task specs as `gemb eval --tasks` takes them (or Task objects), e.g.
        ['DocstringCode?split=test&num_queries=200&name=docstring_code', 'STSBenchmark'].
      metrics: the scores logged per task (e.g. 'recall_at_10'); empty: 'main_score'.
      max_length: tokens per text of the evaluation encoder (None: its default).
      batch_size: texts per evaluation batch.
    """

    tasks: Sequence[Union[str, Task]] = ()
    every: int = 0
    at_start: bool = False
    at_end: bool = True
    metrics: Sequence[str] = ()
    max_length: Optional[int] = None
    batch_size: int = 32

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"EvalHook.every must be >= 0, got {self.every}")
        specs = [t for t in self.tasks if isinstance(t, str)]
        parsed = parse_task_list(specs) if specs else []
        by_spec = iter(parsed)
        self._tasks = [next(by_spec) if isinstance(t, str) else t for t in self.tasks]

    @property
    def task_list(self) -> list[Task]:
        return list(self._tasks)

    def due(self, step: int, total_steps: int) -> bool:
        if not self._tasks:
            return False
        return bool((self.every and step % self.every == 0)
                    or (self.at_end and step == total_steps))

    def run(self, step: int, encoder: Any) -> dict[str, float]:
        """{TASK/METRIC: value} of every task on `encoder` (a task that fails is reported on
        stderr and left out: a broken evaluation must not end a training run)."""
        results = runner.run_tasks(encoder, self._tasks, model_name=f"step {step}",
                                   batch_size=self.batch_size, show_progress=False)
        wanted = tuple(self.metrics) or ("main_score",)
        out: dict[str, float] = {}
        for result in results:
            for metric in wanted:
                value = result.scores.get(metric)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[f"{result.task}/{metric}"] = float(value)
        return out


class TrainingEncoder:
    """A gemb TextEncoder over the params of a training run, rebound before each evaluation
    (compiled once: the params change, their shapes and shardings do not)."""

    def __init__(self, encoder_config, tokenizer_dir, partitioner,
                 max_length: Optional[int] = None, batch_size: int = 32):
        from gemb.embed import TextEncoder
        from gemb.tokenizer import Tokenizer

        self._make = lambda params: TextEncoder(  # noqa: E731
            encoder_config, params, Tokenizer.from_dir(tokenizer_dir), max_length=max_length,
            batch_size=batch_size, partitioner=partitioner)
        self._encoder = None

    def with_params(self, encoder_params) -> Any:
        if self._encoder is None:
            self._encoder = self._make(encoder_params)
        self._encoder.params = encoder_params
        return self._encoder


def format_results(results: Mapping[str, float], keys: Sequence[str] | None = None) -> str:
    keys = keys or sorted(results)
    return "  ".join(f"{k} {results[k]:.4f}" for k in keys if k in results)
