"""Runs tasks on encoders and files the results.

For each model: one JSON file per task (every metric, the main score, timings, where the data
came from) and a markdown table of main scores; at the end one line per task on stdout,
`TASK<TAB>MAIN_SCORE` with the score x100 to two decimals. Several models make one table with a
column per model, and a model that could not be loaded or scored is named with the reason
instead of silently missing. The training hook (gemb.eval.hook) scores through `run_tasks` too.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, TextIO, Union

from gemb import distributed, paths
from gemb.eval import encoders
from gemb.eval.tasks import Task

logger = logging.getLogger(__name__)

RESULTS_TABLE = "results.md"


def file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "task"


def _json_ready(value: Any) -> Any:
    """Results as plain JSON: numpy scalars become floats, NaN becomes null."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclasses.dataclass
class TaskResult:
    task: str
    task_type: str
    main_score: Optional[float]
    scores: dict[str, Any]
    error: Optional[str] = None


def run_tasks(encoder: Any, tasks: Sequence[Task], *, model_name: str,
              output_dir: Optional[Union[str, Path]] = None, batch_size: int = 32,
              show_progress: Optional[bool] = None,
              embedding_cache: Optional[encoders.EmbeddingCache] = None,
              stop_on_error: bool = False) -> list[TaskResult]:
    """Scores one encoder on every task; a failing task is reported and the rest still run
    (unless stop_on_error)."""
    batched = encoders.BatchedEncoder(encoder, batch_size=batch_size,
                                      show_progress=show_progress, name=model_name)
    # In a multi-process job every process scores every task; process 0 writes the files.
    output = (paths.as_path(output_dir) if output_dir is not None and distributed.is_chief()
              else None)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
    results = []
    for task in tasks:
        logger.info("evaluating %s on %s", model_name, task.name)
        started = time.perf_counter()
        try:
            scores = task.evaluate(batched, embedding_cache=embedding_cache)
            result = TaskResult(task.name, task.task_type, float(scores["main_score"]), scores)
        except (ValueError, FileNotFoundError, TypeError, RuntimeError) as error:
            if stop_on_error:
                raise
            message = f"{type(error).__name__}: {error}"
            print(f"error: task {task.name}: {message}", file=sys.stderr)
            result = TaskResult(task.name, task.task_type, None, {}, error=message)
        if output is not None:
            record = {
                "task": task.name,
                "task_type": task.task_type,
                "model": model_name,
                "main_score": result.main_score,
                "main_score_name": result.scores.get("main_score_name"),
                "scores": result.scores,
                "error": result.error,
                "data": task.source,
                "options": task.options,
                "prompt_task": task.prompt_task,
                "mteb_reference_task": task.reference_name,
                "batch_size": batch_size,
                "seconds": round(time.perf_counter() - started, 2),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            path = output / f"{file_safe(task.name)}.json"
            path.write_text(json.dumps(_json_ready(record), indent=2, ensure_ascii=False) + "\n")
        results.append(result)
    return results


def read_results(output_dir: Union[str, Path]) -> tuple[str, list[TaskResult]]:
    """(model name, results) from a folder run_tasks wrote, e.g. on another machine."""
    output_dir = paths.as_path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"{output_dir} is not a results folder (gemb eval --output).")
    models, results = [], []
    for path in sorted(output_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}).") from error
        if not isinstance(record, dict) or "task" not in record or "main_score" not in record:
            continue  # not a task result (e.g. another tool's file)
        models.append(record.get("model") or output_dir.name)
        results.append(TaskResult(record["task"], record.get("task_type", ""),
                                  record["main_score"], record.get("scores") or {},
                                  record.get("error")))
    if not results:
        raise FileNotFoundError(f"{output_dir} holds no task results (TASK.json files written by "
                                "gemb eval).")
    if len(set(models)) > 1:
        raise ValueError(f"{output_dir} mixes results of several models {sorted(set(models))}; "
                         "give each model's folder on its own.")
    return models[0], results


def format_score(score: Optional[float]) -> str:
    return "n/a" if score is None else f"{100 * score:.2f}"


def markdown_table(results_by_model: Mapping[str, Sequence[TaskResult]],
                   notes: Sequence[str] = (), models_as_rows: bool = False) -> str:
    """Main scores x100: tasks as rows and models as columns, or models_as_rows."""
    models = list(results_by_model)
    task_names: list[str] = []
    for results in results_by_model.values():
        for result in results:
            if result.task not in task_names:
                task_names.append(result.task)
    lookup = {(model, r.task): r for model, results in results_by_model.items() for r in results}

    def cell(model: str, task: str) -> str:
        return format_score(lookup[(model, task)].main_score) if (model, task) in lookup else "n/a"

    if models_as_rows:
        lines = ["| model | " + " | ".join(task_names) + " |",
                 "|---|" + "---:|" * len(task_names)]
        lines += [f"| {m} | " + " | ".join(cell(m, t) for t in task_names) + " |"
                  for m in models]
    else:
        lines = ["| task | " + " | ".join(models) + " |",
                 "|---|" + "---:|" * len(models)]
        lines += [f"| {t} | " + " | ".join(cell(m, t) for m in models) + " |"
                  for t in task_names]
    footnotes = list(notes) + [f"{model}: {r.task} failed: {r.error}"
                               for model, results in results_by_model.items()
                               for r in results if r.error]
    if footnotes:
        lines.append("")
        lines.extend(f"- {note}" for note in footnotes)
    return "\n".join(lines) + "\n"


def print_main_scores(results: Sequence[TaskResult], stream: Optional[TextIO] = None,
                      prefix: str = "") -> None:
    stream = stream or sys.stdout  # looked up now, so redirected stdout is honoured
    for result in results:
        print(f"{prefix}{result.task}\t{format_score(result.main_score)}", file=stream)


def write_table(output_dir: Union[str, Path], table: str) -> Path:
    """Writes the table (process 0 of a multi-process job; the others only return the path)."""
    path = paths.as_path(output_dir) / RESULTS_TABLE
    if distributed.is_chief():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table)
    return path
