"""Console lines, the metrics file and TensorBoard event files of a run (its one writer).

TensorBoard events are written with tensorboard's own record format and protos, so logging
needs neither TensorFlow nor torch (docs/design.md, convention 10).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from gemb import paths
from gemb.progress import format_duration

log = logging.getLogger(__name__)
_WRITER_IDS = itertools.count()  # two writers of one process in one second get two files


class TensorBoardWriter:
    """Scalars and text into MODEL_DIR/<subdir>/events.out.tfevents.*.

    Events are written in the caller's thread, straight to a local file: a failed write (a
    full disk) is an OSError where it happens, which the trainer turns into one clear line.
    tensorboard's EventFileWriter would write from a background thread through tf.io.gfile
    whenever TensorFlow is installed, printing the failure as a thread traceback and raising
    a TensorFlow error one write later. A few scalars every log_every steps cost nothing.
    """

    def __init__(self, logdir: str | Path):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        logdir = paths.as_path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                f"{os.getpid()}.{next(_WRITER_IDS)}")
        self.path = logdir / name
        self._records = RecordWriter(_open_for_appending(self.path, b""))
        self._add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def _add(self, event) -> None:
        self._records.write(event.SerializeToString())

    def _event(self, step: int, value) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=[value])
        self._add(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def summary(self, step: int, summary) -> None:
        """A whole Summary proto (e.g. tensorboard's HParams plugin summaries)."""
        from tensorboard.compat.proto import event_pb2

        self._add(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

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

    def purge_from(self, step: int) -> None:
        """Tells TensorBoard to drop this run's earlier points at steps >= `step` (a resumed run
        trains those steps again): a SessionLog START event, which TensorBoard's loaders treat
        as "discard what came after this step in earlier files"."""
        from tensorboard.compat.proto import event_pb2

        self._add(event_pb2.Event(
            wall_time=time.time(), step=int(step),
            session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        if not self._records.closed:
            self._records.close()


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the event files of a folder (for tests and scripts)."""
    from tensorboard.backend.event_processing import event_file_loader

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(paths.as_path(logdir).glob("events.out.tfevents.*")):
        # tensorboard's loader opens local files only: a remote one is read from a copy.
        for event in event_file_loader.EventFileLoader(str(paths.local_copy(path))).Load():
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append((event.step, value.simple_value))
                elif value.metadata.plugin_data.plugin_name == "scalars":
                    out.setdefault(value.tag, []).append(
                        (event.step, float(np.frombuffer(value.tensor.tensor_content, np.float32)[0])
                         if value.tensor.tensor_content else float(value.tensor.float_val[0])))
    return out


def open_metrics_file(path: Path, keep_through_step: int):
    """The run's JSONL metrics file opened for appending (text), after dropping the records of
    steps after `keep_through_step` (those a resumed run trains again). Rewritten atomically,
    so a crash here leaves the old file."""
    path = paths.as_path(path)
    kept = ""
    if path.exists():
        lines = []
        for line in path.read_text().splitlines():
            try:
                if int(json.loads(line)["step"]) <= keep_through_step:
                    lines.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill -9 mid-write
        kept = "".join(line + "\n" for line in lines)
        if not paths.is_remote(path):
            staging = path.with_name(path.name + ".tmp")
            staging.write_text(kept)
            os.replace(staging, path)
    if paths.is_remote(path):
        return io.TextIOWrapper(_open_for_appending(path, kept.encode()), encoding="utf-8",
                                write_through=True)
    return path.open("a")


def _open_for_appending(path, content: bytes):
    """A binary file to append to: a local file, or on object storage a WholeObjectFile."""
    if paths.is_remote(path):
        return WholeObjectFile(path, content)
    return path.open("wb")


class WholeObjectFile(io.RawIOBase):
    """An append-only log on object storage (gs://), which cannot append to an object: the
    content is kept in memory and every flush uploads all of it again, as TensorFlow's GCS
    writer does. Meant for a run's small logs (metrics lines, TensorBoard scalars), which a
    viewer can follow while the run goes on."""

    def __init__(self, path, content: bytes = b""):
        super().__init__()
        self.path = path
        self._content = bytearray(content)
        self._flushed_size = -1

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._content += data
        return len(data)

    def flush(self) -> None:
        if self.closed or self._flushed_size == len(self._content):
            return
        with self.path.open("wb") as handle:
            handle.write(bytes(self._content))
        self._flushed_size = len(self._content)

    def close(self) -> None:
        if not self.closed:
            self.flush()
        super().close()


@dataclasses.dataclass
class ConsoleLogger:
    """One line every `every` steps: loss, in-batch accuracy, steps/s, tokens/s, MFU, ETA.

    peak_flops: the bf16 peak FLOP/s of ALL devices of the run together (gemb.train.flops); with
    it, and model FLOPs added per step (`add_flops`), the line shows the model FLOPs
    utilisation of the window; None leaves MFU out.
    """

    total_steps: int
    every: int = 10
    print_fn: Callable[[str], None] = print
    peak_flops: float | None = None

    def __post_init__(self):
        self._last_time = time.time()
        self._last_step: int | None = None
        self._tokens = 0
        self._flops = 0

    def start(self, step: int) -> None:
        self._last_time, self._last_step, self._tokens, self._flops = time.time(), step, 0, 0

    def add_tokens(self, tokens: int) -> None:
        self._tokens += tokens

    def add_flops(self, flops: int) -> None:
        """Model FLOPs of a step read in this window (gemb.train.flops.train_step_flops)."""
        self._flops += flops

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
        utilization = ""
        if self.peak_flops:
            # The same window as the rates, so the compiling first step stays out of it too.
            rates["mfu"] = self._flops / elapsed / self.peak_flops
            utilization = f"  MFU {rates['mfu']:.2f}"
        eta = (self.total_steps - step) / max(rates["steps_per_second"], 1e-9)
        self.print_fn(f"{line}  {rates['steps_per_second']:.3f} steps/s  "
                      f"{rates['tokens_per_second']:.0f} tokens/s{utilization}  "
                      f"ETA {format_duration(eta)}")
        self._last_time, self._last_step, self._tokens, self._flops = now, step, 0, 0
        return rates
