"""Shared pieces of the multi-process tests: run gemb commands as N local JAX processes
(gemb.local_processes) and read what the runs wrote."""

import json
import os
from pathlib import Path

from gemb import local_processes

GLOBAL_DEVICES = 8  # every run, whatever its process count, has this global mesh


def gemb(command, num_processes, *, env_overrides=None, per_process_env=None, timeout=900,
         expect_codes=None, python_args=("-m", "gemb.cli")):
    """Runs `gemb COMMAND` as num_processes processes over GLOBAL_DEVICES CPU devices; asserts
    each exit code (0 unless expect_codes) and returns the results."""
    # Without the test session's persistent XLA cache (tests/conftest.py): N processes on 2
    # cores writing the same entries made these runs 30-50% slower, not faster.
    env = {k: v for k, v in os.environ.items()
           if k not in ("GEMB_KILL_AFTER_STEP", "JAX_COMPILATION_CACHE_DIR")}
    env.update(env_overrides or {})
    results = local_processes.run(command, num_processes, GLOBAL_DEVICES // num_processes,
                                  env=env, per_process_env=per_process_env, timeout=timeout,
                                  python_args=python_args)
    expected = expect_codes or [0] * num_processes
    codes = [r.returncode for r in results]
    assert codes == list(expected), "\n\n".join(
        f"--- process {r.process_id} (exit {r.returncode}) ---\n{r.output[-6000:]}"
        for r in results)
    return results


def run_python(args, num_processes, **kwargs):
    """`python ARGS` (a script) as num_processes processes, like `gemb`."""
    return gemb(args, num_processes, python_args=(), **kwargs)


def train_command(model_dir, *extra):
    return ["train", "--gin_file=gin/runs/tiny_synthetic.gin", f"--gin.MODEL_DIR='{model_dir}'",
            "--gin.encoder_config.num_layers=2", *extra]


def logged_losses(model_dir) -> dict[int, float]:
    path = Path(model_dir) / "train_metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step logged twice in {path}: {steps}"
    return {r["step"]: r["loss"] for r in records}
