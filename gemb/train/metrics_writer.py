"""Console lines and TensorBoard event files for a run, and the eval hook.

TensorBoard events are written with tensorboard's own EventFileWriter and protos, so logging
needs neither TensorFlow nor torch (DESIGN.md convention 10).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from gemb.progress import format_duration

log = logging.getLogger(__name__)


class TensorBoardWriter:
    """Scalars and text into MODEL_DIR/<subdir>/events.out.tfevents.*."""

    def __init__(self, logdir: str | Path):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        Path(logdir).mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(logdir))

    def _event(self, step: int, value) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=[value])
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                               summary=summary))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        from tensorboard.compat.proto import summary_pb2

        for tag, value in values.items():
            self._event(step, summary_pb2.Summary.Value(tag=tag, simple_value=float(value)))

    def text(self, step: int, tag: str, text: str) -> None:
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode()],
                                        tensor_shape=tensor_shape_pb2.TensorShapeProto())
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
        self._event(step, summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=metadata))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the event files of a folder (for tests and scripts)."""
    from tensorboard.backend.event_processing import event_file_loader

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        for event in event_file_loader.EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append((event.step, value.simple_value))
                elif value.metadata.plugin_data.plugin_name == "scalars":
                    out.setdefault(value.tag, []).append(
                        (event.step, float(np.frombuffer(value.tensor.tensor_content, np.float32)[0])
                         if value.tensor.tensor_content else float(value.tensor.float_val[0])))
    return out


@dataclasses.dataclass
class ConsoleLogger:
    """One line every `every` steps: loss, in-batch accuracy, steps/s, tokens/s, ETA."""

    total_steps: int
    every: int = 10
    print_fn: Callable[[str], None] = print

    def __post_init__(self):
        self._last_time = time.time()
        self._last_step: int | None = None
        self._tokens = 0

    def start(self, step: int) -> None:
        self._last_time, self._last_step, self._tokens = time.time(), step, 0

    def add_tokens(self, tokens: int) -> None:
        self._tokens += tokens

    def maybe_log(self, step: int, metrics: Mapping[str, float]) -> dict[str, float] | None:
        """step = steps completed so far. Returns the rate metrics when a line was printed."""
        if step % self.every and step != self.total_steps:
            return None
        now = time.time()
        steps = step - (self._last_step if self._last_step is not None else step - 1)
        elapsed = max(now - self._last_time, 1e-9)
        line = (f"step {step}/{self.total_steps}  loss {metrics['loss']:.4f}  "
                f"acc {metrics.get('accuracy', float('nan')):.3f}  "
                f"lr {metrics.get('learning_rate', float('nan')):.2e}")
        if steps <= 0:  # the window was just restarted (after compiling or evaluating): no rate
            self.print_fn(line)
            return None
        rates = {"steps_per_second": steps / elapsed, "tokens_per_second": self._tokens / elapsed}
        eta = (self.total_steps - step) / max(rates["steps_per_second"], 1e-9)
        self.print_fn(f"{line}  {rates['steps_per_second']:.3f} steps/s  "
                      f"{rates['tokens_per_second']:.0f} tokens/s  ETA {format_duration(eta)}")
        self._last_time, self._last_step, self._tokens = now, step, 0
        return rates


# ------------------------------------------------------------------------------- eval hook

# An evaluator takes (step, encode) and returns {metric: value}. `encode(texts, role)` embeds
# with the CURRENT params (role 'query' or 'document'), as gemb.eval's evaluators expect.
Evaluator = Callable[[int, Callable], Mapping[str, float]]


@dataclasses.dataclass
class EvalHook:
    """Runs registered evaluators every `every` steps (and at the end, with at_end)."""

    evaluators: Mapping[str, Evaluator] = dataclasses.field(default_factory=dict)
    every: int = 0
    at_start: bool = False
    at_end: bool = True

    def due(self, step: int, total_steps: int) -> bool:
        if not self.evaluators:
            return False
        return bool((self.every and step % self.every == 0) or (self.at_end and step == total_steps))

    def run(self, step: int, encode: Callable) -> dict[str, float]:
        results: dict[str, float] = {}
        for name, evaluator in self.evaluators.items():
            start = time.time()
            for key, value in dict(evaluator(step, encode)).items():
                if isinstance(value, (int, float, np.floating, np.integer)):
                    results[f"{name}/{key}"] = float(value)
            log.info("eval %s at step %d took %.1f s", name, step, time.time() - start)
        return results


def format_results(results: Mapping[str, float], keys: Sequence[str] | None = None) -> str:
    keys = keys or sorted(results)
    return "  ".join(f"{k} {results[k]:.4f}" for k in keys if k in results)


Scalars = Mapping[str, Any]
