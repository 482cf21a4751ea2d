"""`gemb <command> ...`: one entry point, each command implemented in its own module."""

from __future__ import annotations

import importlib
import sys

# command -> module with main(argv) -> int; imported lazily so `gemb embed` never loads TF.
COMMANDS = {
    "convert": ("gemb.checkpoints.convert", "GGUF / HF safetensors -> gemb model folder"),
    "data": ("gemb.data.prepare", "`data prepare`: tokenise a task into sharded ArrayRecord "
             "files (Beam); LLM stages: `data mine-negatives`, `data filter-pairs`, "
             "`data synthesize-queries`, `data synthesize-classification` (`data beam STAGE`: "
             "one as a Beam pipeline)"),
    "embed": ("gemb.embed", "texts -> embeddings (.npy)"),
    "eval": ("gemb.eval.cli", "score a model on MTEB-style tasks"),
    "train": ("gemb.train.main", "gin-configured training (t5x-style --gin_file / --gin.NAME=VALUE)"),
    "precompile": ("gemb.train.precompile", "AOT-compile the train step for a mesh; print memory"),
    "export": ("gemb.export.sentence_transformers",
               "model folder -> sentence-transformers / transformers folder"),
    "soup": ("gemb.soup", "average the params of several checkpoints into a model folder"),
    "sweep": ("gemb.sweep", "a grid / random draws of gin bindings as runs: run them here, "
              "emit launch commands, collect their metrics into one table"),
    "llm": ("gemb.llm.server", "`llm serve`: an OpenAI-compatible completions server over a model folder"),
}
# `convert`, `data` and `llm` are one host's jobs (`data prepare` scales out through Beam's runner);
# the rest join a multi-process job when launched as one.
MULTI_PROCESS_COMMANDS = ("embed", "eval", "train", "precompile", "export", "soup")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
        print("usage: gemb <command> [args]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] in MULTI_PROCESS_COMMANDS:
        from gemb import distributed

        try:
            # Before any device is touched: under a multi-process launcher each of these
            # commands runs as one process of the job.
            distributed.initialize()
        except distributed.DistributedSetupError as error:
            print(f"gemb {argv[0]}: error: {error}", file=sys.stderr)
            return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
