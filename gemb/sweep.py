"""`gemb sweep`: a grid and/or random draws of gin bindings over a base run, as named runs.

A sweep file is TOML (Python's own tomllib reads it):

    name = "lr_temperature"
    gin_files = ["gin/runs/quickstart.gin"]        # the base run (its first file is RUN.gin)
    bindings = ["train.num_steps = 50"]            # fixed for every run
    root = "runs/sweeps"                           # runs go to ROOT/NAME/RUN

    [grid]                                         # every combination
    "OptimizerConfig.learning_rate" = [1e-4, 3e-4]
    "ContrastiveLossConfig.temperature" = [0.02, 0.05]

    [random]                                       # `count` draws, per grid point
    count = 2
    seed = 0
    "OptimizerConfig.weight_decay" = {log_uniform = [1e-4, 1e-1]}
    "SeqioData.seed" = {choice = [0, 1, 2]}
    "OptimizerConfig.warmup_steps" = {int_uniform = [5, 20]}

Runs are named NAME-000, NAME-001, ... in expansion order (grid in the file's key order, the
last key fastest; then the draws), and each run's MODEL_DIR is ROOT/NAME/RUN.

  gemb sweep run SWEEP.toml [--parallel N] [--dry_run]   # locally, N runs at a time
  gemb sweep table SWEEP.toml                            # results.md / results.csv
  gemb sweep emit SWEEP.toml --launcher xpk|tpu_vm|slurm [launcher arguments]

`run` is resumable: a run that finished (ROOT/NAME/RUN/sweep_run.json, written after `gemb
train` exits 0) is not run again; an unfinished one is started again and `gemb train` resumes it
from its checkpoints. After the runs, the table: each run's bindings, its status, its final
training loss and the last value of every evaluation metric (the run's EvalHook, read from its
TensorBoard events), as ROOT/NAME/results.md and results.csv, and TensorBoard's HParams view
(ROOT/NAME/hparams: `tensorboard --logdir ROOT/NAME`).

`emit` prints one launch command per run through the launch/ scripts (one job per run): xpk
workloads, TPU VM pod runs, or one SLURM array job over ROOT/NAME/slurm_runs.tsv.

xmanager (Google's experiment launcher) is not used: its local executor runs jobs in Docker
containers and its remote ones target Vertex AI; gemb's runs are plain `gemb train` commands
that the launch/ scripts already start on xpk, TPU VMs and SLURM, so a sweep is their list.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import io
import itertools
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

DONE_FILE = "sweep_run.json"
DISTRIBUTIONS = ("choice", "uniform", "log_uniform", "int_uniform")


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    gin_files: tuple[str, ...]
    bindings: tuple[str, ...] = ()
    root: str = "runs/sweeps"
    grid: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    random: tuple[tuple[str, tuple[str, Any]], ...] = ()
    count: int = 0
    seed: int = 0

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.name


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    bindings: tuple[tuple[str, Any], ...]  # the swept values only
    model_dir: Path

    def gin_flags(self) -> list[str]:
        return [f"--gin.{key}={gin_value(value)}" for key, value in self.bindings]


def gin_value(value: Any) -> str:
    """A Python value as gin text: strings quoted, lists as tuples."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "(" + "".join(f"{gin_value(v)}, " for v in value) + ")"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def load_sweep(path: str | os.PathLike) -> Sweep:
    """A Sweep from a TOML file; errors name the file and the key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"sweep file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"sweep file {path} is not valid TOML: {error}") from None
    known = {"name", "gin_files", "bindings", "root", "grid", "random"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; a sweep file has {sorted(known)}.")
    if not isinstance(data.get("name"), str) or not data["name"]:
        raise ValueError(f"{path}: `name` (a string: the sweep's folder and run prefix) is "
                         "missing.")
    gin_files = data.get("gin_files")
    if not gin_files or not all(isinstance(f, str) for f in gin_files):
        raise ValueError(f"{path}: `gin_files` must list the base run's gin files.")
    grid = []
    for key, values in (data.get("grid") or {}).items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: grid.{key} must be a non-empty list of values.")
        grid.append((key, tuple(values)))
    random_section = dict(data.get("random") or {})
    count = random_section.pop("count", 0)
    seed = random_section.pop("seed", 0)
    draws = []
    for key, spec in random_section.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ValueError(f"{path}: random.{key} must be one of {{choice = [...]}}, "
                             "{uniform = [low, high]}, {log_uniform = [low, high]}, "
                             "{int_uniform = [low, high]}.")
        kind, argument = next(iter(spec.items()))
        if kind != "choice" and (not isinstance(argument, list) or len(argument) != 2):
            raise ValueError(f"{path}: random.{key}: {kind} takes [low, high].")
        if kind == "log_uniform" and min(argument) <= 0:
            raise ValueError(f"{path}: random.{key}: log_uniform needs low > 0.")
        draws.append((key, (kind, tuple(argument))))
    if draws and (not isinstance(count, int) or count < 1):
        raise ValueError(f"{path}: [random] has distributions but count = {count!r}; set "
                         "count = N draws.")
    swept = [k for k, _ in grid] + [k for k, _ in draws]
    if len(set(swept)) != len(swept):
        raise ValueError(f"{path}: a binding is both in [grid] and [random]: {swept}.")
    return Sweep(data["name"], tuple(gin_files), tuple(data.get("bindings") or ()),
                 data.get("root", "runs/sweeps"), tuple(grid), tuple(draws), count, seed)


def _draw(rng: np.random.Generator, kind: str, argument: tuple) -> Any:
    if kind == "choice":
        return argument[int(rng.integers(len(argument)))]
    low, high = argument
    if kind == "uniform":
        return float(rng.uniform(low, high))
    if kind == "log_uniform":
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    return int(rng.integers(int(low), int(high) + 1))


def expand(sweep: Sweep) -> list[Run]:
    """Every run of the sweep: each grid point (all of them if there is no grid) times `count`
    random draws (one if there are none); the draws are seeded, so expansion is the same on
    every call."""
    keys = [key for key, _ in sweep.grid]
    points = list(itertools.product(*[values for _, values in sweep.grid]))
    rng = np.random.default_rng(sweep.seed)
    runs = []
    for point in points:
        for _ in range(max(sweep.count, 1) if sweep.random else 1):
            drawn = [(key, _draw(rng, *spec)) for key, spec in sweep.random]
            index = len(runs)
            name = f"{sweep.name}-{index:03d}"
            runs.append(Run(name, tuple(zip(keys, point)) + tuple(drawn), sweep.folder / name))
    return runs


def binding_flag(binding: str) -> str:
    """"train.num_steps = 50" -> "--gin.train.num_steps=50"."""
    name, equals, value = binding.partition("=")
    if not equals or not name.strip():
        raise ValueError(f"binding {binding!r} is not NAME = VALUE.")
    return f"--gin.{name.strip()}={value.strip()}"


def train_args(sweep: Sweep, run: Run) -> list[str]:
    """`gemb train`'s arguments for a run."""
    return ([f"--gin_file={f}" for f in sweep.gin_files]
            + [binding_flag(binding) for binding in sweep.bindings]
            + [f"--gin.MODEL_DIR={gin_value(str(run.model_dir))}", *run.gin_flags()])


