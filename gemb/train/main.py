"""`gemb train` (and `python -m gemb.train`): gin-configured training, t5x style.

    gemb train --gin_file=gin/runs/quickstart.gin --gin.MODEL_DIR="'runs/quickstart'"
    gemb train --gin_file=gin/models/gemma3_1b.gin --gin_file=gin/runs/finetune.gin \\
        --gin_file=gin/partitioning/fsdp.gin --gin.MODEL_DIR="'gs://bucket/run'" \\
        --gin.INIT_FROM="'models/gemma3-1b'" --gin.train.num_steps=2000

--gin_file may repeat (later files override earlier ones), --gin.NAME=VALUE binds one value
after all files, --gin_search_path adds folders to look up includes and --gin_file names in
(the repository's gin/ folder is always searched). The run directory is the MODEL_DIR macro;
the operative config is written to MODEL_DIR/config.gin and to TensorBoard. The run itself is
gemb.train.run.train(); what gin files may name is registered in gemb.train.gin_registry.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

import gin
import jax

from gemb import distributed, paths
from gemb.train import checkpointing, gin_registry, run

log = logging.getLogger(__name__)

GIN_DIR = paths.REPO_ROOT / "gin"
OPERATIVE_CONFIG = run.OPERATIVE_CONFIG

def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
    """t5x-style flags: --gin_file (repeatable), --gin.NAME=VALUE, --gin_search_path."""
    parser = argparse.ArgumentParser(prog="gemb train", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin file (repeatable; relative to the search path or cwd)")
    parser.add_argument("--gin_bindings", action="append", default=[],
                        help="a gin binding, like --gin.NAME=VALUE")
    parser.add_argument("--gin_search_path", action="append", default=[])
    parser.add_argument("--log_level", default="WARNING")
    args, rest = parser.parse_known_args(list(argv))
    bindings = list(args.gin_bindings)
    unknown = []
    for item in rest:
        if item.startswith("--gin."):
            name_value = item[len("--gin."):]
            if "=" not in name_value:
                raise SystemExit(f"gemb train: {item} needs a value: --gin.NAME=VALUE")
            bindings.append(name_value)
        else:
            unknown.append(item)
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    args.bindings = bindings
    return args


def _guard_gin_resource_reader() -> None:
    """gin looks up an include 'models/x.gin' as a file of a Python package `models` first; a
    namespace package of that name (any folder `models/` on sys.path, e.g. tests/models) has no
    origin and gin crashes with a TypeError instead of moving on to the search paths."""
    from gin import resource_reader

    original = resource_reader._parse_config_path  # pylint: disable=protected-access
    if getattr(original, "_gemb_guarded", False):
        return

    def guarded(config_path):
        try:
            return original(config_path)
        except TypeError:
            raise ValueError("Package not found", config_path) from None

    guarded._gemb_guarded = True
    resource_reader._parse_config_path = guarded  # pylint: disable=protected-access


def parse_gin(files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
    gin_registry.register()
    _guard_gin_resource_reader()
    for path in [*search_paths, str(GIN_DIR), str(paths.REPO_ROOT), os.getcwd()]:
        gin.add_config_file_search_path(path)
    # gin logs an ERROR for every search path an include is NOT found in; only the final
    # failure matters, and that one raises.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        gin.parse_config_files_and_bindings(list(files), list(bindings), finalize_config=False)
    finally:
        root.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_flags(sys.argv[1:] if argv is None else argv)
    level = getattr(logging, args.log_level.upper(), logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # basicConfig does nothing once an import has given the root logger a handler (one does):
    # the level is set on its own so that --log_level always applies.
    logging.getLogger().setLevel(level)
    if not args.gin_file:
        print("gemb train: give at least one --gin_file (e.g. gin/runs/quickstart.gin)",
              file=sys.stderr)
        return 2
    try:
        distributed.initialize()
    except distributed.DistributedSetupError as error:
        print(f"gemb train: error: {error}", file=sys.stderr)
        return 2
    parse_gin(args.gin_file, args.bindings, args.gin_search_path)
    config_text = gin.config_str()
    try:
        result = gin.get_configurable("train")(gin_config_text=config_text)
    except (run.TrainingDiverged, checkpointing.CheckpointRestoreError,
            checkpointing.RunWriteError) as error:
        # The failed save's own write tasks (orbax, asyncio) still hold the same error; asyncio
        # would log each as "Task exception was never retrieved" at exit, after the one line
        # that says what happened and what to do.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        # gin appends "In call to configurable 'train'" to the message: the first line says it.
        print(f"gemb train: {str(error).splitlines()[0]}", file=sys.stderr, flush=True)
        return 1
    if jax.process_index() == 0:
        # Now every configurable has been called: the operative config is complete.
        paths.as_path(result["model_dir"]).joinpath(OPERATIVE_CONFIG).write_text(gin.operative_config_str())
    print(f"Done: step {result['final_step']} in {result['wall_seconds'] / 60:.1f} min.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
