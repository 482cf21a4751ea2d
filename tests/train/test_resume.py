"""kill -9 a TINY run at a chosen step, rerun the same command: the loss sequence is bitwise
equal to an uninterrupted run's, and the metrics file holds every step once.

The kill is the trainer's fault drill (GEMB_KILL_AFTER_STEP): the process SIGKILLs itself
right after the chosen step, once the checkpoints it started are on disk, so the test does not
depend on how fast the machine is.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from gemb import paths
from helpers import one_device_env

NUM_STEPS = 12
SAVE_EVERY = 3


def command(model_dir):
    return [sys.executable, "-m", "gemb.train", "--gin_file=gin/runs/tiny_synthetic.gin",
            f"--gin.MODEL_DIR='{model_dir}'", f"--gin.train.num_steps={NUM_STEPS}",
            f"--gin.CheckpointConfig.save_every={SAVE_EVERY}", "--gin.encoder_config.num_layers=2"]


def run(model_dir, kill_after=None):
    env = one_device_env()
    env["PYTHONPATH"] = str(paths.REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("GEMB_KILL_AFTER_STEP", None)
    if kill_after is not None:
        env["GEMB_KILL_AFTER_STEP"] = str(kill_after)
    return subprocess.Popen(command(model_dir), cwd=paths.REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def logged_steps(model_dir):
    records = [json.loads(line) for line in
               (model_dir / "train_metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records], {r["step"]: r["loss"] for r in records}


@pytest.mark.slow
def test_kill_and_resume_is_bitwise_equal_at_two_steps(tmp_path):
    kill_steps = (5, 10)
    processes = {"reference": run(tmp_path / "reference")}
    processes.update({step: run(tmp_path / f"killed_at_{step}", kill_after=step)
                      for step in kill_steps})
    outputs = {name: process.communicate(timeout=600)[0] for name, process in processes.items()}
    assert processes["reference"].returncode == 0, outputs["reference"]
    for step in kill_steps:
        assert processes[step].returncode == -9, outputs[step]  # SIGKILL
        assert f"GEMB_KILL_AFTER_STEP={step}: killing" in outputs[step]
    order, expected = logged_steps(tmp_path / "reference")
    assert order == list(range(1, NUM_STEPS + 1))
    resumed = {step: run(tmp_path / f"killed_at_{step}") for step in kill_steps}
    for step, process in resumed.items():
        output = process.communicate(timeout=600)[0]
        assert process.returncode == 0, output
        # The newest checkpoint at or before the kill is where it continues.
        assert f"from step {step // SAVE_EVERY * SAVE_EVERY}." in output, output
        order, losses = logged_steps(tmp_path / f"killed_at_{step}")
        assert order == list(range(1, NUM_STEPS + 1))  # re-run steps are not logged twice
        assert losses == expected  # exact floats
        # TensorBoard shows each step once too: the resumed writer purges the re-run steps.
        events = event_accumulator.EventAccumulator(str(tmp_path / f"killed_at_{step}" / "train"))
        events.Reload()
        points = [(e.step, e.value) for e in events.Scalars("train/loss")]
        assert [s for s, _ in points] == list(range(1, NUM_STEPS + 1))
        np.testing.assert_allclose([v for _, v in points], [expected[s] for s, _ in points],
                                   rtol=1e-6)  # TensorBoard stores float32