def is_done(run: Run) -> bool:
    return (run.model_dir / DONE_FILE).is_file()


# ------------------------------------------------------------------------------ running


def run_one(sweep: Sweep, run: Run, python: str = sys.executable) -> int:
    """`gemb train` for one run, its output in MODEL_DIR/sweep.log; DONE_FILE on success."""
    run.model_dir.mkdir(parents=True, exist_ok=True)
    command = [python, "-m", "gemb.cli", "train", *train_args(sweep, run)]
    started = time.time()
    with open(run.model_dir / "sweep.log", "a") as output:
        output.write(f"$ {shlex.join(command)}\n")
        output.flush()
        code = subprocess.call(command, stdout=output, stderr=subprocess.STDOUT)
    if code == 0:
        (run.model_dir / DONE_FILE).write_text(json.dumps(
            {"run": run.name, "bindings": dict(run.bindings),
             "seconds": round(time.time() - started, 1)}, indent=2) + "\n")
    return code


def run_sweep(sweep: Sweep, parallel: int = 1, python: str = sys.executable) -> list[dict]:
    """Runs the unfinished runs (`parallel` at a time), then writes and returns the table."""
    runs = expand(sweep)
    todo = [run for run in runs if not is_done(run)]
    print(f"sweep {sweep.name}: {len(runs)} runs, {len(runs) - len(todo)} already finished, "
          f"{len(todo)} to run ({parallel} at a time)", flush=True)
    started = time.time()
    failed = []
    with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
        futures = {pool.submit(run_one, sweep, run, python): run for run in todo}
        for finished, future in enumerate(concurrent.futures.as_completed(futures), start=1):
            run, code = futures[future], future.result()
            if code != 0:
                failed.append(run.name)
            elapsed = time.time() - started
            eta = elapsed / finished * (len(todo) - finished)
            print(f"sweep {sweep.name}: {run.name} {'done' if code == 0 else f'FAILED ({code})'}"
                  f" [{finished}/{len(todo)}, {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min]"
                  + ("" if code == 0 else f"; see {run.model_dir / 'sweep.log'}"), flush=True)
    rows = write_table(sweep)
    if failed:
        print(f"sweep {sweep.name}: {len(failed)} runs failed: {failed}; rerun the same command "
              "to retry them (finished runs are skipped).", file=sys.stderr)
    return rows


