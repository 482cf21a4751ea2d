"""kill -9 a TINY run at a step, rerun the same command: the loss sequence is bitwise equal."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gemb import paths

NUM_STEPS = 12
SAVE_EVERY = 3


def command(model_dir):
    return [sys.executable, "-m", "gemb.train", "--gin_file=gin/runs/tiny_synthetic.gin",
            f"--gin.MODEL_DIR='{model_dir}'", f"--gin.train.num_steps={NUM_STEPS}",
            f"--gin.CheckpointConfig.save_every={SAVE_EVERY}", "--gin.encoder_config.num_layers=2"]


def env():
    out = dict(os.environ)
    out["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    out["PYTHONPATH"] = str(paths.REPO_ROOT) + os.pathsep + out.get("PYTHONPATH", "")
    return out


def losses(model_dir):
    """Loss per step; a step logged twice (before a kill and after the resume) keeps the last."""
    out = {}
    for line in (model_dir / "train_metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["loss"]
    return out


def start(model_dir):
    return subprocess.Popen(command(model_dir), cwd=paths.REPO_ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_at(process, model_dir, step, timeout=300):
    """SIGKILL once `step` is logged and the checkpoint before it is committed (orbax renames
    a finished checkpoint into place; an unfinished one would be ignored and the rerun would
    start from scratch, which is correct but not what this test is about)."""
    metrics = model_dir / "train_metrics.jsonl"
    committed = model_dir / "checkpoints" / str(step // SAVE_EVERY * SAVE_EVERY)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (metrics.exists() and len(metrics.read_text().splitlines()) >= step
                and committed.is_dir()):
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended before step {step}:\n{process.stdout.read()}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.mark.slow
def test_kill_and_resume_is_bitwise_equal_at_two_steps(tmp_path):
    kill_steps = (5, 10)
    reference_dir = tmp_path / "reference"
    reference = start(reference_dir)
    killed = {step: start(tmp_path / f"killed_at_{step}") for step in kill_steps}
    for step, process in killed.items():
        kill_at(process, tmp_path / f"killed_at_{step}", step)
    resumed = {step: start(tmp_path / f"killed_at_{step}") for step in kill_steps}
    output = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0, output
    expected = losses(reference_dir)
    assert sorted(expected) == list(range(1, NUM_STEPS + 1))
    for step, process in resumed.items():
        output = process.communicate(timeout=600)[0]
        assert process.returncode == 0, output
        assert "Resumed" in output and "from step" in output, output
        resumed_from = int(output.split("from step ")[1].split(".")[0])
        assert 0 < resumed_from < NUM_STEPS
        assert losses(tmp_path / f"killed_at_{step}") == expected  # exact floats