# -------------------------------------------------------------------------------- table


def run_results(run: Run) -> dict[str, float]:
    """The run's final training loss and the last value of every evaluation metric."""
    from gemb.train import metrics_writer

    results: dict[str, float] = {}
    metrics = run.model_dir / "train_metrics.jsonl"
    if metrics.is_file():
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if lines:
            results["step"] = lines[-1]["step"]
            results["loss"] = lines[-1].get("loss", float("nan"))
    if (run.model_dir / "train").is_dir():
        for tag, points in metrics_writer.read_scalars(run.model_dir / "train").items():
            if tag.startswith("eval/") and points:
                results[tag[len("eval/"):]] = max(points)[1]  # the last step's value
    return results


def write_table(sweep: Sweep) -> list[dict]:
    """ROOT/NAME/results.md and results.csv (and the HParams events); returns the rows."""
    runs = expand(sweep)
    rows = []
    for run in runs:
        row = {"run": run.name, "status": "done" if is_done(run) else "not finished",
               **{key: value for key, value in run.bindings}, **run_results(run)}
        rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    sweep.folder.mkdir(parents=True, exist_ok=True)
    with open(sweep.folder / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    (sweep.folder / "results.md").write_text(markdown_table(rows, columns))
    write_hparams(sweep, runs, rows)
    print(markdown_table(rows, columns), end="")
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    out = io.StringIO()
    out.write("| " + " | ".join(columns) + " |\n")
    out.write("|" + "---|" * len(columns) + "\n")
    for row in rows:
        out.write("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |\n")
    return out.getvalue()


def write_hparams(sweep: Sweep, runs: Sequence[Run], rows: Sequence[Mapping[str, Any]]) -> None:
    """TensorBoard's HParams view: the experiment's config, then per run its hparams and
    metric scalars, each run in ROOT/NAME/hparams/RUN (tensorboard's protos, no TensorFlow)."""
    from tensorboard.plugins.hparams import summary_v2 as hp

    from gemb.train.metrics_writer import TensorBoardWriter

    swept = [key for key, _ in sweep.grid] + [key for key, _ in sweep.random]
    metric_names = sorted({k for row in rows for k in row
                           if k not in ("run", "status", "step", *swept)})
    folder = sweep.folder / "hparams"
    config = TensorBoardWriter(folder)
    config.summary(0, hp.hparams_config_pb(
        [hp.HParam(key) for key in swept], [hp.Metric(name) for name in metric_names]))
    config.close()
    for run, row in zip(runs, rows):
        writer = TensorBoardWriter(folder / run.name)
        writer.summary(0, hp.hparams_pb({key: _hparam(value) for key, value in run.bindings},
                                        trial_id=run.name))
        writer.scalars(0, {name: row[name] for name in metric_names
                           if isinstance(row.get(name), (int, float))})
        writer.close()


def _hparam(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str)) else str(value)


# ------------------------------------------------------------------------------ launching


LAUNCHERS = ("xpk", "tpu_vm", "slurm")


def emit(sweep: Sweep, launcher: str, launcher_args: Sequence[str]) -> list[str]:
    """The launch commands of every unfinished run (one job per run), through launch/.

    xpk: launch/xpk.sh CLUSTER TPU_TYPE NUM_SLICES IMAGE, then RUN.gin MODEL_DIR and flags;
    tpu_vm: launch/tpu_vm_pod.sh TPU_NAME ZONE ... (the runs one after another on the pod);
    slurm: ROOT/NAME/slurm_runs.tsv (a run's arguments per line) and one `sbatch --array`
    of launch/slurm_sweep.sbatch, whose task i runs line i + 1. launcher_args go first
    (sbatch options for slurm, e.g. --nodes=2)."""
    expected = {"xpk": 4, "tpu_vm": 2, "slurm": None}
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; one of {LAUNCHERS}.")
    if expected[launcher] is not None and len(launcher_args) != expected[launcher]:
        usage = {"xpk": "CLUSTER TPU_TYPE NUM_SLICES IMAGE", "tpu_vm": "TPU_NAME ZONE"}
        raise ValueError(f"--launcher {launcher} takes {usage[launcher]} "
                         f"({expected[launcher]} arguments), got {list(launcher_args)}.")
    runs = [run for run in expand(sweep) if not is_done(run)]
    run_gin, *more_gin = sweep.gin_files

    def arguments(run: Run) -> list[str]:
        return [run_gin, str(run.model_dir), *[f"--gin_file={f}" for f in more_gin],
                *[binding_flag(b) for b in sweep.bindings], *run.gin_flags()]

    if launcher == "xpk":
        return [shlex.join(["launch/xpk.sh", *launcher_args, *arguments(run)]) for run in runs]
    if launcher == "tpu_vm":
        return [shlex.join(["launch/tpu_vm_pod.sh", *launcher_args, *arguments(run)])
                for run in runs]
    if not runs:
        return []
    sweep.folder.mkdir(parents=True, exist_ok=True)
    table = sweep.folder / "slurm_runs.tsv"
    table.write_text("".join("\t".join(arguments(run)) + "\n" for run in runs))
    return [shlex.join(["sbatch", f"--array=0-{len(runs) - 1}", f"--job-name=gemb-{sweep.name}",
                        *launcher_args, "launch/slurm_sweep.sbatch", str(table)])]


# ------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemb sweep", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the unfinished runs here, then the table")
    run.add_argument("sweep")
    run.add_argument("--parallel", type=int, default=1, help="runs at a time")
    run.add_argument("--dry_run", action="store_true",
                     help="print each run's gemb train command instead of running it")
    table = commands.add_parser("table", help="write and print the results table")
    table.add_argument("sweep")
    launch = commands.add_parser("emit", help="print launch commands (one job per run)")
    launch.add_argument("sweep")
    launch.add_argument("--launcher", required=True, choices=LAUNCHERS)
    launch.add_argument("launcher_args", nargs=argparse.REMAINDER,
                        help="xpk: CLUSTER TPU_TYPE NUM_SLICES IMAGE; tpu_vm: TPU_NAME ZONE; "
                             "slurm: sbatch options")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        sweep = load_sweep(args.sweep)
        if args.command == "table":
            write_table(sweep)
        elif args.command == "emit":
            print("\n".join(emit(sweep, args.launcher, args.launcher_args)))
        elif args.dry_run:
            for run in expand(sweep):
                print(("# done: " if is_done(run) else "")
                      + shlex.join(["gemb", "train", *train_args(sweep, run)]))
        else:
            run_sweep(sweep, args.parallel)
    except (FileNotFoundError, ValueError) as error:
        print(f"gemb sweep: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
